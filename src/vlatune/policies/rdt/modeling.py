"""RDT (Robotics Diffusion Transformer, Liu et al. 2024): the released `RDTRunner`, read top to
bottom.

Follows thu-ml/RoboticsDiffusionTransformer @ deb71d8 (`models/rdt/blocks.py`,
`models/rdt/model.py`, `models/rdt_runner.py`), written anew; module names are the released
ones, so `pytorch_model.bin` of `robotics-diffusion-transformer/rdt-1b` loads with strict=True
(see convert.py).

- Conditions (computed outside: T5-XXL embeddings of the instruction, SigLIP patch features of
  2 frames x 3 cameras) go through MLP adaptors (`mlp2x_gelu`) to the hidden width.
- The denoised sequence is [timestep, control frequency, state, action chunk]: the state and each
  noisy action are a 128-d unified vector concatenated with its 0/1 mask (256 inputs) through the
  state adaptor (`mlp3x_gelu`); the timestep and the control frequency are sinusoidal embeddings
  through their own MLPs. Fixed-at-init (then trained) sin-cos position embeddings are added to
  the sequence and to both conditions.
- Each block: RMSNorm -> self-attention (q/k RMSNorm) -> RMSNorm -> cross-attention to the
  language tokens (even blocks, padding masked) or the image tokens (odd blocks) -> RMSNorm ->
  GELU(tanh) MLP, each with a residual; a final RMSNorm + MLP maps the action tokens to 128-d.
- Training: DDPM forward noising, the network predicts the clean chunk (`prediction_type:
  sample`), loss = mean squared error over all 128 dims (unmasked, as upstream). Sampling:
  DPM-Solver++ (diffusers `DPMSolverMultistepScheduler`), 5 steps, result times the action mask.

RMSNorm is timm 1.0.3's, which RDT pins and was trained with: without apex it normalises by the
*unbiased variance* over the last axis, `x * rsqrt(var(x) + 1e-6) * w`, not by the mean square
(timm fixed this later). The reference fixture confirms it; `RmsNorm` reproduces it. That is also
why no transformers RMSNorm is reused; attention is `torch.nn.functional.scaled_dot_product_attention`,
as timm's fused path.

Full size (the released config, `RDTRunner(RDTConfig())` built on the meta device, measured):
1,228,319,872 parameters: transformer 1,200,256,128 (of which 11,192,320 position-embedding
entries), adaptors 28,063,744 (language 12,587,008, image 6,557,696, state 8,919,040).

    >>> model = RDTRunner(RDTConfig.from_json("rdt-1b/config.json"))
    >>> out = model.compute_loss(lang, lang_mask, img, state, actions, action_mask, ctrl_freqs)
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlatune.policies.rdt.configuration import RDTConfig

# ----------------------------------------------------------------------------------------------
# Layers


class RmsNorm(nn.Module):
    """timm 1.0.3 `RmsNorm` (no apex): `x * rsqrt(var(x, unbiased) + eps) * weight`."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = torch.var(x, dim=-1, keepdim=True)
        return x * torch.rsqrt(v + self.eps) * self.weight


