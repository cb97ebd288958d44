"""`tiny`: a from-scratch vision-language-state encoder that trains on a CPU in minutes.

Per camera a small conv net (shared weights, GroupNorm, stride 16 in total, first layer
`width` channels) pooled to `tokens_per_side`^2 image tokens, plus learned position and camera
embeddings, and optionally one token of spatial-softmax keypoint coordinates; the instruction as
hashed word embeddings (no tokenizer download: a word's bucket is crc32(word) % vocab); the
proprio state as one token (the proprio projector); optional FiLM of the image features on the
mean word embedding. A bidirectional transformer encoder runs over
[image tokens, word tokens, state token, extra query tokens]; a dropped camera's tokens (camera
dropout) and padding words are masked out of attention.

    >>> enc = TinyBackbone(TinyConfig(), cameras=["agentview"], image_size=96, state_dim=8)
    >>> out = enc(images, image_mask, state, instructions)   # out.hidden: (B, N, dim)
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

_WORD = re.compile(r"[a-z0-9]+")


def hash_words(
    texts: Sequence[str], vocab: int, max_words: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts -> (ids (B, W), valid (B, W)); bucket 0 is padding."""
    ids = torch.zeros(len(texts), max_words, dtype=torch.long)
    valid = torch.zeros(len(texts), max_words, dtype=torch.bool)
    for b, text in enumerate(texts):
        words = _WORD.findall(text.lower())[:max_words]
        for i, w in enumerate(words):
            ids[b, i] = 1 + zlib.crc32(w.encode()) % (vocab - 1)
            valid[b, i] = True
    return ids, valid


def relu(x: torch.Tensor) -> torch.Tensor:
    """ReLU as a plain function: torch's transformer layers take their fused inference fast
    path only for F.relu / F.gelu, and that path reads linear1/linear2 weights directly, which
    would skip LoRA adapters at evaluation. Same maths, always the regular path."""
    return nn.functional.relu(x)


def _conv(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=2, padding=k // 2),
        nn.GroupNorm(8, cout),
        nn.GELU(),
    )


class ConvEncoder(nn.Module):
    """uint8-range image (B, 3, S, S) -> feature map (B, dim, S/16, S/16), and with
    `keypoints` > 0 also spatial-softmax keypoints of the S/8 map (B, keypoints, 2), the
    expected image coordinates in [-1, 1] of each of `keypoints` learned feature maps (as in
    Levine et al.'s visuomotor policies and robomimic): explicit positions for the action head."""

    def __init__(self, dim: int, width: int = 32, keypoints: int = 0):
        super().__init__()
        w = width
        self.stem = nn.Sequential(_conv(3, w, 5), _conv(w, 2 * w, 3), _conv(2 * w, 4 * w, 3))
        self.last = nn.Conv2d(4 * w, dim, 3, stride=2, padding=1)
        self.keypoints = nn.Conv2d(4 * w, keypoints, 1) if keypoints else None
        self.norm = nn.GroupNorm(8, dim)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        self.register_buffer("mean", mean * 255, persistent=False)
        self.register_buffer("std", std * 255, persistent=False)

    def forward(self, x: torch.Tensor, film: tuple[torch.Tensor, torch.Tensor] | None = None):
        x = (x.float() - self.mean) / self.std
        mid = self.stem(x)
        x = self.norm(self.last(mid))
        if film is not None:
            gamma, beta = film
            x = x * (1 + gamma[:, :, None, None]) + beta[:, :, None, None]
        return nn.functional.gelu(x), (self._spatial_softmax(mid) if self.keypoints else None)

    def _spatial_softmax(self, fmap: torch.Tensor) -> torch.Tensor:
        k = self.keypoints(fmap)  # (B, K, h, w)
        B, K, h, w = k.shape
        attn = k.flatten(2).softmax(-1).view(B, K, h, w)
        ys = torch.linspace(-1, 1, h, device=k.device)
        xs = torch.linspace(-1, 1, w, device=k.device)
        return torch.stack([(attn.sum(2) * xs).sum(-1), (attn.sum(3) * ys).sum(-1)], -1)


