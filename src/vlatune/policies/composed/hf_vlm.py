"""`hf-vlm`: a transformers image-text-to-text model as the policy backbone (NORA, OFT-style).

The model, its tokenizer and its image processor load from a hub id or a local folder
(`policy.model_id`). Image processing uses the PIL backend of transformers' image processors:
the torchvision ("fast") ones need torchvision, which a CPU torch cannot import. vlatune builds
the prompt itself (the chat template of the family with one image per camera, then the
instruction) and expands the image placeholders as the model's processor would: transformers'
`ProcessorMixin` refuses to build without torchvision's video processor, so it is not used.

The prompt ids and vision tensors are made per sample by the processor step
`composed.vlm_inputs` (`vlatune.policies.composed.processor`), in the DataLoader workers and in
`predict`; `forward`, `token_logits` and `generate` take that prepared batch (`batch["vlm"]`).

Supported families (`model_type`): Qwen2-VL / Qwen2.5-VL (NORA is a Qwen2.5-VL-3B), PaliGemma
(pi0's backbone) and SmolVLM; the prompt formats are those of their processors (Qwen's chat
template; PaliGemma's `<image>` x N + BOS + text + newline; SmolVLM's `User:` / `Assistant:`
turns with `<fake_token_around_image><global-img><image> x N` per image, no image splitting).
Others raise a clear error naming the supported types.

Extra tokens, added to the vocabulary when the model lacks them (the embeddings are resized):
- `<robot_action_k>`, k = 0..V-1: the action tokenizer's ids (FAST or bins), as in NORA;
- `<flow_k>`: optical-flow VQ codes (visual chain-of-thought), when configured;
- `<|vlatune_state|>` and `<|vlatune_query|>`: placeholders whose input embeddings are replaced
  by the proprio projector's output and by the L1 head's learned action queries (a forward hook
  on the input embedding layer), so the model's own position handling (M-RoPE) stays intact.

Attention is the model's own (causal): the OFT action queries at the end of the sequence attend
to the whole context and to the queries before them (OFT makes the queries bidirectional by
editing the attention mask; this wrapper keeps the model unmodified).

    >>> bb = HFVLMBackbone("declare-lab/nora", ["agentview", "wrist"], 224, state_dim=8, action_vocab=2048)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from vlatune.policies.composed.tiny import BackboneOutput

ACTION_TOKEN = "<robot_action_{}>"
FLOW_TOKEN = "<flow_{}>"
STATE_TOKEN = "<|vlatune_state|>"
QUERY_TOKEN = "<|vlatune_query|>"


def resolve_dtype(name: str) -> torch.dtype:
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


class QwenPrompt:
    """Qwen2(.5)-VL chat prompt: one vision block per image, then the instruction."""

    def __init__(self, tokenizer, image_processor):
        self.tokenizer, self.ip = tokenizer, image_processor
        self.image_pad = "<|image_pad|>"
        self.merge = int(getattr(image_processor, "merge_size", 2))

    def vision(self, per_sample: list[list[np.ndarray]]) -> tuple[dict, list[list[int]]]:
        """uint8 HWC frames per sample -> model inputs and image tokens per frame."""
        frames = [f for fs in per_sample for f in fs]
        enc = self.ip(images=frames, return_tensors="pt")
        grid = enc["image_grid_thw"]
        flat = (grid.prod(-1) // self.merge**2).tolist()
        return {"pixel_values": enc["pixel_values"], "image_grid_thw": grid}, _split(
            flat, per_sample
        )

    def text(self, instruction: str, image_tokens: Sequence[int]) -> str:
        content = [{"type": "image"} for _ in image_tokens] + [
            {"type": "text", "text": instruction}
        ]
        messages = [{"role": "user", "content": content}]
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        else:  # Qwen's template, written out (a tokenizer saved without its template)
            vision = "<|vision_start|><|image_pad|><|vision_end|>" * len(image_tokens)
            text = (
                "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                f"<|im_start|>user\n{vision}{instruction}<|im_end|>\n<|im_start|>assistant\n"
            )
        pieces = text.split(self.image_pad)
        if len(pieces) - 1 != len(image_tokens):
            raise ValueError(
                f"the chat template produced {len(pieces) - 1} image placeholders for "
                f"{len(image_tokens)} images"
            )
        out = pieces[0]
        for n, rest in zip(image_tokens, pieces[1:], strict=True):
            out += self.image_pad * n + rest
        return out


def _split(flat: list[int], per_sample: list[list]) -> list[list[int]]:
    out, k = [], 0
    for fs in per_sample:
        out.append(flat[k : k + len(fs)])
        k += len(fs)
    return out


class PaliGemmaPrompt:
    """PaliGemma: `<image>` x N per image, BOS, the instruction, a newline (its processor's)."""

    eos = None

    def __init__(self, tokenizer, image_processor, image_tokens: int):
        self.tokenizer, self.ip = tokenizer, image_processor
        self.n = int(image_tokens)
        self.image = "<image>"

    def vision(self, per_sample):
        frames = [f for fs in per_sample for f in fs]
        enc = self.ip(images=frames, return_tensors="pt")
        return {"pixel_values": enc["pixel_values"]}, [[self.n] * len(fs) for fs in per_sample]

    def text(self, instruction: str, image_tokens: Sequence[int]) -> str:
        bos = self.tokenizer.bos_token or ""
        return self.image * sum(image_tokens) + bos + instruction + "\n"


class SmolVLMPrompt:
    """SmolVLM: one global image block per camera (no splitting), User / Assistant turns."""

    eos = "<end_of_utterance>"

    def __init__(self, tokenizer, image_processor, image_tokens: int):
        self.tokenizer, self.ip = tokenizer, image_processor
        self.n = int(image_tokens)

    def vision(self, per_sample):
        enc = self.ip(images=per_sample, do_image_splitting=False, return_tensors="pt")
        inputs = {"pixel_values": enc["pixel_values"]}
        if "pixel_attention_mask" in enc:
            inputs["pixel_attention_mask"] = enc["pixel_attention_mask"]
        return inputs, [[self.n] * len(fs) for fs in per_sample]

    def text(self, instruction: str, image_tokens: Sequence[int]) -> str:
        block = "".join(
            "<fake_token_around_image><global-img>" + "<image>" * n + "<fake_token_around_image>"
            for n in image_tokens
        )
        return f"<|im_start|>User:{block}{instruction}<end_of_utterance>\nAssistant:"


PROMPTS = {
    "qwen2_vl": lambda tok, ip, n: QwenPrompt(tok, ip),
    "qwen2_5_vl": lambda tok, ip, n: QwenPrompt(tok, ip),
    "paligemma": PaliGemmaPrompt,
    "smolvlm": SmolVLMPrompt,
}


def image_tokens(config) -> int | None:
    """Tokens per image of a fixed-size family (PaliGemma, SmolVLM); None for Qwen (per grid)."""
    if config.model_type == "paligemma":
        return int(config.text_config.num_image_tokens)
    if config.model_type == "smolvlm":
        v = config.vision_config
        return int(((v.image_size // v.patch_size) ** 2) / (config.scale_factor**2))
    return None


def make_prompt(model_type: str, tokenizer, image_processor, n_image_tokens: int | None):
    if model_type not in PROMPTS:
        raise ValueError(
            f"hf-vlm: model type '{model_type}' is not supported (supported: {sorted(PROMPTS)})"
        )
    return PROMPTS[model_type](tokenizer, image_processor, n_image_tokens)


def special_ids(tokenizer, prompt, action_vocab: int = 0) -> dict[str, Any]:
    """The ids the prompt and the targets use: state / query placeholders, the end token (the
    prompt's turn end, else the tokenizer's EOS), padding (the pad token, else the end token)
    and `<robot_action_k>` for k < action_vocab."""
    ids = tokenizer.convert_tokens_to_ids
    end = getattr(prompt, "eos", "<|im_end|>")
    eos = ids(end) if end else None
    if eos is None or eos == tokenizer.unk_token_id:
        eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return {
        "state": ids(STATE_TOKEN),
        "query": ids(QUERY_TOKEN),
        "eos": eos,
        "pad": pad,
        "action": [ids(ACTION_TOKEN.format(k)) for k in range(action_vocab)],
    }


class HFVLMBackbone(nn.Module):
    def __init__(
        self,
        model_id: str,
        cameras: Sequence[str],
        state_dim: int | None,
        action_vocab: int = 0,
        flow_vocab: int = 0,
        dtype: str = "auto",
        weights: bool = True,
        film: bool = False,
    ):
        """weights=False builds the architecture from the config only (the policy's own
        model.safetensors then supplies every weight)."""
        super().__init__()
        from transformers import (
            AutoConfig,
            AutoImageProcessor,
            AutoModelForImageTextToText,
            AutoTokenizer,
        )

        self.model_id, self.cameras = model_id, list(cameras)
        torch_dtype = resolve_dtype(dtype)
        try:
            config = AutoConfig.from_pretrained(model_id)
            self.tokenizer = AutoTokenizer.from_pretrained(model_id)
            self.image_processor = AutoImageProcessor.from_pretrained(model_id, backend="pil")
        except OSError as e:
            raise FileNotFoundError(
                f"policy.model_id {model_id!r} cannot be loaded ({e}). Give a local folder with "
                "config.json, the tokenizer and preprocessor_config.json, or make the hub "
                "reachable (and unset HF_HUB_OFFLINE)."
            ) from None
        if config.model_type not in PROMPTS:
            raise ValueError(
                f"policy.model_id {model_id!r} is a '{config.model_type}' model; the hf-vlm "
                f"backbone supports model types {sorted(PROMPTS)} in this version"
            )
        if weights:
            self.model = AutoModelForImageTextToText.from_pretrained(model_id, dtype=torch_dtype)
        else:
            self.model = AutoModelForImageTextToText.from_config(config, dtype=torch_dtype)
        self.image_tokens = image_tokens(config)
        self.prompt = make_prompt(
            config.model_type, self.tokenizer, self.image_processor, self.image_tokens
        )
        new = [STATE_TOKEN, QUERY_TOKEN]
        new += [ACTION_TOKEN.format(k) for k in range(action_vocab)]
        new += [FLOW_TOKEN.format(k) for k in range(flow_vocab)]
        vocab = self.tokenizer.get_vocab()
        missing = [t for t in new if t not in vocab]
        self.added_tokens = len(missing)
        # LoRA keeps the input embeddings and LM head trainable when action / flow tokens are new
        # to the vocabulary (NORA's own checkpoint already has its action tokens)
        self.trains_new_tokens = any(t.startswith(("<robot_action_", "<flow_")) for t in missing)
        if missing:
            self.tokenizer.add_tokens(missing, special_tokens=True)
        if len(self.tokenizer) > self.model.get_input_embeddings().num_embeddings:
            self.model.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
        known = special_ids(self.tokenizer, self.prompt, action_vocab)
        self.state_id, self.query_id = known["state"], known["query"]
        self.register_buffer(
            "action_ids", torch.tensor(known["action"], dtype=torch.long), persistent=False
        )
        ids = self.tokenizer.convert_tokens_to_ids
        self.flow_ids = [ids(FLOW_TOKEN.format(k)) for k in range(flow_vocab)]
        self.eos_id, self.pad_id = known["eos"], known["pad"]
        self.dim = self.model.config.get_text_config().hidden_size
        self.state_proj = (
            nn.Sequential(nn.Linear(state_dim, self.dim), nn.GELU(), nn.Linear(self.dim, self.dim))
            if state_dim
            else None
        )
        self._inject: dict[int, torch.Tensor] = {}
        self.model.get_input_embeddings().register_forward_hook(self._replace_placeholders)
        self.film = None
        self._film: tuple[torch.Tensor, torch.Tensor] | None = None
        if film:
            blocks, vdim = self._vision_blocks()
            self.film = nn.ModuleList(nn.Linear(self.dim, 2 * vdim) for _ in blocks)
            for lin in self.film:  # zero: the pretrained vision tower is unchanged at start
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)
            for i, blk in enumerate(blocks):
                blk.register_forward_hook(self._film_hook(i))

    # ------------------------------------------------------------------ FiLM (OFT)
    def _vision_blocks(self) -> tuple[nn.ModuleList, int]:
        """The vision tower's transformer blocks and their width."""
        for name, m in self.model.named_modules():
            vision = "visual" in name or "vision" in name
            if isinstance(m, nn.ModuleList) and vision and name.endswith(("blocks", "layers")):
                vcfg = self.model.config.vision_config
                return m, int(getattr(vcfg, "hidden_size", None) or vcfg.embed_dim)
        raise ValueError("policy.film: no vision transformer blocks found in this model")

    def _film_hook(self, i: int):
        """gamma, beta from the mean instruction embedding modulate every vision token of that
        sample's images after block i: x * (1 + gamma) + beta (OFT's FiLM)."""

        def hook(module, inputs, output):
            if self._film is None:
                return output
            text, index = self._film
            h = output[0] if isinstance(output, tuple) else output
            gamma, beta = self.film[i](text).chunk(2, dim=-1)
            g, b = gamma[index].to(h.dtype), beta[index].to(h.dtype)
            if h.dim() == 3:  # (images, patches, d)
                g, b = g[:, None], b[:, None]
            h = h * (1 + g) + b
            return (h, *output[1:]) if isinstance(output, tuple) else h

        return hook

    def _film_inputs(self, vlm: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean instruction embedding (B, d), sample index of every vision token row), from
        the batch's `film_ids` / `film_len` and `image_count` (composed.vlm_inputs)."""
        emb = self.model.get_input_embeddings()
        ids, lengths = vlm["film_ids"].to(self.model.device), vlm["film_len"].tolist()
        texts = [emb(ids[b, :n]).float().mean(0) for b, n in enumerate(lengths)]
        counts = vlm["image_count"].to(ids.device)
        image_sample = torch.arange(len(lengths), device=ids.device).repeat_interleave(counts)
        if "image_grid_thw" in vlm:  # Qwen: rows are patches, in image order
            patches = vlm["image_grid_thw"].prod(-1).to(ids.device)
            return torch.stack(texts), image_sample.repeat_interleave(patches)
        return torch.stack(texts), image_sample

    # ------------------------------------------------------------------ placeholders
    def _replace_placeholders(self, module, inputs, output):
        if not self._inject:
            return output
        ids = inputs[0]
        for token_id, values in self._inject.items():
            mask = ids == token_id
            if mask.any():
                if int(mask.sum()) != values.shape[0] * values.shape[1]:
                    raise RuntimeError("placeholder count does not match the injected values")
                output = output.masked_scatter(mask[..., None], values.to(output.dtype))
        return output

    # ------------------------------------------------------------------ inputs
    MODEL_KEYS = (
        "input_ids",
        "attention_mask",
        "pixel_values",
        "image_grid_thw",
        "pixel_attention_mask",
        "token_type_ids",
    )

    def model_inputs(self, vlm: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's keyword inputs from a batch's `vlm` (made by the processor step
        `composed.vlm_inputs`, in the loader workers): on the model's device, pixel values in
        its dtype. No tokenizer or image processor runs here."""
        device = self.model.device
        out = {k: vlm[k].to(device) for k in self.MODEL_KEYS if k in vlm}
        out["pixel_values"] = out["pixel_values"].to(self.model.dtype)
        return out

    def _set_inject(self, state: torch.Tensor | None, queries: torch.Tensor | None) -> None:
        self._inject = {}
        if state is not None:
            self._inject[self.state_id] = self.state_proj(state.float())[:, None, :]
        if queries is not None:
            self._inject[self.query_id] = queries

    def _call(self, vlm: dict[str, torch.Tensor], state, queries, **kw):
        model_inputs = self.model_inputs(vlm)
        self._film = self._film_inputs(vlm) if self.film is not None else None
        self._set_inject(state if self.state_proj is not None else None, queries)
        try:
            return self.model(**model_inputs, **kw)
        finally:
            self._inject = {}
            self._film = None

    # ------------------------------------------------------------------ continuous heads
    def forward(
        self,
        vlm: dict[str, torch.Tensor],
        state: torch.Tensor | None,
        queries: torch.Tensor | None = None,
    ) -> BackboneOutput:
        """`vlm`: the batch's prepared inputs (composed.vlm_inputs: the prompt already holds
        one state token when the policy uses the state, and the query tokens)."""
        use_state = state is not None and self.state_proj is not None
        nq = 0 if queries is None else queries.shape[1]
        out = self._call(
            vlm,
            state if use_state else None,
            queries,
            output_hidden_states=True,
            use_cache=False,
            logits_to_keep=1,
        )
        hidden = out.hidden_states[-1].float()
        padding = vlm["attention_mask"].to(hidden.device) == 0
        ctx = (~padding).clone()
        if nq:
            ctx[:, -nq:] = False
        pooled = (hidden * ctx[..., None]).sum(1) / ctx.sum(1, keepdim=True).clamp(min=1)
        return BackboneOutput(hidden=hidden, padding=padding, pooled=pooled, n_queries=nq)

    # ------------------------------------------------------------------ tokens head
    def token_logits(self, vlm: dict[str, torch.Tensor], state: torch.Tensor | None):
        use_state = state is not None and self.state_proj is not None
        out = self._call(vlm, state if use_state else None, None, use_cache=False)
        return out.logits

    @torch.no_grad()
    def generate(
        self,
        vlm: dict[str, torch.Tensor],
        state: torch.Tensor | None,
        max_new_tokens: int,
        allowed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Greedy decoding with the KV cache; `allowed` restricts every step to those ids (and
        the end token). Returns the new tokens (B, <= max_new_tokens)."""
        from transformers import LogitsProcessorList

        processors = LogitsProcessorList()
        if allowed is not None:
            processors.append(_AllowOnly(torch.cat([allowed, torch.tensor([self.eos_id])])))
        model_inputs = self.model_inputs(vlm)
        use_state = state is not None and self.state_proj is not None
        self._film = self._film_inputs(vlm) if self.film is not None else None
        self._set_inject(state if use_state else None, None)
        try:
            out = self.model.generate(
                **model_inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,
                logits_processor=processors,
                eos_token_id=self.eos_id,
                pad_token_id=self.pad_id,
            )
        finally:
            self._inject = {}
            self._film = None
        return out[:, model_inputs["input_ids"].shape[1] :]


class _AllowOnly:
    """Logits processor: every id outside `allowed` gets -inf."""

    def __init__(self, allowed: torch.Tensor):
        self.allowed = allowed

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        mask = torch.full_like(scores, float("-inf"))
        mask[:, self.allowed.to(scores.device)] = 0
        return scores + mask


def lora_targets(backbone: HFVLMBackbone, spec: Any) -> list[str]:
    """'all-linear': every nn.Linear of the language model (not the vision tower, not the LM
    head), as peft's all-linear does for causal LMs."""
    if spec != "all-linear":
        return list(spec)
    names = []
    for name, m in backbone.model.named_modules():
        if not isinstance(m, nn.Linear) or "visual" in name or name.endswith("lm_head"):
            continue
        names.append(f"model.{name}")
    return sorted(names)
