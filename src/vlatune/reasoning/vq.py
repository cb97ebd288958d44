"""A small VQ-VAE over optical-flow fields: flow -> a grid of discrete codes (NORA phase C).

- Encoder: three stride-2 convolutions (64 px -> 8 x 8 = 64 codes per frame).
- Codebook (K x D) learnt with exponential moving averages of the assigned encoder outputs
  (no codebook gradient), dead-code restarts (a code whose EMA count falls below
  `dead_threshold` is moved to a random encoder output of the batch), straight-through
  estimator, commitment loss beta * ||z - sg(q)||^2.
- Decoder: the mirror of the encoder, back to (2, 64, 64).
Flows are divided by a fixed scale (the 99th percentile of the training magnitudes) and the
reconstruction loss is the mean squared error in those units; the reported error is the
end-point error (EPE) in pixels of the flow's resolution.

Saved as `model.safetensors` + `config.json`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn


@dataclass
class VQConfig:
    codebook: int = 512
    dim: int = 64
    hidden: int = 64
    size: int = 64
    decay: float = 0.99
    commitment: float = 0.25
    dead_threshold: float = 0.01
    scale: float = 1.0  # flows are divided by this


class FlowVQ(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        h, d = cfg.hidden, cfg.dim
        self.encoder = nn.Sequential(
            nn.Conv2d(2, h, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(h, h, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(h, d, 4, 2, 1),
        )  # fmt: skip
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(d, h, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(h, h, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(h, 2, 4, 2, 1),
        )  # fmt: skip
        g = torch.Generator().manual_seed(0)
        embed = torch.randn(cfg.codebook, d, generator=g) * 0.1
        self.register_buffer("embed", embed)
        self.register_buffer("embed_avg", embed.clone())
        self.register_buffer("cluster_size", torch.ones(cfg.codebook))

    # ------------------------------------------------------------------ codes
    def _assign(self, z: torch.Tensor) -> torch.Tensor:
        """z (N, D) -> nearest code ids (N,)."""
        dist = z.pow(2).sum(1, keepdim=True) - 2 * z @ self.embed.T + self.embed.pow(2).sum(1)[None]
        return dist.argmin(1)

    def _flat(self, flow: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        z = self.encoder(flow / self.cfg.scale)
        B, D, H, W = z.shape
        return z.permute(0, 2, 3, 1).reshape(-1, D), (B, H, W)

    def encode(self, flow: torch.Tensor) -> torch.Tensor:
        """flow (B, 2, S, S) in pixels -> codes (B, h * w)."""
        z, (B, H, W) = self._flat(flow)
        return self._assign(z).view(B, H * W)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        B, N = codes.shape
        side = int(round(N**0.5))
        q = self.embed[codes].view(B, side, side, -1).permute(0, 3, 1, 2)
        return self.decoder(q) * self.cfg.scale

    # ------------------------------------------------------------------ training
    def forward(self, flow: torch.Tensor) -> dict[str, torch.Tensor]:
        z, (B, H, W) = self._flat(flow)
        idx = self._assign(z.detach())
        q = self.embed[idx]
        if self.training:
            self._ema_update(z.detach(), idx)
        commit = (z - q.detach()).pow(2).mean()
        st = z + (q - z).detach()  # straight-through
        recon = self.decoder(st.view(B, H, W, -1).permute(0, 3, 1, 2))
        target = flow / self.cfg.scale
        rec = (recon - target).pow(2).mean()
        epe = ((recon - target) * self.cfg.scale).norm(dim=1).mean()
        counts = torch.bincount(idx, minlength=self.cfg.codebook).float()
        p = counts / counts.sum()
        perplexity = torch.exp(-(p * (p + 1e-10).log()).sum())
        return {
            "loss": rec + self.cfg.commitment * commit,
            "recon": rec.detach(),
            "commitment": commit.detach(),
            "epe": epe.detach(),
            "perplexity": perplexity.detach(),
            "codes": idx.view(B, H * W),
        }

    @torch.no_grad()
    def _ema_update(self, z: torch.Tensor, idx: torch.Tensor) -> None:
        c = self.cfg
        onehot = torch.zeros(z.shape[0], c.codebook, device=z.device)
        onehot.scatter_(1, idx[:, None], 1.0)
        self.cluster_size.mul_(c.decay).add_(onehot.sum(0), alpha=1 - c.decay)
        self.embed_avg.mul_(c.decay).add_(onehot.T @ z, alpha=1 - c.decay)
        n = self.cluster_size.sum()
        eps = 1e-5
        size = (self.cluster_size + eps) / (n + c.codebook * eps) * n
        self.embed.copy_(self.embed_avg / size[:, None])
        dead = self.cluster_size < c.dead_threshold
        if dead.any():  # restart dead codes at random encoder outputs of this batch
            pick = torch.randint(0, z.shape[0], (int(dead.sum()),), device=z.device)
            self.embed[dead] = z[pick]
            self.embed_avg[dead] = z[pick]
            self.cluster_size[dead] = 1.0

    # ------------------------------------------------------------------ folder
    def save(self, path: Path) -> Path:
        from safetensors.torch import save_file

        from vlatune.fsutil import atomic_dir

        with atomic_dir(Path(path)) as tmp:
            state = {k: v.contiguous() for k, v in self.state_dict().items()}
            save_file(state, tmp / "model.safetensors")
            (tmp / "config.json").write_text(
                json.dumps({"format": "vlatune-flow-vq/1", **asdict(self.cfg)}, indent=2) + "\n"
            )
        return Path(path)

    @classmethod
    def from_pretrained(cls, path: Path) -> FlowVQ:
        from safetensors.torch import load_file

        path = Path(path)
        cfg = json.loads((path / "config.json").read_text())
        cfg.pop("format", None)
        model = cls(VQConfig(**cfg))
        model.load_state_dict(load_file(path / "model.safetensors"))
        return model.eval()


def train_flow_vq(
    flows: np.ndarray,
    cfg: VQConfig,
    steps: int = 2000,
    batch: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    progress=None,
) -> tuple[FlowVQ, dict]:
    """flows (N, S, S, 2) in pixels -> a trained model and its report (EPE before/after,
    codebook usage and perplexity on all flows)."""
    torch.manual_seed(seed)
    x = torch.from_numpy(np.asarray(flows, np.float32)).permute(0, 3, 1, 2).contiguous()
    if x.shape[-1] != cfg.size:
        raise ValueError(f"flows are {x.shape[-1]} px, the VQ config expects {cfg.size}")
    mag = x.norm(dim=1).flatten()
    cfg.scale = float(max(torch.quantile(mag[:: max(1, mag.numel() // 1_000_000)], 0.99), 1e-3))
    model = FlowVQ(cfg)
    # start the codebook at encoder outputs (random init codes would mostly die at once)
    with torch.no_grad():
        z, _ = model._flat(x[torch.randperm(len(x))[: min(len(x), 256)]])
        pick = torch.randint(0, z.shape[0], (cfg.codebook,))
        model.embed.copy_(z[pick])
        model.embed_avg.copy_(z[pick])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)

    def evaluate() -> dict:
        model.eval()
        with torch.no_grad():
            outs = [model(x[i : i + 256]) for i in range(0, len(x), 256)]
        model.train()
        codes = torch.cat([o["codes"].flatten() for o in outs])
        counts = torch.bincount(codes, minlength=cfg.codebook).float()
        p = counts / counts.sum()
        w = torch.tensor([len(o["codes"]) for o in outs], dtype=torch.float32)
        epe = float((torch.stack([o["epe"] for o in outs]) * w).sum() / w.sum())
        return {
            "epe_px": round(epe, 4),
            "codebook_usage": round(float((counts > 0).float().mean()), 4),
            "perplexity": round(float(torch.exp(-(p * (p + 1e-10).log()).sum())), 2),
        }

    before = evaluate()
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(x), (min(batch, len(x)),), generator=g)
        out = model(x[idx])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        if progress:
            progress(step + 1, steps)
    after = evaluate()
    model.eval()
    report = {
        "frames": len(x),
        "steps": steps,
        "codebook": cfg.codebook,
        "scale_px": round(cfg.scale, 4),
        "zero_flow_epe_px": round(float(x.norm(dim=1).mean()), 4),
        "before": before,
        "after": after,
    }
    return model, report
