"""Action heads: backbone features -> an action chunk (H, A), in normalised units.

- `l1` (OpenVLA-OFT): H x A learnable action queries join the backbone's sequence and are
  decoded in the same forward pass (parallel decoding, bidirectional attention); the queries of
  one timestep are concatenated and an MLP-ResNet maps them to its A values; L1 loss. With
  `queries: per_step`, one query per timestep instead (H tokens, not H x A: a shorter sequence,
  for small CPU policies), the MLP-ResNet mapping each to the A values.
- `diffusion`: epsilon prediction by an action expert, trained and sampled with a diffusers
  scheduler (DDIM, or DPM-Solver++ for few-step RDT-style sampling).
- `flow` (pi0 / GR00T): x_t = t * noise + (1 - t) * a with t ~ Beta(1.5, 1) (scaled to
  [0.001, 1]), the expert predicts the velocity noise - a, sampling integrates from t = 1 to 0
  with `flow_steps` Euler steps.

The action expert of diffusion and flow is either `joint` (action tokens and the context attend
to each other in one transformer, pi0's action expert) or `cross_attention` (self-attention over
the action tokens, cross-attention to the context; DiT / GR00T style). Loss masks come from the
data's action padding mask: padded steps past an episode's end carry no loss.

Each head: `queries(B)` (tokens to append to the backbone input, or None), `loss(out, actions,
mask) -> (loss, metrics)` and `sample(out) -> (B, H, A)`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vlatune.policies.composed.tiny import BackboneOutput


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x (B, H, ...) over the steps where mask (B, H) is True."""
    m = mask.to(x.dtype).view(*mask.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return (x * m).sum() / m.sum().clamp(min=1)


class MLPResNet(nn.Module):
    def __init__(self, din: int, width: int, dout: int, blocks: int):
        super().__init__()
        self.inp = nn.Linear(din, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU())
            for _ in range(blocks)
        )
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, dout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for b in self.blocks:
            x = x + b(x)
        return self.out(x)


class L1Head(nn.Module):
    def __init__(self, cfg, dim: int, horizon: int, action_dim: int):
        super().__init__()
        self.horizon, self.action_dim, self.dim = horizon, action_dim, dim
        per_step = cfg.queries == "per_step"
        n, width = (horizon, dim) if per_step else (horizon * action_dim, action_dim * dim)
        self.query = nn.Parameter(torch.randn(n, dim) * 0.02)
        self.mlp = MLPResNet(width, cfg.mlp_dim, action_dim, cfg.mlp_blocks)

    def queries(self, batch: int) -> torch.Tensor:
        return self.query.unsqueeze(0).expand(batch, -1, -1)

    def sample(self, out: BackboneOutput) -> torch.Tensor:
        q = out.hidden[:, -out.n_queries :]
        B = q.shape[0]
        return self.mlp(q.reshape(B, self.horizon, -1))

    def loss(self, out: BackboneOutput, actions: torch.Tensor, mask: torch.Tensor):
        pred = self.sample(out)
        l1 = masked_mean((pred - actions).abs(), mask)
        return l1, {"l1": l1.detach()}


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (B,) times (diffusion steps or flow times scaled by 1000)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ActionExpert(nn.Module):
    """(noisy chunk (B, H, A), time (B,), context) -> (B, H, A)."""

    def __init__(self, cfg, context_dim: int, horizon: int, action_dim: int):
        super().__init__()
        d = cfg.expert_dim
        self.d, self.mode = d, cfg.expert
        self.inp = nn.Linear(action_dim, d)
        self.pos = nn.Parameter(torch.randn(horizon, d) * 0.02)
        self.time = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
        self.ctx = nn.Linear(context_dim, d)
        heads = max(1, d // 32)
        if self.mode == "joint":
            layer = nn.TransformerEncoderLayer(
                d, heads, 2 * d, 0.0, batch_first=True, norm_first=True
            )
            self.net = nn.TransformerEncoder(layer, cfg.expert_layers, enable_nested_tensor=False)
        else:
            layer = nn.TransformerDecoderLayer(
                d, heads, 2 * d, 0.0, batch_first=True, norm_first=True
            )
            self.net = nn.TransformerDecoder(layer, cfg.expert_layers)
        self.out = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, action_dim))

    def forward(self, x, t, context, padding) -> torch.Tensor:
        h = self.inp(x) + self.pos + self.time(timestep_embedding(t, self.d))[:, None]
        c = self.ctx(context)
        H = h.shape[1]
        if self.mode == "joint":
            pad = torch.cat(
                [padding, torch.zeros(h.shape[:2], dtype=torch.bool, device=h.device)], 1
            )
            y = self.net(torch.cat([c, h], 1), src_key_padding_mask=pad)[:, -H:]
        else:
            y = self.net(h, c, memory_key_padding_mask=padding)
        return self.out(y)