@dataclass
class BackboneOutput:
    hidden: torch.Tensor  # (B, N, dim), the last layer
    padding: torch.Tensor  # (B, N) True where a token is masked out
    pooled: torch.Tensor  # (B, dim): mean over the valid context tokens
    n_queries: int  # the last n_queries tokens are the queries passed in


class TinyBackbone(nn.Module):
    def __init__(self, cfg, cameras: Sequence[str], image_size: int, state_dim: int | None):
        super().__init__()
        self.cfg, self.cameras = cfg, list(cameras)
        d = cfg.dim
        self.dim = d
        self.conv = ConvEncoder(d, cfg.width, cfg.keypoints)
        self.keypoint_proj = (
            nn.Sequential(nn.Linear(2 * cfg.keypoints, d), nn.GELU(), nn.Linear(d, d))
            if cfg.keypoints
            else None
        )
        side = cfg.tokens_per_side
        if image_size // 16 < side:
            raise ValueError(
                f"policy.tiny.tokens_per_side={side} needs data.image_size >= {16 * side}"
            )
        self.pool = nn.AdaptiveAvgPool2d(side)
        self.image_pos = nn.Parameter(torch.randn(side * side, d) * 0.02)
        self.camera_embed = nn.Parameter(torch.randn(len(self.cameras), d) * 0.02)
        self.words = nn.Embedding(cfg.vocab, d, padding_idx=0)
        self.word_pos = nn.Parameter(torch.randn(cfg.max_words, d) * 0.02)
        self.film = nn.Linear(d, 2 * d) if cfg.film else None
        if self.film is not None:
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)
        self.state_proj = (
            nn.Sequential(nn.Linear(state_dim, d), nn.GELU(), nn.Linear(d, d))
            if state_dim
            else None
        )
        layer = nn.TransformerEncoderLayer(
            d,
            cfg.heads,
            2 * d,
            dropout=cfg.dropout,
            activation=relu,
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)

    def forward(
        self,
        images: dict[str, torch.Tensor],
        image_mask: torch.Tensor,
        state: torch.Tensor | None,
        instructions: Sequence[str],
        queries: torch.Tensor | None = None,
    ) -> BackboneOutput:
        ref = next(iter(images.values()))
        B, device = ref.shape[0], ref.device
        ids, valid = hash_words(instructions, self.cfg.vocab, self.cfg.max_words)
        ids, valid = ids.to(device), valid.to(device)
        words = self.words(ids) + self.word_pos
        film = None
        if self.film is not None:
            text = (words * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp(min=1)
            film = self.film(text).chunk(2, dim=-1)
        # all cameras through the conv net as one batch
        stacked = torch.cat([images[c] for c in self.cameras], 0)
        if film is not None:
            film = tuple(f.repeat(len(self.cameras), 1) for f in film)
        fmap, points = self.conv(stacked, film)
        tok = self.pool(fmap).flatten(2).transpose(1, 2) + self.image_pos  # (C*B, s*s, d)
        if points is not None:  # one more token per camera: its keypoint coordinates
            tok = torch.cat([tok, self.keypoint_proj(points.flatten(1))[:, None]], 1)
        tok = tok.view(len(self.cameras), B, -1, self.dim) + self.camera_embed[:, None, None]
        n_img = tok.shape[2]
        image_tokens = tok.permute(1, 0, 2, 3).reshape(B, -1, self.dim)
        image_pad = (~image_mask.to(device)).repeat_interleave(n_img, dim=1)
        parts, pads = [image_tokens, words], [image_pad, ~valid]
        if self.state_proj is not None and state is not None:
            parts.append(self.state_proj(state.float())[:, None])
            pads.append(torch.zeros(B, 1, dtype=torch.bool, device=device))
        n_q = 0
        if queries is not None:
            n_q = queries.shape[1]
            parts.append(queries)
            pads.append(torch.zeros(B, n_q, dtype=torch.bool, device=device))
        x = torch.cat(parts, 1)
        padding = torch.cat(pads, 1)
        h = self.norm(self.encoder(x, src_key_padding_mask=padding))
        ctx_valid = (~padding[:, : h.shape[1] - n_q]).float()[..., None]
        pooled = (h[:, : h.shape[1] - n_q] * ctx_valid).sum(1) / ctx_valid.sum(1).clamp(min=1)
        return BackboneOutput(h, padding, pooled, n_q)
