"""OpenVLA (Prismatic) in plain torch + transformers' Llama, with OFT's parallel-decoding pass.

Architecture as `openvla/openvla` `prismatic/extern/hf/modeling_prismatic.py`, read top to bottom:

1. Vision: two timm ViTs written here in plain torch (timm imports torchvision), module names as
   the released state dict: `vision_backbone.featurizer` (DINOv2 ViT-L/14, 4 registers, class
   token, LayerScale `ls{1,2}.scale_factor`) and `vision_backbone.fused_featurizer` (SigLIP
   so400m/14, no class token, MAP head `attn_pool` that OpenVLA never runs). Each returns the
   patch tokens after its **second-to-last** block, no final norm (timm's
   `get_intermediate_layers(n={depth - 2})`); the two are concatenated on features.
2. Projector (`no-align+fused-gelu-mlp`): fc1 (V -> 4V), GELU, fc2 (-> D), GELU, fc3 (D -> D).
3. LLM: transformers' `LlamaForCausalLM` (`language_model.*`); input embeddings are
   [BOS, projected patches, rest of the text]; the patch positions get label -100.
4. Actions: greedy decoding of `action_dim` tokens; bin = clip(vocab_end - id - 1, 0, bins - 2),
   value = centre of that bin of linspace(-1, 1, n_action_bins), un-normalised with q01 / q99.

OFT (`moojink/openvla-oft`): FiLM (`film=True`: `scale` / `shift` linears in every ViT block,
`film_vit_wrapper.py`) conditions the towers on the mean language embedding;
`oft_action_hidden_states` zeroes the action-token input
embeddings, appends the proprio projector token after the patches, runs the LLM with a 4D
additive mask on stock transformers instead of OFT's patched fork, and returns the last-layer
hidden states at the chunk x action_dim positions (the last prompt token and the first
chunk x action_dim - 1 action tokens, the shifted-label positions of OFT's finetune.py and
`_regression_or_discrete_prediction`), which the heads in `oft_heads.py` turn into a chunk.
The mask is `OFTConfig.attention`: "bidirectional" (default: every position attends to every
non-padding position, our reading of the fork, which OFT pins for "bidirectional attn (for
parallel decoding)") or "action_span" (causal, bidirectional only among the action positions).
The fork's source was not available here: this choice is not yet proven against it (no fixture
covers the LLM pass of OFT).

Full size (`openvla/openvla-7b` config: 224 px, Llama-2 7B with 32,064 rows; built on the meta
device, measured): 7,541,237,184 parameters = vision 730,911,680 (DINOv2 303,230,976 + SigLIP
427,680,704, including the last blocks and SigLIP's MAP head that OpenVLA never runs) +
projector 71,385,600 + Llama 6,738,939,904.

    >>> cfg = OpenVLAConfig.from_folder("openvla-7b")
    >>> model = OpenVLAForActionPrediction(cfg)
    >>> out = model(input_ids, attention_mask, pixel_values, labels)   # logits, loss
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from vlatune.policies.openvla.configuration import IGNORE_INDEX, OFTConfig, OpenVLAConfig, ViTSpec

PROMPT = "In: What action should the robot take to {instruction}?\nOut:"
SPACE_TOKEN = 29871  # Llama's "" token that OpenVLA's prompt ends with before the action tokens
# transformers renamed `past_key_values` to `cache` (5.x); use whichever the installed one takes
_CACHE_ARG = (
    "cache"
    if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters
    else "past_key_values"
)


# ---------------------------------------------------------------------------------------------
# Vision transformer (timm 0.9.10's VisionTransformer, the parts OpenVLA uses)
# ---------------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class LayerScale(nn.Module):
    """timm's LayerScale; OpenVLA renames `gamma` to `scale_factor` (HF forbids `gamma`)."""

    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.scale_factor = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale_factor


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """timm's pre-norm block; with `film_dim`, OFT's FiLM between attention and MLP:
    x = (1 + scale(lang)) * x + shift(lang) (`FiLMedVisionTransformerBlock`)."""

    def __init__(self, spec: ViTSpec, film_dim: int | None = None):
        super().__init__()
        d = spec.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.attn = Attention(d, spec.num_heads)
        self.ls1 = LayerScale(d, spec.init_values) if spec.init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.mlp = Mlp(d, spec.mlp_hidden)
        self.ls2 = LayerScale(d, spec.init_values) if spec.init_values else nn.Identity()
        if film_dim:
            self.scale = nn.Linear(film_dim, d)
            self.shift = nn.Linear(film_dim, d)

    def forward(self, x: torch.Tensor, lang: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        if hasattr(self, "scale"):
            if lang is None:
                raise ValueError("this ViT has FiLM layers: pass the average language embedding")
            x = x * (1 + self.scale(lang)[:, None]) + self.shift(lang)[:, None]
        return x + self.ls2(self.mlp(self.norm2(x)))


class AttentionPoolLatent(nn.Module):
    """timm's MAP head of SigLIP (`attn_pool.*`): one latent query over the tokens.

    Part of the released weights; OpenVLA reads intermediate patch tokens and never runs it.
    """

    def __init__(self, spec: ViTSpec):
        super().__init__()
        d = spec.embed_dim
        self.heads = spec.num_heads
        self.latent = nn.Parameter(torch.zeros(1, 1, d))
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.proj = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.mlp = Mlp(d, spec.mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h = self.heads
        q = self.q(self.latent.expand(b, -1, -1)).reshape(b, 1, h, c // h).transpose(1, 2)
        kv = self.kv(x).reshape(b, n, 2, h, c // h).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, kv[0], kv[1]).transpose(1, 2).reshape(b, 1, c)
        y = self.proj(y)
        y = y + self.mlp(self.norm(y))
        return y[:, 0]


class VisionTransformer(nn.Module):
    def __init__(self, spec: ViTSpec, film_dim: int | None = None):
        super().__init__()
        if spec.depth < 2:
            raise ValueError(
                f"{spec.timm_id}: depth {spec.depth} < 2; OpenVLA reads the second-to-last block"
            )
        self.spec = spec
        d = spec.embed_dim
        self.patch_embed = PatchEmbed(spec.patch_size, d)
        self.num_prefix = int(spec.class_token) + spec.reg_tokens
        if spec.class_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        if spec.reg_tokens:
            self.reg_token = nn.Parameter(torch.zeros(1, spec.reg_tokens, d))
        n_pos = spec.num_patches + (0 if spec.no_embed_class else self.num_prefix)
        self.pos_embed = nn.Parameter(torch.randn(1, n_pos, d) * 0.02)
        self.blocks = nn.ModuleList(Block(spec, film_dim) for _ in range(spec.depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)
        if spec.global_pool == "map":
            self.attn_pool = AttentionPoolLatent(spec)

    def _tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels)
        b = x.shape[0]
        prefix = []
        if self.spec.class_token:
            prefix.append(self.cls_token.expand(b, -1, -1))
        if self.spec.reg_tokens:
            prefix.append(self.reg_token.expand(b, -1, -1))
        if self.spec.no_embed_class:
            x = x + self.pos_embed
            return torch.cat(prefix + [x], dim=1)
        x = torch.cat(prefix + [x], dim=1)
        return x + self.pos_embed

    def patch_features(
        self, pixels: torch.Tensor, lang: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Patch tokens after block depth-2 (0-based), prefix tokens dropped, no final norm.
        `lang` (B, D_llm): the average language embedding, for FiLM blocks."""
        x = self._tokens(pixels)
        for blk in self.blocks[: self.spec.depth - 1]:
            x = blk(x, lang)
        return x[:, self.num_prefix :]


class PrismaticVisionBackbone(nn.Module):
    def __init__(self, cfg: OpenVLAConfig, film_dim: int | None = None):
        super().__init__()
        specs = cfg.vit_specs()
        self.fused = cfg.use_fused_vision_backbone
        self.film = bool(film_dim)
        self.featurizer = VisionTransformer(specs[0], film_dim)
        self.embed_dim = specs[0].embed_dim
        if self.fused:
            self.fused_featurizer = VisionTransformer(specs[1], film_dim)
            self.embed_dim += specs[1].embed_dim
        self.num_patches = specs[0].num_patches

    def forward(self, pixel_values: torch.Tensor, lang: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 6, H, W) (DINOv2 channels 0-2, SigLIP 3-5) -> (B, patches, V)."""
        if not self.fused:
            return self.featurizer.patch_features(pixel_values, lang)
        a = self.featurizer.patch_features(pixel_values[:, :3], lang)
        b = self.fused_featurizer.patch_features(pixel_values[:, 3:], lang)
        return torch.cat([a, b], dim=2)


class PrismaticProjector(nn.Module):
    def __init__(self, fused: bool, vision_dim: int, llm_dim: int):
        super().__init__()
        self.fused = fused
        if fused:
            self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
            self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
            self.fc3 = nn.Linear(llm_dim, llm_dim)
        else:
            self.fc1 = nn.Linear(vision_dim, llm_dim)
            self.fc2 = nn.Linear(llm_dim, llm_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc2(F.gelu(self.fc1(x)))
        return self.fc3(F.gelu(x)) if self.fused else x


def llama_config(text_config: dict[str, Any]) -> LlamaConfig:
    """LlamaConfig from the released `text_config` (LlamaConfig's defaults fill the rest, as
    upstream's `CONFIG_MAPPING["llama"](**text_config)` does)."""
    kw = {k: v for k, v in text_config.items() if k not in ("model_type", "torch_dtype", "dtype")}
    return LlamaConfig(**kw)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
class OpenVLAForActionPrediction(nn.Module):
    def __init__(self, cfg: OpenVLAConfig, attn_implementation: str = "sdpa", film: bool = False):
        super().__init__()
        self.config = cfg
        lcfg = llama_config(cfg.text_config)
        # FiLM (OFT): per-block scale / shift from the average language embedding
        self.vision_backbone = PrismaticVisionBackbone(cfg, lcfg.hidden_size if film else None)
        lcfg._attn_implementation = attn_implementation
        self.projector = PrismaticProjector(
            cfg.use_fused_vision_backbone, self.vision_backbone.embed_dim, lcfg.hidden_size
        )
        self.language_model = LlamaForCausalLM(lcfg)
        bins = np.linspace(-1.0, 1.0, cfg.n_action_bins)
        self.bin_centers = (bins[:-1] + bins[1:]) / 2.0  # float64, as upstream

    # -- multimodal sequence ---------------------------------------------------------------
    def project_images(
        self, pixel_values: torch.Tensor, num_images: int = 1, lang: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, 6 * num_images, H, W) -> projected patches (B, num_images * P, D)."""
        if pixel_values.shape[1] != 6 * num_images and self.vision_backbone.fused:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[1]} channels; expected 6 per image "
                f"x {num_images} images (DINOv2 + SigLIP normalisations stacked)"
            )
        per = pixel_values.shape[1] // num_images
        feats = [self.vision_backbone(p, lang) for p in torch.split(pixel_values, per, dim=1)]
        return self.projector(torch.cat(feats, dim=1))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Logits over [BOS, patches, text[1:]] and, with labels, Llama's shifted mean CE."""
        emb = self.language_model.get_input_embeddings()(input_ids)
        patches = self.project_images(pixel_values)
        x = torch.cat([emb[:, :1], patches, emb[:, 1:]], dim=1)
        mask = None
        if attention_mask is not None:
            ones = attention_mask.new_ones(patches.shape[:2])
            mask = torch.cat([attention_mask[:, :1], ones, attention_mask[:, 1:]], dim=1).long()
        out = self.language_model(inputs_embeds=x, attention_mask=mask, use_cache=False)
        result = {"logits": out.logits, "projected_patches": patches}
        if labels is not None:
            ign = labels.new_full(patches.shape[:2], IGNORE_INDEX)
            mm_labels = torch.cat([labels[:, :1], ign, labels[:, 1:]], dim=1)
            el, loss = shifted_cross_entropy(out.logits, mm_labels)
            result.update(loss=loss, loss_elementwise=el)
        return result

    # -- action decoding -------------------------------------------------------------------
    def action_dim(self, unnorm_key: str) -> int:
        return len(self.action_stats(unnorm_key)["q01"])

    def action_stats(self, unnorm_key: str | None) -> dict[str, Any]:
        stats = self.config.norm_stats
        if unnorm_key is None:
            if len(stats) != 1:
                raise ValueError(
                    f"norm_stats has {len(stats)} datasets {sorted(stats)}: pass unnorm_key"
                )
            unnorm_key = next(iter(stats))
        if unnorm_key not in stats:
            raise ValueError(f"unnorm_key {unnorm_key!r} not in norm_stats {sorted(stats)}")
        return stats[unnorm_key]["action"]

    @torch.no_grad()
    def greedy_action_tokens(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor, n: int
    ) -> torch.Tensor:
        """Greedy decoding of `n` tokens after `input_ids` (B, P), KV-cached; (B, n) ids."""
        if not bool((input_ids[:, -1] == SPACE_TOKEN).all()):
            input_ids = torch.cat(
                [input_ids, input_ids.new_full((input_ids.shape[0], 1), SPACE_TOKEN)], 1
            )
        emb = self.language_model.get_input_embeddings()(input_ids)
        patches = self.project_images(pixel_values)
        x = torch.cat([emb[:, :1], patches, emb[:, 1:]], dim=1)
        out = self.language_model(inputs_embeds=x, use_cache=True)
        tokens = []
        for i in range(n):
            nxt = out.logits[:, -1].argmax(-1)
            tokens.append(nxt)
            if i + 1 < n:
                out = self.language_model(
                    input_ids=nxt[:, None], use_cache=True, **{_CACHE_ARG: getattr(out, _CACHE_ARG)}
                )
        return torch.stack(tokens, dim=1)

    def tokens_to_normalized(self, token_ids: torch.Tensor) -> np.ndarray:
        """OpenVLA's bin decoding: value = bin_centers[clip(vocab_end - id - 1, 0, bins - 2)]."""
        ids = token_ids.detach().cpu().numpy()
        disc = np.clip(self.config.vocab_size - ids - 1, 0, self.bin_centers.shape[0] - 1)
        return self.bin_centers[disc]

    def unnormalize(
        self, normalized: np.ndarray, unnorm_key: str | None, eps: float = 0.0
    ) -> np.ndarray:
        """q01 / q99 un-normalisation where `mask` is True (OFT adds eps = 1e-8 to the range)."""
        st = self.action_stats(unnorm_key)
        high, low = np.array(st["q99"]), np.array(st["q01"])
        mask = np.array(st.get("mask", np.ones_like(low, dtype=bool)))
        return np.where(mask, 0.5 * (normalized + 1) * (high - low + eps) + low, normalized)

    def predict_action(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor, unnorm_key: str | None = None
    ) -> tuple[np.ndarray, torch.Tensor]:
        """(B, action_dim) env-unit actions (float64) and the decoded token ids."""
        ids = self.greedy_action_tokens(input_ids, pixel_values, self.action_dim(unnorm_key))
        return self.unnormalize(self.tokens_to_normalized(ids), unnorm_key), ids

    # -- OFT parallel decoding -------------------------------------------------------------
    def oft_action_hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        labels: torch.Tensor,
        oft: OFTConfig,
        proprio_features: torch.Tensor | None = None,
        noisy_action_features: torch.Tensor | None = None,
        timestep_embedding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """OFT's LLM pass: (B, chunk * action_dim, D) last-layer hidden states for the head.

        `labels` marks the action positions (ids > vocab_end - bins - 1 among the first
        chunk * action_dim labelled tokens), as OFT's `get_current/next_action_mask`.
        `proprio_features` (B, D) from the proprio projector is one token after the patches.
        Diffusion: `noisy_action_features` (B, chunk * action_dim, D) replace the action-token
        embeddings (instead of zeros) and `timestep_embedding` (B, 1, D) is one more token after
        the proprio token, as OFT's forward / `_run_diffusion_prediction`.
        """
        emb = self.language_model.get_input_embeddings()(input_ids)
        act = oft_action_mask(labels, oft, self.config.vocab_size - self.config.n_action_bins - 1)
        emb = emb * (~act).unsqueeze(-1).to(emb.dtype)  # zeroed action-token embeddings
        if noisy_action_features is not None:
            b0, n0 = act.shape[0], oft.num_actions_chunk * oft.action_dim
            if not bool((act.sum(1) == n0).all()) or noisy_action_features.shape[:2] != (b0, n0):
                raise ValueError(
                    f"noisy_action_features {tuple(noisy_action_features.shape)} must fill the "
                    f"{act.sum(1).tolist()} action positions (expected {n0} each)"
                )
            emb = emb.masked_scatter(act.unsqueeze(-1), noisy_action_features.to(emb.dtype))
        lang = None
        if self.vision_backbone.film:  # OFT: mean input embedding of the non-action tokens
            raw = self.language_model.get_input_embeddings()(input_ids)
            counts = (~act).sum(1)
            if not bool((counts == counts[0]).all()):
                raise ValueError(
                    f"FiLM needs the same number of non-action tokens per sample, got {counts.tolist()}"
                )
            lang = raw[~act].reshape(raw.shape[0], -1, raw.shape[2]).mean(dim=1)
        patches = self.project_images(pixel_values, oft.num_images, lang)
        if proprio_features is not None:
            patches = torch.cat([patches, proprio_features[:, None].to(patches.dtype)], dim=1)
        if timestep_embedding is not None:
            patches = torch.cat([patches, timestep_embedding.to(patches.dtype)], dim=1)
        x = torch.cat([emb[:, :1], patches, emb[:, 1:]], dim=1)
        n_p = patches.shape[1]
        b, s = input_ids.shape
        # positions (in the multimodal sequence) whose hidden states are read: the position
        # before each action token (the shifted-label convention of OFT's finetune.py)
        read = torch.zeros(b, x.shape[1], dtype=torch.bool, device=x.device)
        read[:, n_p : n_p + s - 1] = act[:, 1:]
        if oft.attention == "bidirectional":  # every position sees every non-padding one
            span = torch.ones_like(read)
        else:  # "action_span": causal, except the read positions and action tokens
            span = read.clone()
            span[:, 1 + n_p :] |= act[:, 1:]
        pad = torch.cat(
            [attention_mask[:, :1], attention_mask.new_ones(b, n_p), attention_mask[:, 1:]], dim=1
        ).bool()
        mask4d = bidirectional_span_mask(span, pad, x.dtype)
        out = self.language_model.model(inputs_embeds=x, attention_mask=mask4d, use_cache=False)
        h = out.last_hidden_state
        n = oft.num_actions_chunk * oft.action_dim
        counts = read.sum(1)
        if not bool((counts == n).all()):
            raise ValueError(
                f"labels mark {counts.tolist()} action positions per sample; OFT needs "
                f"chunk x action_dim = {oft.num_actions_chunk} x {oft.action_dim} = {n}"
            )
        return h[read].reshape(b, n, -1)


def oft_action_mask(labels: torch.Tensor, oft: OFTConfig, begin_idx: int) -> torch.Tensor:
    """OFT's current | next action masks over `labels` (B, S): action ids among the first
    chunk * action_dim labelled positions."""
    cum = torch.cumsum(labels != IGNORE_INDEX, dim=1)
    in_chunk = (cum >= 1) & (cum <= oft.action_dim * oft.num_actions_chunk)
    return in_chunk & (labels > begin_idx)


def bidirectional_span_mask(
    span: torch.Tensor, keep: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Additive (B, 1, S, S) mask: causal, except that positions in `span` see each other;
    keys with keep == False (padding) are masked."""
    s = span.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=span.device).tril()
    allowed = causal[None] | (span[:, :, None] & span[:, None, :])
    allowed = allowed & keep[:, None, :]
    allowed |= torch.eye(s, dtype=torch.bool, device=span.device)[None]  # never an empty row
    m = torch.zeros(allowed.shape, dtype=dtype, device=span.device)
    m.masked_fill_(~allowed, torch.finfo(dtype).min)
    return m[:, None]


def shifted_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position CE (B, S-1) (0 where ignored) and its mean over labelled positions."""
    lg = logits[:, :-1].float()
    tgt = labels[:, 1:]
    el = F.cross_entropy(
        lg.reshape(-1, lg.shape[-1]), tgt.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).reshape(tgt.shape)
    n = (tgt != IGNORE_INDEX).sum()
    if int(n) == 0:
        raise ValueError("labels mark no position (all -100): the loss is undefined")
    return el, el.sum() / n


@torch.no_grad()
def oft_diffusion_sample(
    model: OpenVLAForActionPrediction,
    head,
    noisy_action_projector,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor,
    labels: torch.Tensor,
    oft: OFTConfig,
    noise: torch.Tensor,
    num_steps: int,
    proprio_features: torch.Tensor | None = None,
) -> torch.Tensor:
    """OFT's reverse DDIM loop from the given `noise` (B, chunk, action_dim): one LLM pass per
    step, the noisy actions embedded in place of the action tokens; normalised chunk out."""
    sched = head.noise_scheduler
    sched.set_timesteps(num_steps)
    x = noise
    for t in sched.timesteps:
        ts = torch.full((x.shape[0],), float(t), device=x.device)
        h = model.oft_action_hidden_states(
            input_ids,
            attention_mask,
            pixel_values,
            labels,
            oft,
            proprio_features,
            noisy_action_features=noisy_action_projector(x),
            timestep_embedding=head.time_embedding(ts),
        )
        x = sched.step(head.predict_noise(h), t, x).prev_sample
    return x