class Mlp(nn.Module):
    """Linear -> GELU(tanh) -> Linear (timm's `Mlp` names: fc1, fc2)."""

    def __init__(self, dim: int, hidden: int, out: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SelfAttention(nn.Module):
    """timm `Attention` with qkv bias and per-head q/k RMSNorm (names: qkv, q_norm, k_norm, proj)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm = RmsNorm(self.head_dim)
        self.k_norm = RmsNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, head_dim)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class CrossAttention(nn.Module):
    """Queries from the sequence, keys / values from a condition; `mask` (B, L) True = attend."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.q_norm = RmsNorm(self.head_dim)
        self.k_norm = RmsNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        B, N, C = x.shape
        L = c.shape[1]
        q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.kv(c).reshape(B, L, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if mask is not None:
            # A boolean mask (a float 0/1 mask would be *added* to the scores by SDPA).
            mask = mask.to(torch.bool).reshape(B, 1, 1, L)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class RDTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm1 = RmsNorm(dim)
        self.attn = SelfAttention(dim, num_heads)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.norm2 = RmsNorm(dim)
        self.ffn = Mlp(dim, dim)
        self.norm3 = RmsNorm(dim)

    def forward(self, x, c, mask=None):
        x = x + self.attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), c, mask)
        return x + self.ffn(self.norm3(x))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out: int):
        super().__init__()
        self.norm_final = RmsNorm(dim)
        self.ffn_final = Mlp(dim, dim, out)

    def forward(self, x):
        return self.ffn_final(self.norm_final(x))


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding (GLIDE: cos half then sin half, 256 wide) -> Linear -> SiLU -> Linear.
    Used for the diffusion timestep and, with its own weights, the control frequency."""

    def __init__(self, dim: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, dim), nn.SiLU(), nn.Linear(dim, dim)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_embedding_size // 2
        freqs = torch.exp(
            -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


# ----------------------------------------------------------------------------------------------
# Sin-cos position embeddings (MAE's 1-D embedding; RDT's multimodal / n-d grid layout)


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, dim): sin over the first half, cos over the second (MAE)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", np.asarray(positions, dtype=np.float64).reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_grid(dim: int, grid: tuple[int, ...]) -> np.ndarray:
    """An embedding over an n-d grid: the width is split evenly (rounded down to even) among the
    axes longer than 1, each axis getting a 1-D embedding of its index; axes of length 1 get none."""
    emb = np.zeros((*grid, dim))
    used = [i for i, n in enumerate(grid) if n > 1]
    if not used:
        return emb
    part = dim // len(used)
    part -= part % 2
    for j, axis in enumerate(used):
        shape = [1] * len(grid) + [part]
        shape[axis] = -1
        emb[..., j * part : (j + 1) * part] += sincos_1d(part, np.arange(grid[axis])).reshape(shape)
    return emb


def multimodal_pos_embed(dim: int, lens: OrderedDict, embed_modality: bool = True) -> np.ndarray:
    """Concatenated embeddings of several modalities, (sum of lengths, dim).

    With `embed_modality`, the first half of the width embeds the modality's index and the second
    half the position inside it; without, the whole width is the position. A negative length (or
    grid axis, for "image") means that many tokens with no position embedding along it."""
    names = list(lens)
    modality = np.zeros((len(names), dim))
    if embed_modality:
        modality[:, : dim // 2] = sincos_1d(dim // 2, np.arange(len(names)))
        pos_dim = dim // 2
    else:
        pos_dim = dim
    parts = []
    for idx, name in enumerate(names):
        n = lens[name]
        if name == "image" and isinstance(n, (tuple, list)):
            full = tuple(abs(x) for x in n)
            embedded = tuple(x if x > 0 else 1 for x in n)
            e = np.zeros((*full, dim))
            e[..., -pos_dim:] += sincos_grid(pos_dim, embedded)
            e = e.reshape(-1, dim)
        else:
            e = np.zeros((abs(n), dim))
            e[:, -pos_dim:] += sincos_1d(pos_dim, np.arange(n if n > 0 else 1))
        parts.append(e + modality[idx])
    return np.concatenate(parts, axis=0) if parts else np.zeros((0, dim))


# ----------------------------------------------------------------------------------------------
# The transformer


class RDT(nn.Module):
    """The diffusion transformer over [t, freq, state, action_1..H] (upstream `models.rdt.model.RDT`)."""

    def __init__(self, cfg: RDTConfig):
        super().__init__()
        D, H = cfg.hidden_size, cfg.pred_horizon
        self.cfg, self.horizon = cfg, H
        self.t_embedder = TimestepEmbedder(D)
        self.freq_embedder = TimestepEmbedder(D)
        self.x_pos_embed = nn.Parameter(torch.zeros(1, H + 3, D))
        self.lang_cond_pos_embed = nn.Parameter(torch.zeros(1, cfg.max_lang_cond_len, D))
        self.img_cond_pos_embed = nn.Parameter(torch.zeros(1, cfg.img_cond_len, D))
        self.blocks = nn.ModuleList(RDTBlock(D, cfg.rdt.num_heads) for _ in range(cfg.rdt.depth))
        self.final_layer = FinalLayer(D, cfg.action_dim)

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Upstream's initialisation: xavier-uniform linears with zero bias, sin-cos position
        embeddings, N(0, 0.02) timestep / frequency MLPs, a zero last linear."""
        cfg, D = self.cfg, self.cfg.hidden_size
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, RmsNorm):
                nn.init.ones_(m.weight)
        x_lens = OrderedDict(timestep=1, ctrl_freq=1, state=1, action=self.horizon)
        self.x_pos_embed.copy_(_t(multimodal_pos_embed(D, x_lens)))
        for param, conf, n in (
            (self.lang_cond_pos_embed, cfg.lang_pos_embed_config, cfg.max_lang_cond_len),
            (self.img_cond_pos_embed, cfg.img_pos_embed_config, cfg.img_cond_len),
        ):
            if conf is None:
                emb = sincos_1d(D, np.arange(n))
            else:
                emb = multimodal_pos_embed(D, OrderedDict(conf), embed_modality=False)
            param.copy_(_t(emb))
        for emb in (self.t_embedder, self.freq_embedder):
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        nn.init.zeros_(self.final_layer.ffn_final.fc2.weight)
        nn.init.zeros_(self.final_layer.ffn_final.fc2.bias)

    def forward(self, x, freq, t, lang_c, img_c, lang_mask=None, img_mask=None):
        """x (B, 1 + H, D) adapted state + actions; freq (B,); t (B,) or (1,); lang_c (B, L, D)
        with L <= max_lang_cond_len; img_c (B, img_cond_len, D); masks (B, L) True = valid.
        Returns (B, H, action_dim)."""
        t = self.t_embedder(t).unsqueeze(1)
        if t.shape[0] == 1:
            t = t.expand(x.shape[0], -1, -1)
        freq = self.freq_embedder(freq).unsqueeze(1)
        x = torch.cat([t, freq, x], dim=1) + self.x_pos_embed
        lang_c = lang_c + self.lang_cond_pos_embed[:, : lang_c.shape[1]]
        img_c = img_c + self.img_cond_pos_embed
        conds, masks = (lang_c, img_c), (lang_mask, img_mask)
        for i, block in enumerate(self.blocks):
            x = block(x, conds[i % 2], masks[i % 2])
        return self.final_layer(x)[:, -self.horizon :]


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).float().unsqueeze(0)


