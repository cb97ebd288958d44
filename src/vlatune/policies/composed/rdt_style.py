"""`rdt` backbone: RDT-style conditioning, SigLIP image tokens + T5 instruction tokens, for a
diffusion transformer head (the `diffusion` head with `expert: cross_attention` is the DiT).
Not the released RDT-1B: that is the `vlatune.policies.rdt` family (docs/rdt.md), which loads
its weights; this module was `policies/rdt.py` before that package took the name.

- Images: a SigLIP vision tower (`policy.model_id`, a SigLIP or SigLIP-vision checkpoint),
  preprocessed by its PIL image processor; its patch tokens are projected to `policy.rdt.dim`,
  plus a learned camera embedding.
- Language: a T5 encoder (`policy.rdt.text_model_id`), token embeddings projected to the same
  width, padding masked. With `precompute_language` (the default, as RDT) each distinct
  instruction is encoded once before training and the encoder is released: embeddings are kept
  in memory, cached on disk as safetensors keyed by sha256(encoder id, max tokens, text), and
  saved with the policy (`language_embeddings.safetensors`), so evaluation needs no text encoder
  for the training instructions (an unseen instruction loads the encoder once, with a warning).
- Proprio state: one projected token.
Both encoders are frozen (RDT); `policy.lora` puts adapters on the vision tower instead.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vlatune.policies.composed.tiny import BackboneOutput
from vlatune.policies.rdt.language import LanguageEmbeddings, default_cache_dir

log = logging.getLogger(__name__)
__all__ = ["RDTBackbone", "default_cache_dir"]


class RDTBackbone(nn.Module):
    def __init__(
        self,
        cfg,
        cameras: Sequence[str],
        state_dim: int | None,
        source: str | None = None,
        text_dim: int | None = None,
    ):
        """`source`: a folder with the vision tower's config and image processor, whose weights
        come from a saved policy (None: load `policy.model_id` with its weights).
        `text_dim`: the T5 width when known (a saved policy), else read from its config."""
        super().__init__()
        from transformers import (
            AutoConfig,
            AutoImageProcessor,
            SiglipVisionConfig,
            SiglipVisionModel,
        )

        r = cfg.rdt
        self.cfg, self.cameras, self.r = cfg, list(cameras), r
        self.text_id = r.text_model_id
        model_id = source or cfg.model_id
        try:
            conf = AutoConfig.from_pretrained(model_id)
            self.image_processor = AutoImageProcessor.from_pretrained(model_id, backend="pil")
        except OSError as e:
            raise FileNotFoundError(
                f"policy.model_id {cfg.model_id!r} (SigLIP) cannot be loaded ({e}); give a local "
                "folder or make the hub reachable"
            ) from None
        vconf = getattr(conf, "vision_config", conf)
        if not isinstance(vconf, SiglipVisionConfig):
            raise ValueError(
                f"policy.model_id {cfg.model_id!r} is a '{conf.model_type}' model; the rdt "
                "backbone needs a SigLIP vision tower"
            )
        self.vision = (
            SiglipVisionModel(vconf) if source else SiglipVisionModel.from_pretrained(model_id)
        )
        d = r.dim
        self.dim = d
        self.vision_proj = nn.Linear(vconf.hidden_size, d)
        self.camera_embed = nn.Parameter(torch.randn(len(self.cameras), d) * 0.02)
        self.text_dim = text_dim or self._text_config().d_model
        self.text_proj = nn.Linear(self.text_dim, d)
        self.state_proj = (
            nn.Sequential(nn.Linear(state_dim, d), nn.GELU(), nn.Linear(d, d))
            if state_dim
            else None
        )
        self.vision.requires_grad_(False)
        # the rdt family's cache (same keys and files): memory, disk, then T5 (kept out of the
        # module tree: never saved, never trained; loaded on demand)
        self.lang = LanguageEmbeddings(
            self.text_id, r.max_text_tokens, r.language_cache, setting="policy.rdt.text_model_id"
        )
        if not r.precompute_language:
            self.lang._load_encoder()

    @property
    def language(self) -> dict[str, torch.Tensor]:
        """instruction -> (L, D) float32 T5 embedding, for the instructions known so far."""
        return self.lang.known

    @property
    def cache_dir(self) -> Path:
        return self.lang.cache_dir

    @property
    def _text_encoder(self):
        return self.lang._enc

    # ------------------------------------------------------------------ language
    def _text_config(self):
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(self.text_id)
        except OSError as e:
            raise FileNotFoundError(
                f"policy.rdt.text_model_id {self.text_id!r} (T5) cannot be loaded ({e})"
            ) from None

    def release_text_encoder(self) -> None:
        self.lang.release()

    def encode_texts(self, texts: Iterable[str]) -> int:
        """Embed every text not yet known (memory, then disk cache, then the encoder).
        Returns how many went through the encoder."""
        return self.lang.encode(texts)

    def _language_tokens(self, texts: Sequence[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        missing = list(dict.fromkeys(t for t in texts if t not in self.language))
        if missing:
            if self.r.precompute_language:
                log.warning(
                    "instruction(s) %s were not precomputed; loading the text encoder", missing[:3]
                )
            self.encode_texts(missing)
        out, mask = self.lang.batch(texts, self.r.max_text_tokens, device=device)
        return out, ~mask

    # ------------------------------------------------------------------ forward
    def _pixels(self, frames: torch.Tensor) -> torch.Tensor:
        arr = [f.permute(1, 2, 0).cpu().numpy().astype(np.uint8) for f in frames]
        px = self.image_processor(images=arr, return_tensors="pt")["pixel_values"]
        return px.to(frames.device, self.vision.dtype)

    def forward(
        self,
        images: dict[str, torch.Tensor],
        image_mask: torch.Tensor,
        state: torch.Tensor | None,
        instructions: Sequence[str],
        queries: torch.Tensor | None = None,
        language: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> BackboneOutput:
        """`language`: the batch's (embeddings (B, L, D), mask (B, L) True on a token) from the
        processor step `composed.language`; None looks the instructions up here."""
        if queries is not None:
            raise ValueError("the rdt backbone feeds the diffusion / flow heads (no query tokens)")
        device = self.camera_embed.device
        tokens, pads = [], []
        for i, cam in enumerate(self.cameras):
            feats = self.vision(pixel_values=self._pixels(images[cam])).last_hidden_state
            tok = self.vision_proj(feats.float()) + self.camera_embed[i]
            tokens.append(tok)
            pads.append((~image_mask[:, i].to(device))[:, None].expand(-1, tok.shape[1]))
        if language is not None:
            text, text_pad = language[0].to(device), ~language[1].to(device)
        else:
            text, text_pad = self._language_tokens(list(instructions), device)
        tokens.append(self.text_proj(text))
        pads.append(text_pad)
        if state is not None and self.state_proj is not None:
            tokens.append(self.state_proj(state.float())[:, None])
            pads.append(torch.zeros(state.shape[0], 1, dtype=torch.bool, device=device))
        hidden = torch.cat(tokens, 1)
        padding = torch.cat(pads, 1)
        valid = (~padding).float()[..., None]
        pooled = (hidden * valid).sum(1) / valid.sum(1).clamp(min=1)
        return BackboneOutput(hidden=hidden, padding=padding, pooled=pooled, n_queries=0)

    # ------------------------------------------------------------------ LoRA
    def lora_target_names(self, spec) -> list[str]:
        if spec != "all-linear":
            return list(spec)
        return sorted(
            f"vision.{n}" for n, m in self.vision.named_modules() if isinstance(m, nn.Linear)
        )

    @staticmethod
    def trained_under_lora(name: str) -> bool:
        return not name.startswith("vision.")

    # ------------------------------------------------------------------ saving
    def save_language(self, path: Path) -> None:
        """`language_embeddings.safetensors` (the rdt family's format); nothing when empty."""
        if self.language:
            self.lang.save(Path(path))

    def load_language(self, path: Path) -> None:
        if Path(path).is_file():
            self.lang.load(Path(path))
