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

import hashlib
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vlatune.policies.composed.tiny import BackboneOutput

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vlatune" / "language"


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
        self._text_encoder = None  # loaded on demand
        self._tokenizer = None
        self.language: dict[str, torch.Tensor] = {}
        self.cache_dir = Path(r.language_cache) if r.language_cache else default_cache_dir()
        if not r.precompute_language:
            self._load_text_encoder()

    # ------------------------------------------------------------------ language
    def _text_config(self):
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(self.text_id)
        except OSError as e:
            raise FileNotFoundError(
                f"policy.rdt.text_model_id {self.text_id!r} (T5) cannot be loaded ({e})"
            ) from None

    def _load_text_encoder(self):
        from transformers import AutoTokenizer, T5EncoderModel

        if self._text_encoder is None:
            self._tokenizer = AutoTokenizer.from_pretrained(self.text_id)
            enc = T5EncoderModel.from_pretrained(self.text_id).eval()
            enc.requires_grad_(False)
            # kept out of the module tree: never saved, never trained
            object.__setattr__(self, "_text_encoder", enc)
        return self._tokenizer, self._text_encoder

    def _key(self, text: str) -> str:
        h = hashlib.sha256(f"{self.text_id}\n{self.r.max_text_tokens}\n{text}".encode())
        return h.hexdigest()[:32]

    def release_text_encoder(self) -> None:
        object.__setattr__(self, "_text_encoder", None)

    @torch.no_grad()
    def encode_texts(self, texts: Iterable[str]) -> int:
        """Embed every text not yet known (memory, then disk cache, then the encoder).
        Returns how many went through the encoder."""
        from safetensors.torch import load_file, save_file

        todo = []
        for t in dict.fromkeys(texts):
            if t in self.language:
                continue
            f = self.cache_dir / f"{self._key(t)}.safetensors"
            if f.is_file():
                self.language[t] = load_file(f)["embeddings"]
            else:
                todo.append(t)
        if todo:
            tok, enc = self._load_text_encoder()
            for i in range(0, len(todo), 16):
                part = todo[i : i + 16]
                batch = tok(
                    part,
                    padding=True,
                    truncation=True,
                    max_length=self.r.max_text_tokens,
                    return_tensors="pt",
                )
                hidden = enc(**batch).last_hidden_state.float()
                for j, t in enumerate(part):
                    emb = hidden[j, : int(batch["attention_mask"][j].sum())].contiguous()
                    self.language[t] = emb
                    self.cache_dir.mkdir(parents=True, exist_ok=True)
                    f = self.cache_dir / f"{self._key(t)}.safetensors"
                    tmp = f.with_name(f".{f.name}.{os.getpid()}.tmp")
                    save_file(
                        {"embeddings": emb}, tmp, metadata={"text": t, "encoder": self.text_id}
                    )
                    tmp.replace(f)
        return len(todo)

    def _language_tokens(self, texts: Sequence[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        missing = list(dict.fromkeys(t for t in texts if t not in self.language))
        if missing:
            if self.r.precompute_language:
                log.warning(
                    "instruction(s) %s were not precomputed; loading the text encoder", missing[:3]
                )
            self.encode_texts(missing)
        embs = [self.language[t] for t in texts]
        L = max(e.shape[0] for e in embs)
        out = torch.zeros(len(texts), L, embs[0].shape[1])
        pad = torch.ones(len(texts), L, dtype=torch.bool)
        for b, e in enumerate(embs):
            out[b, : e.shape[0]] = e
            pad[b, : e.shape[0]] = False
        return out.to(device), pad.to(device)

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
    ) -> BackboneOutput:
        if queries is not None:
            raise ValueError("the rdt backbone feeds the diffusion / flow heads (no query tokens)")
        device = self.camera_embed.device
        tokens, pads = [], []
        for i, cam in enumerate(self.cameras):
            feats = self.vision(pixel_values=self._pixels(images[cam])).last_hidden_state
            tok = self.vision_proj(feats.float()) + self.camera_embed[i]
            tokens.append(tok)
            pads.append((~image_mask[:, i].to(device))[:, None].expand(-1, tok.shape[1]))
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
        from safetensors.torch import save_file

        if not self.language:
            return
        texts = sorted(self.language)
        tensors = {f"t{i}": self.language[t].contiguous() for i, t in enumerate(texts)}
        import json

        save_file(tensors, path, metadata={"texts": json.dumps(texts), "encoder": self.text_id})

    def load_language(self, path: Path) -> None:
        import json

        from safetensors import safe_open

        if not path.is_file():
            return
        with safe_open(str(path), framework="pt") as f:
            texts = json.loads(f.metadata()["texts"])
            for i, t in enumerate(texts):
                self.language[t] = f.get_tensor(f"t{i}")