def build_adaptor(kind: str, in_features: int, out_features: int) -> nn.Module:
    """`linear` or `mlp<N>x_gelu` (N linears with GELU(tanh) between), as upstream."""
    if kind == "linear":
        return nn.Linear(in_features, out_features)
    m = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"unknown RDT adaptor {kind!r}: expected 'linear' or 'mlp<N>x_gelu'")
    layers: list[nn.Module] = [nn.Linear(in_features, out_features)]
    for _ in range(1, int(m.group(1))):
        layers += [nn.GELU(approximate="tanh"), nn.Linear(out_features, out_features)]
    return nn.Sequential(*layers)


# ----------------------------------------------------------------------------------------------
# The runner: adaptors + transformer + diffusion


@dataclass
class RDTLossOutput:
    loss: torch.Tensor  # () mean of loss_elementwise
    loss_elementwise: torch.Tensor  # (B, H, action_dim)
    pred: torch.Tensor  # (B, H, action_dim) the network's output (clean chunk for `sample`)


class RDTRunner(nn.Module):
    """Upstream `RDTRunner`: the state dict's top level is `model.*` (the transformer) and the
    three adaptors. Inputs are model-level: precomputed language / image tokens, the state and
    actions already in the 128-d unified layout, normalised as the data pipeline does."""

    def __init__(self, cfg: RDTConfig, init_weights: bool = True):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        self.model = RDT(cfg)
        self.lang_adaptor = build_adaptor(cfg.lang_adaptor, cfg.lang_token_dim, D)
        self.img_adaptor = build_adaptor(cfg.img_adaptor, cfg.img_token_dim, D)
        # A "state" is a proprioception or an action vector; input = value + mask.
        self.state_adaptor = build_adaptor(cfg.state_adaptor, cfg.state_token_dim * 2, D)
        if init_weights and not any(p.is_meta for p in self.parameters()):
            self.model.initialize_weights()

    # diffusers schedulers are built per call: they are stateful during sampling.
    def train_scheduler(self):
        from diffusers import DDPMScheduler

        ns = self.cfg.noise_scheduler
        return DDPMScheduler(
            num_train_timesteps=ns.num_train_timesteps,
            beta_schedule=ns.beta_schedule,
            prediction_type=ns.prediction_type,
            clip_sample=ns.clip_sample,
        )

    def sample_scheduler(self):
        from diffusers import DPMSolverMultistepScheduler

        ns = self.cfg.noise_scheduler
        return DPMSolverMultistepScheduler(
            num_train_timesteps=ns.num_train_timesteps,
            beta_schedule=ns.beta_schedule,
            prediction_type=ns.prediction_type,
        )

    def compute_loss(
        self,
        lang_tokens: torch.Tensor,  # (B, L, lang_token_dim)
        lang_attn_mask: torch.Tensor,  # (B, L) bool, True = valid
        img_tokens: torch.Tensor,  # (B, img_cond_len, img_token_dim)
        state_tokens: torch.Tensor,  # (B, 1, state_token_dim)
        action_gt: torch.Tensor,  # (B, H, state_token_dim)
        action_mask: torch.Tensor,  # (B, 1, state_token_dim) float 0/1
        ctrl_freqs: torch.Tensor,  # (B,)
        *,
        noise: torch.Tensor | None = None,  # (B, H, action_dim); drawn when None
        timesteps: torch.Tensor | None = None,  # (B,) int64; drawn when None
        generator: torch.Generator | None = None,
    ) -> RDTLossOutput:
        B, device = lang_tokens.shape[0], lang_tokens.device
        # The same draws, in the same order, as upstream: noise, then timesteps.
        if noise is None:
            noise = torch.randn(
                action_gt.shape, dtype=action_gt.dtype, device=device, generator=generator
            )
        if timesteps is None:
            timesteps = torch.randint(
                0,
                self.cfg.noise_scheduler.num_train_timesteps,
                (B,),
                device=device,
                generator=generator,
            )
        timesteps = timesteps.long().to(device)
        noisy = self.train_scheduler().add_noise(action_gt, noise.to(device), timesteps)
        traj = torch.cat([state_tokens, noisy], dim=1)
        traj = torch.cat([traj, action_mask.expand(-1, traj.shape[1], -1)], dim=2)
        lang_c = self.lang_adaptor(lang_tokens)
        img_c = self.img_adaptor(img_tokens)
        traj = self.state_adaptor(traj)
        pred = self.model(traj, ctrl_freqs, timesteps, lang_c, img_c, lang_mask=lang_attn_mask)
        target = action_gt if self.cfg.noise_scheduler.prediction_type == "sample" else noise
        elementwise = (pred.float() - target.float()) ** 2
        return RDTLossOutput(elementwise.mean(), elementwise, pred)

    @torch.no_grad()
    def predict_action(
        self,
        lang_tokens: torch.Tensor,
        lang_attn_mask: torch.Tensor,
        img_tokens: torch.Tensor,
        state_tokens: torch.Tensor,  # (B, 1, state_token_dim)
        action_mask: torch.Tensor,  # (B, 1, action_dim) float 0/1
        ctrl_freqs: torch.Tensor,
        *,
        noise: torch.Tensor | None = None,  # (B, H, action_dim) the start of sampling
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """DPM-Solver++ from `noise`; returns (B, H, action_dim) times the action mask."""
        H, A = self.cfg.pred_horizon, self.cfg.action_dim
        device, dtype = state_tokens.device, state_tokens.dtype
        state = self.state_adaptor(torch.cat([state_tokens, action_mask], dim=2))
        lang_c = self.lang_adaptor(lang_tokens)
        img_c = self.img_adaptor(img_tokens)
        if noise is None:
            noise = torch.randn(
                (state.shape[0], H, A), dtype=dtype, device=device, generator=generator
            )
        x = noise.to(device=device, dtype=dtype)
        mask = action_mask.expand(-1, H, -1)
        sched = self.sample_scheduler()
        sched.set_timesteps(self.cfg.noise_scheduler.num_inference_timesteps)
        for t in sched.timesteps:
            traj = torch.cat([state, self.state_adaptor(torch.cat([x, mask], dim=2))], dim=1)
            out = self.model(
                traj,
                ctrl_freqs,
                t.unsqueeze(-1).to(device),
                lang_c,
                img_c,
                lang_mask=lang_attn_mask,
            )
            x = sched.step(out, t, x).prev_sample.to(dtype)
        return x * mask

    def inference_timesteps(self) -> torch.Tensor:
        sched = self.sample_scheduler()
        sched.set_timesteps(self.cfg.noise_scheduler.num_inference_timesteps)
        return sched.timesteps.clone()

    def forward(self, *args, **kwargs) -> RDTLossOutput:
        return self.compute_loss(*args, **kwargs)
