"""Precomputed T5 instruction embeddings for the `rdt` family, as RDT does.

The one implementation of that cache: the composed family's rdt-style backbone
(`vlatune.policies.composed.rdt_style.RDTBackbone`) uses this class too, so the two share it:

- each distinct instruction is encoded once (memory, then the disk cache, then the encoder);
- the disk cache is one safetensors file per text, `{"embeddings": (L, D)}`, named by
  sha256(encoder id, max tokens, text)[:32] under `~/.cache/vlatune/language` (or the
  configured folder), written under a temporary name then renamed;
- a policy saves the embeddings it knows as `language_embeddings.safetensors` (tensors `t<i>`,
  metadata `texts` (JSON list) and `encoder`), so evaluation needs no T5 for trained instructions.

The encoder is kept out of the module tree (never saved, never trained) and released after
`encode`. The embeddings are the encoder's last hidden state at the real tokens (padding cut).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)
FILE = "language_embeddings.safetensors"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vlatune" / "language"


def pad_embeddings(embs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-text (L_i, D) embeddings -> (B, L, D) zero-padded at the end + (B, L) bool mask
    (True on a token)."""
    L = max(e.shape[0] for e in embs)
    out = torch.zeros(len(embs), L, embs[0].shape[1])
    mask = torch.zeros(len(embs), L, dtype=torch.bool)
    for b, e in enumerate(embs):
        out[b, : e.shape[0]] = e
        mask[b, : e.shape[0]] = True
    return out, mask


class LanguageEmbeddings:
    """Instruction -> (L, D) float32 T5 embedding, with the encoder loaded only when needed."""

    def __init__(
        self,
        encoder: str | None,
        max_tokens: int,
        cache_dir: str | Path | None = None,
        setting: str = "policy.text_encoder",
    ) -> None:
        """`setting`: the config key naming the encoder (in the error when it cannot load)."""
        self.encoder_id, self.max_tokens, self.setting = encoder, int(max_tokens), setting
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.known: dict[str, torch.Tensor] = {}
        self._tok = self._enc = None

    def key(self, text: str) -> str:
        h = hashlib.sha256(f"{self.encoder_id}\n{self.max_tokens}\n{text}".encode())
        return h.hexdigest()[:32]

    @property
    def encoder_loaded(self) -> bool:
        return self._enc is not None

    def _load_encoder(self):
        if self._enc is None:
            if not self.encoder_id:
                raise RuntimeError("no text encoder configured")
            from transformers import AutoTokenizer, T5EncoderModel

            try:
                self._tok = AutoTokenizer.from_pretrained(self.encoder_id)
                enc = T5EncoderModel.from_pretrained(self.encoder_id).eval()
            except OSError as e:
                raise FileNotFoundError(
                    f"{self.setting} {self.encoder_id!r} (T5) cannot be loaded ({e}); give a "
                    "local folder or make the hub reachable"
                ) from None
            self._enc = enc.requires_grad_(False)
        return self._tok, self._enc

    def release(self) -> None:
        self._tok = self._enc = None

    @torch.no_grad()
    def encode(self, texts: Iterable[str]) -> int:
        """Embed every text not yet known; returns how many went through the encoder."""
        from safetensors.torch import load_file, save_file

        todo = []
        for t in dict.fromkeys(texts):
            if t in self.known:
                continue
            f = self.cache_dir / f"{self.key(t)}.safetensors"
            if f.is_file():
                self.known[t] = load_file(f)["embeddings"]
            else:
                todo.append(t)
        if not todo:
            return 0
        tok, enc = self._load_encoder()
        for i in range(0, len(todo), 16):
            part = todo[i : i + 16]
            batch = tok(
                part, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
            )
            hidden = enc(**batch).last_hidden_state.float()
            for j, t in enumerate(part):
                emb = hidden[j, : int(batch["attention_mask"][j].sum())].contiguous()
                self.known[t] = emb
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                f = self.cache_dir / f"{self.key(t)}.safetensors"
                tmp = f.with_name(f".{f.name}.{os.getpid()}.tmp")
                save_file(
                    {"embeddings": emb}, tmp, metadata={"text": t, "encoder": str(self.encoder_id)}
                )
                tmp.replace(f)
        return len(todo)

    def batch(
        self, texts: Sequence[str], max_len: int, device=None, dtype=torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, D) embeddings padded with zeros and the (B, L) bool mask (True = a token)."""
        missing = list(dict.fromkeys(t for t in texts if t not in self.known))
        if missing:
            if not self.encoder_id:
                raise KeyError(
                    f"instruction(s) {missing[:3]} have no precomputed T5 embedding in this "
                    "policy and no text encoder is configured: set policy.text_encoder (a T5 "
                    "folder) to embed unseen instructions"
                )
            log.warning(
                "instruction(s) %s were not precomputed; loading the T5 encoder", missing[:3]
            )
            self.encode(missing)
        out, mask = pad_embeddings([self.known[t][:max_len] for t in texts])
        return out.to(device=device, dtype=dtype), mask.to(device)

    # ---- travelling with the policy
    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        texts = sorted(self.known)
        tensors = {f"t{i}": self.known[t].contiguous() for i, t in enumerate(texts)}
        meta = {"texts": json.dumps(texts), "encoder": str(self.encoder_id)}
        save_file(tensors, str(path), metadata=meta)

    def load(self, path: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            texts = json.loads(f.metadata()["texts"])
            for i, t in enumerate(texts):
                self.known[t] = f.get_tensor(f"t{i}")