def _context(out: BackboneOutput) -> tuple[torch.Tensor, torch.Tensor]:
    n = out.hidden.shape[1] - out.n_queries
    return out.hidden[:, :n], out.padding[:, :n]


class DiffusionHead(nn.Module):
    def __init__(self, cfg, dim: int, horizon: int, action_dim: int):
        super().__init__()
        self.cfg, self.horizon, self.action_dim = cfg, horizon, action_dim
        self.expert = ActionExpert(cfg, dim, horizon, action_dim)
        self.train_scheduler = self._scheduler("ddim")
        self.sample_scheduler = self._scheduler(cfg.sampler)

    def _scheduler(self, kind: str):
        try:
            from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
        except ImportError as e:  # pragma: no cover - a declared dependency
            raise ImportError("the diffusion head needs diffusers: pip install diffusers") from e
        common = dict(
            num_train_timesteps=self.cfg.train_steps,
            beta_schedule="squaredcos_cap_v2",
            prediction_type="epsilon",
            clip_sample=False,
        )
        if kind == "ddim":
            return DDIMScheduler(**common)
        common.pop("clip_sample")
        return DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", **common)

    def queries(self, batch: int):
        return None

    def loss(self, out: BackboneOutput, actions: torch.Tensor, mask: torch.Tensor):
        ctx, pad = _context(out)
        B = actions.shape[0]
        noise = torch.randn_like(actions)
        t = torch.randint(0, self.cfg.train_steps, (B,), device=actions.device)
        noisy = self.train_scheduler.add_noise(actions, noise, t)
        pred = self.expert(noisy, t, ctx, pad)
        mse = masked_mean((pred - noise) ** 2, mask)
        return mse, {"noise_mse": mse.detach()}

    @torch.no_grad()
    def sample(self, out: BackboneOutput) -> torch.Tensor:
        ctx, pad = _context(out)
        B = ctx.shape[0]
        sched = self.sample_scheduler
        sched.set_timesteps(self.cfg.inference_steps, device=ctx.device)
        x = torch.randn(B, self.horizon, self.action_dim, device=ctx.device)
        for t in sched.timesteps:
            eps = self.expert(x, t.expand(B), ctx, pad)
            x = sched.step(eps, t, x).prev_sample
        return x


class FlowHead(nn.Module):
    def __init__(self, cfg, dim: int, horizon: int, action_dim: int):
        super().__init__()
        self.cfg, self.horizon, self.action_dim = cfg, horizon, action_dim
        self.expert = ActionExpert(cfg, dim, horizon, action_dim)
        self.beta = torch.distributions.Beta(torch.tensor(1.5), torch.tensor(1.0))

    def queries(self, batch: int):
        return None

    def loss(self, out: BackboneOutput, actions: torch.Tensor, mask: torch.Tensor):
        ctx, pad = _context(out)
        B = actions.shape[0]
        t = (self.beta.sample((B,)) * 0.999 + 0.001).to(actions.device)
        noise = torch.randn_like(actions)
        x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * actions
        v = self.expert(x_t, t * 1000, ctx, pad)
        mse = masked_mean((v - (noise - actions)) ** 2, mask)
        return mse, {"flow_mse": mse.detach()}

    @torch.no_grad()
    def sample(self, out: BackboneOutput) -> torch.Tensor:
        ctx, pad = _context(out)
        B = ctx.shape[0]
        x = torch.randn(B, self.horizon, self.action_dim, device=ctx.device)
        K = self.cfg.flow_steps
        for k in range(K):
            t = torch.full((B,), 1.0 - k / K, device=ctx.device)
            x = x - self.expert(x, t * 1000, ctx, pad) / K
        return x


HEADS = {"l1": L1Head, "diffusion": DiffusionHead, "flow": FlowHead}
