"""The composed family's processor steps (`vlatune.policies.processor`, names "composed.<x>").

`composed.language` (rdt-style backbone, `LanguageLookup`): the instruction's cached T5
embedding per sample, zero-padded by its collate.

`composed.vlm_inputs` (hf-vlm backbone, `VLMInputs`) does, per sample and inside the DataLoader
workers (and in `predict`), what the hf-vlm backbone used to do on the main process every step:
the camera images the
`images` step made (uint8 (3, S, S); a dropped camera, `image_mask` False, is left out of the
prompt) go through the model's image processor (PIL backend), the instruction through the chat
prompt of the model type (one image block per camera), then the state placeholder, the action
query placeholders and, for a `tokens` head when the sample has actions, the target ids (the
action tokenizer on the normalised chunk, then the end token). The sample gets `vlm`:

- `input_ids`, `labels` (long (L,); labels -100 on the prompt, the target ids after it);
- the model type's vision tensors: Qwen2(.5)-VL `pixel_values` (patches, d) + `image_grid_thw`
  (images, 3); PaliGemma `pixel_values` (images, 3, H, W); SmolVLM `pixel_values` (images, 3,
  H, W) + `pixel_attention_mask` (images, H, W);
- `image_count` (the cameras kept) and, with FiLM, `film_ids` (the instruction's token ids).

`VLMInputs.collate` joins samples as the backbone expects them: ids, labels and attention mask
left-padded to the longest row (PaliGemma: `token_type_ids`, 1 on the targets), Qwen / PaliGemma
vision tensors concatenated in sample order, SmolVLM's padded to the most images of a sample
(zeros, mask False, as its image processor pads a batch), FiLM ids right-padded with `film_len`.
The tokenizer (with the added tokens) and the image processor are the step's side files, in the
policy folder's `vlm/`; a FAST action tokenizer in `action_tokenizer/`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlatune.policies.processor import Processor, Step, register

VLM_DIR = "vlm"
ACTION_TOKENIZER_DIR = "action_tokenizer"
VISION_CAT = ("pixel_values", "image_grid_thw")  # concatenated over the batch's images


def pack(
    rows: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]],
    pad_id: int,
    token_types: bool = False,
) -> dict[str, torch.Tensor]:
    """Rows of ids (and their labels) left-padded to the longest: `input_ids` (pad_id),
    `labels` (-100), `attention_mask` (0 on padding); `token_types` adds PaliGemma's
    `token_type_ids` (0 on the prompt and padding, 1 from the first target on)."""
    B, L = len(rows), max(len(r) for r in rows)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    label_t = torch.full((B, L), -100, dtype=torch.long)
    attn = torch.zeros(B, L, dtype=torch.long)
    for b, (r, lab) in enumerate(zip(rows, labels, strict=True)):
        input_ids[b, L - len(r) :] = torch.tensor(list(r), dtype=torch.long)
        label_t[b, L - len(r) :] = torch.tensor(list(lab), dtype=torch.long)
        attn[b, L - len(r) :] = 1
    out = {"input_ids": input_ids, "attention_mask": attn, "labels": label_t}
    if token_types:  # the targets start after the -100 (prompt) labels
        tt = torch.zeros(B, L, dtype=torch.long)
        for b, (r, lab) in enumerate(zip(rows, labels, strict=True)):
            tt[b, L - len(r) + sum(int(x) == -100 for x in lab) :] = 1
        out["token_type_ids"] = tt
    return out


def unpack(vlm: dict[str, torch.Tensor]) -> tuple[list[list[int]], list[list[int]]]:
    """The rows of a packed batch without padding: (prompt ids, target ids) per sample."""
    prompts, targets = [], []
    ids, labels, attn = (vlm[k].cpu() for k in ("input_ids", "labels", "attention_mask"))
    for b in range(ids.shape[0]):
        real = attn[b] == 1
        row, lab = ids[b][real], labels[b][real]
        prompts.append(row[lab == -100].tolist())
        targets.append(row[lab != -100].tolist())
    return prompts, targets


def repack(
    vlm: dict[str, torch.Tensor],
    prompts: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    pad_id: int,
) -> dict[str, torch.Tensor]:
    """`vlm` with its ids rebuilt as prompt + targets per sample (vision tensors kept)."""
    device = vlm["input_ids"].device
    rows = [list(p) + list(t) for p, t in zip(prompts, targets, strict=True)]
    labels = [[-100] * len(p) + list(t) for p, t in zip(prompts, targets, strict=True)]
    packed = pack(rows, labels, pad_id, token_types="token_type_ids" in vlm)
    return {**vlm, **{k: v.to(device) for k, v in packed.items()}}


def _action_tokenizer_json(tok, folder: Path) -> dict[str, Any] | None:
    if tok is None:
        return None
    from vlatune.policies.tokenizers import BinTokenizer

    if isinstance(tok, BinTokenizer):
        return {"kind": "bins", "n_bins": tok.n_bins, "low": tok.low, "high": tok.high}
    target = folder / ACTION_TOKENIZER_DIR
    if not (target / "processor_config.json").is_file():  # the policy folder saves it first
        tok.save(target)
    return {"kind": "fast", "path": ACTION_TOKENIZER_DIR}


def _action_tokenizer_from_json(d: dict[str, Any] | None, folder: Path):
    if d is None:
        return None
    from vlatune.policies.tokenizers import BinTokenizer, FastTokenizer

    if d["kind"] == "bins":
        return BinTokenizer(int(d["n_bins"]), float(d["low"]), float(d["high"]))
    return FastTokenizer.from_pretrained(folder / d["path"])


@register
class VLMInputs(Step):
    """Images + instruction (+ normalised actions for a tokens head) -> the hf-vlm model's
    inputs for one sample (`vlm`); see the module docstring."""

    name = "composed.vlm_inputs"

    def __init__(
        self,
        tokenizer,
        image_processor,
        model_type: str,
        image_tokens: int | None,
        cameras: Sequence[str],
        n_state: int = 0,
        n_queries: int = 0,
        film: bool = False,
        action_tokenizer=None,
    ):
        from vlatune.policies.composed.hf_vlm import make_prompt, special_ids

        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.model_type, self.image_tokens = model_type, image_tokens
        self.cameras, self.n_state, self.n_queries = list(cameras), int(n_state), int(n_queries)
        self.film, self.action_tokenizer = bool(film), action_tokenizer
        from vlatune.policies.composed.token_head import action_vocab

        self.prompt = make_prompt(model_type, tokenizer, image_processor, image_tokens)
        vocab = action_vocab(action_tokenizer) if action_tokenizer is not None else 0
        self.ids = special_ids(tokenizer, self.prompt, vocab)

    @classmethod
    def from_backbone(cls, backbone, n_state: int, n_queries: int, action_tokenizer=None):
        return cls(
            backbone.tokenizer,
            backbone.image_processor,
            backbone.model.config.model_type,
            backbone.image_tokens,
            backbone.cameras,
            n_state,
            n_queries,
            film=backbone.film is not None,
            action_tokenizer=action_tokenizer,
        )

    # ---- one sample
    def targets(self, actions: torch.Tensor | np.ndarray) -> list[int]:
        """A normalised chunk (H, A) -> `<robot_action_k>` ids + the end token."""
        chunk = torch.as_tensor(actions).detach().float().cpu().numpy()
        action_ids = self.ids["action"]
        return [action_ids[i] for i in self.action_tokenizer.encode(chunk)] + [self.ids["eos"]]

    def build(
        self,
        images: dict[str, torch.Tensor],
        image_mask: Sequence[bool] | torch.Tensor,
        instruction: str,
        actions: torch.Tensor | np.ndarray | None = None,
    ) -> dict[str, torch.Tensor]:
        """One sample's `vlm` (uint8 (3, S, S) images per camera)."""
        present = [c for i, c in enumerate(self.cameras) if bool(image_mask[i])]
        frames = [images[c].permute(1, 2, 0).cpu().numpy().astype(np.uint8) for c in present]
        vision, counts = self.prompt.vision([frames])
        if self.model_type == "smolvlm":  # (1, images, ...) -> (images, ...); collate pads
            vision = {k: v[0] for k, v in vision.items()}
        text = self.prompt.text(instruction, counts[0])
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = ids + [self.ids["state"]] * self.n_state + [self.ids["query"]] * self.n_queries
        tgt = (
            self.targets(actions)
            if self.action_tokenizer is not None and actions is not None
            else []
        )
        out = {
            "input_ids": torch.tensor(ids + tgt, dtype=torch.long),
            "labels": torch.tensor([-100] * len(ids) + tgt, dtype=torch.long),
            **vision,
            "image_count": torch.tensor(len(frames), dtype=torch.long),
        }
        if self.film:
            film = self.tokenizer(instruction, add_special_tokens=False)["input_ids"]
            out["film_ids"] = torch.tensor(film or [self.ids["pad"]], dtype=torch.long)
        return out

    def __call__(self, sample, rng):
        images = sample["images"]
        mask = sample.get("image_mask")
        if mask is None:
            mask = [True] * len(self.cameras)
        sample["vlm"] = self.build(images, mask, sample["instruction"], sample.get("actions"))
        return sample

    # ---- a batch
    def join(self, vlms: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Per-sample `vlm`s -> the batch's (see the module docstring)."""
        out = pack(
            [v["input_ids"].tolist() for v in vlms],
            [v["labels"].tolist() for v in vlms],
            self.ids["pad"],
            token_types=self.model_type == "paligemma",
        )
        if self.model_type == "smolvlm":
            n = max(int(v["pixel_values"].shape[0]) for v in vlms)
            for key in ("pixel_values", "pixel_attention_mask"):
                if key not in vlms[0]:
                    continue
                first = vlms[0][key]
                t = torch.zeros((len(vlms), n, *first.shape[1:]), dtype=first.dtype)
                for b, v in enumerate(vlms):
                    t[b, : v[key].shape[0]] = v[key]
                out[key] = t
        else:
            for key in VISION_CAT:
                if key in vlms[0]:
                    out[key] = torch.cat([v[key] for v in vlms])
        out["image_count"] = torch.stack([v["image_count"] for v in vlms])
        if self.film:
            lengths = [len(v["film_ids"]) for v in vlms]
            film = torch.full((len(vlms), max(lengths)), self.ids["pad"], dtype=torch.long)
            for b, v in enumerate(vlms):
                film[b, : lengths[b]] = v["film_ids"]
            out["film_ids"], out["film_len"] = film, torch.tensor(lengths, dtype=torch.long)
        return out

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """The processor's collate: vlatune's for the rest of the sample, `join` for `vlm`."""
        from vlatune.data.training import collate

        vlms = [s["vlm"] for s in samples]
        batch = collate([{k: v for k, v in s.items() if k != "vlm"} for s in samples])
        batch["vlm"] = self.join(vlms)
        return batch

    def describe(self) -> str:
        extra = ", action target ids" if self.action_tokenizer is not None else ""
        film = ", FiLM instruction ids" if self.film else ""
        return (
            f"{self.model_type} inputs: image processor on {self.cameras}, chat prompt with the "
            f"instruction, {self.n_state} state + {self.n_queries} query tokens{extra}{film}; "
            "collate left-pads"
        )

    def to_json(self, folder):
        vlm = Path(folder) / VLM_DIR
        if not (vlm / "tokenizer_config.json").is_file():  # the policy folder saves it first
            self.tokenizer.save_pretrained(vlm)
        if not (vlm / "preprocessor_config.json").is_file():
            self.image_processor.save_pretrained(vlm)
        return {
            "vlm": VLM_DIR,
            "model_type": self.model_type,
            "image_tokens": self.image_tokens,
            "cameras": self.cameras,
            "n_state": self.n_state,
            "n_queries": self.n_queries,
            "film": self.film,
            "action_tokenizer": _action_tokenizer_json(self.action_tokenizer, Path(folder)),
        }

    @classmethod
    def from_json(cls, d, folder):
        from transformers import AutoImageProcessor, AutoTokenizer

        vlm = Path(folder) / d["vlm"]
        if not (vlm / "tokenizer_config.json").is_file():
            raise FileNotFoundError(
                f"{Path(folder) / 'processor.json'}: step composed.vlm_inputs needs the tokenizer "
                f"in {vlm} (tokenizer_config.json missing)"
            )
        return cls(
            AutoTokenizer.from_pretrained(vlm),
            AutoImageProcessor.from_pretrained(vlm, backend="pil"),
            d["model_type"],
            d.get("image_tokens"),
            d["cameras"],
            d.get("n_state", 0),
            d.get("n_queries", 0),
            film=d.get("film", False),
            action_tokenizer=_action_tokenizer_from_json(d.get("action_tokenizer"), Path(folder)),
        )


def with_vlm_inputs(processor: Processor, step: VLMInputs) -> Processor:
    """The composed chain with `step` last and its collate (everything else kept)."""
    out = copy.copy(processor)
    out.steps = [*processor.steps, step]
    out._collate = step.collate
    return out


def vlm_step(processor: Processor) -> VLMInputs:
    for s in processor.steps:
        if isinstance(s, VLMInputs):
            return s
    raise ValueError("this processor has no composed.vlm_inputs step (not an hf-vlm policy)")


def load_processor(folder: str | Path) -> Processor:
    """A saved composed processor with its collate (hf-vlm: joins `vlm`; rdt-style: pads
    `language`): `Processor.load` takes the collate of the step that brings one."""
    return Processor.load(folder)


@register
class LanguageLookup(Step):
    """The rdt-style backbone's instruction tokens, per sample: `language` float32 (L, D), the
    T5 embedding from the shared cache (`vlatune.policies.rdt.language.LanguageEmbeddings`:
    memory, then the disk cache; an instruction in neither loads T5 once, with a warning, as
    the backbone did). `collate` zero-pads them to the longest with `language_mask` (True on a
    token). Side file: `language_embeddings.safetensors` (the policy folder writes it first)."""

    name = "composed.language"
    FILE = "language_embeddings.safetensors"

    def __init__(self, language, warn: bool = True):
        """`language`: the backbone's LanguageEmbeddings (one cache for both); `warn`: log an
        instruction that was not precomputed (policy.rdt.precompute_language)."""
        self.language, self.warn = language, bool(warn)

    def __call__(self, sample, rng):
        text = sample["instruction"]
        lang = self.language
        if text not in lang.known and self.warn:
            import logging

            logging.getLogger(__name__).warning(
                "instruction %r was not precomputed; looking it up / encoding it", text[:60]
            )
        if text not in lang.known:
            lang.encode([text])
        sample["language"] = lang.known[text][: lang.max_tokens].float()
        return sample

    @staticmethod
    def join(embs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        from vlatune.policies.rdt.language import pad_embeddings

        return pad_embeddings(embs)

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        from vlatune.data.training import collate

        embs = [s["language"] for s in samples]
        batch = collate([{k: v for k, v in s.items() if k != "language"} for s in samples])
        batch["language"], batch["language_mask"] = self.join(embs)
        return batch

    def describe(self) -> str:
        return (
            f"instruction -> T5 embedding ({self.language.encoder_id}, up to "
            f"{self.language.max_tokens} tokens; cached in {self.language.cache_dir})"
        )

    def to_json(self, folder):
        file = Path(folder) / self.FILE
        if not file.is_file() and self.language.known:  # the policy folder saves it first
            self.language.save(file)
        return {
            "encoder": self.language.encoder_id,
            "max_tokens": self.language.max_tokens,
            "cache_dir": str(self.language.cache_dir),
            "file": self.FILE,
            "warn": self.warn,
        }

    @classmethod
    def from_json(cls, d, folder):
        from vlatune.policies.rdt.language import LanguageEmbeddings

        lang = LanguageEmbeddings(d.get("encoder"), d["max_tokens"], d.get("cache_dir"))
        file = Path(folder) / d.get("file", cls.FILE)
        if file.is_file():
            lang.load(file)
        return cls(lang, warn=d.get("warn", True))


def with_language(processor: Processor, step: LanguageLookup) -> Processor:
    """The composed chain with `step` last and its collate (everything else kept)."""
    out = copy.copy(processor)
    out.steps = [*processor.steps, step]
    out._collate = step.collate
    return out
