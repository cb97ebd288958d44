"""pi0 / pi0.5: PaliGemma (SigLIP + Gemma) and a Gemma action expert attending jointly, flow matching.

The architecture of openpi's `PI0Pytorch` as LeRobot ports it (`lerobot/policies/pi0`, `pi05`,
`pi_gemma.py`, lerobot >= 0.5), written top to bottom:

- prefix = SigLIP patch features (linear projector to the VLM width) per camera, then the
  language embeddings scaled by sqrt(width); all prefix tokens attend to each other.
- suffix (the action expert's tokens): pi0 = [state token] + H action tokens, each action token
  = MLP(action_in_proj(x_t), sinusoidal(t)); pi0.5 = H action tokens and the time embedding
  MLP(sinusoidal(t)) modulates every expert RMSNorm (adaRMS: scale, shift, gate). Block mask as
  pi0's `make_att_2d_masks`: the prefix never sees the suffix, the state token sees the prefix,
  action tokens see everything before and each other.
- every layer: each stream normalises and projects its own q/k/v, one attention runs over the
  concatenated sequence (RoPE on the cumulative positions), each stream its own o_proj and MLP.
- loss: elementwise MSE between v_t and u = noise - actions at x_t = t * noise + (1 - t) * actions,
  t ~ Beta(1.5, 1) * 0.999 + 0.001; sampling: Euler from t = 1 to 0 in `num_inference_steps`
  steps, the prefix key-value cache computed once.

Module names are ours (flat, readable); `convert.py` maps them to LeRobot's keys both ways.
Built on transformers' SigLIP embeddings / encoder, Gemma MLP and rotary helper; the joint
attention has its own layer loop (transformers' Gemma layers attend within one stream only).
Released size, measured with `count_parameters(released_config(...))` on the meta device:
pi0 3,238,048,528 parameters used (SigLIP + projector 414,803,696; Gemma 2B 2,508,531,712;
expert 311,464,960; action heads 3,248,160), pi0.5 3,353,433,872 (adaRMS makes the expert
427,932,672); the released file also holds two unused lm_heads (789,970,944), 4,028,019,472 /
4,143,404,816 tensors' elements in all.

    >>> model = Pi0Model(cfg)
    >>> loss = model(images, img_masks, tokens, token_masks, state, actions)    # (B, H, max_action_dim)
    >>> chunk = model.sample_actions(images, img_masks, tokens, token_masks, state)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import GemmaConfig, SiglipVisionConfig
from transformers.models.gemma.modeling_gemma import GemmaMLP, apply_rotary_pos_emb
from transformers.models.siglip.modeling_siglip import SiglipEncoder, SiglipVisionEmbeddings

from vlatune.policies.pi0.configuration import GemmaSpec, Pi0Config

MASK_VALUE = -2.3819763e38  # openpi's additive mask value (finite: fully masked rows stay finite)

KVCache = list[tuple[Tensor, Tensor]]


# ---- small pieces ---------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """Gemma RMSNorm `x / rms(x) * (1 + w)`, or adaRMS when `cond_dim` is set.

    adaRMS (pi0.5's expert): `dense(cond)` gives scale, shift and a residual gate:
    `x / rms(x) * (1 + scale) + shift`, returned with the gate. Variance in float32, as LeRobot.
    """

    def __init__(self, dim: int, eps: float = 1e-6, cond_dim: int | None = None):
        super().__init__()
        self.eps = eps
        self.cond_dim = cond_dim
        if cond_dim is None:
            self.weight = nn.Parameter(torch.zeros(dim))
        else:
            self.dense = nn.Linear(cond_dim, 3 * dim)
            nn.init.zeros_(self.dense.weight)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        var = x.float().square().mean(-1, keepdim=True)
        normed = x * torch.rsqrt(var + self.eps)
        if self.cond_dim is None:
            return (normed * (1.0 + self.weight.float())).type_as(x), None
        if cond is None:
            raise ValueError("adaRMS norm called without its time conditioning")
        mod = self.dense(cond)
        if x.ndim == 3:
            mod = mod[:, None]
        scale, shift, gate = mod.chunk(3, dim=-1)
        return (normed * (1 + scale.float()) + shift.float()).to(x.dtype), gate.to(x.dtype)


class Projections(nn.Module):
    """Gemma attention projections (no bias); the attention itself runs in `joint_layer`."""

    def __init__(self, spec: GemmaSpec):
        super().__init__()
        self.q_proj = nn.Linear(spec.width, spec.num_heads * spec.head_dim, bias=False)
        self.k_proj = nn.Linear(spec.width, spec.num_kv_heads * spec.head_dim, bias=False)
        self.v_proj = nn.Linear(spec.width, spec.num_kv_heads * spec.head_dim, bias=False)
        self.o_proj = nn.Linear(spec.num_heads * spec.head_dim, spec.width, bias=False)


class GemmaBlock(nn.Module):
    """One Gemma decoder layer's weights (pre-norm attention + GeGLU MLP)."""

    def __init__(self, spec: GemmaSpec, eps: float, cond_dim: int | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.width, eps, cond_dim)
        self.self_attn = Projections(spec)
        hf = GemmaConfig(
            hidden_size=spec.width, intermediate_size=spec.mlp_dim, hidden_act="gelu_pytorch_tanh"
        )
        self.mlp = GemmaMLP(hf)
        self.post_attention_layernorm = RMSNorm(spec.width, eps, cond_dim)


class VisionTower(nn.Module):
    """SigLIP vision encoder without pooling head (PaliGemma's), from transformers' pieces."""

    def __init__(self, cfg: Pi0Config):
        super().__init__()
        v = cfg.vision
        hf = SiglipVisionConfig(
            hidden_size=v.hidden_size,
            intermediate_size=v.intermediate_size,
            num_hidden_layers=v.num_hidden_layers,
            num_attention_heads=v.num_attention_heads,
            patch_size=v.patch_size,
            image_size=cfg.image_size,
            hidden_act="gelu_pytorch_tanh",
            layer_norm_eps=1e-6,
        )
        hf._attn_implementation = "sdpa"
        self.embeddings = SiglipVisionEmbeddings(hf)
        self.encoder = SiglipEncoder(hf)
        self.post_layernorm = nn.LayerNorm(v.hidden_size, eps=1e-6)

    def forward(self, pixel_values: Tensor) -> Tensor:
        h = self.embeddings(pixel_values)
        h = self.encoder(inputs_embeds=h).last_hidden_state
        return self.post_layernorm(h)


def rope(
    positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Gemma's default rotary tables (cos, sin) of shape (B, S, head_dim) for integer positions."""
    inv_freq = 1.0 / (
        theta
        ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    )
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def sinusoidal_time(time: Tensor, dim: int, min_period: float, max_period: float) -> Tensor:
    """pi0's sine-cosine embedding of scalar times (openpi `create_sinusoidal_pos_embedding`)."""
    if dim % 2:
        raise ValueError(f"time embedding width {dim} must be even")
    f64 = torch.float32 if time.device.type == "mps" else torch.float64
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=f64, device=time.device)
    period = min_period * (max_period / min_period) ** fraction
    x = (1.0 / period * 2 * math.pi)[None, :] * time[:, None]
    return torch.cat([torch.sin(x), torch.cos(x)], dim=1)


def make_att_2d_masks(pad_masks: Tensor, att_masks: Tensor) -> Tensor:
    """big_vision's block mask: token i sees token j if cumsum(att)[j] <= cumsum(att)[i] and both are real."""
    cumsum = torch.cumsum(att_masks, dim=1)
    att_2d = cumsum[:, None, :] <= cumsum[:, :, None]
    return att_2d & (pad_masks[:, None, :] & pad_masks[:, :, None])


def additive_mask(att_2d: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.where(att_2d[:, None], 0.0, MASK_VALUE).to(dtype)


def _gated(x: Tensor, y: Tensor, gate: Tensor | None) -> Tensor:
    return x + y if gate is None else x + y * gate


def joint_layer(
    blocks: list[GemmaBlock | None],
    hiddens: list[Tensor | None],
    conds: list[Tensor | None],
    cos: Tensor,
    sin: Tensor,
    mask: Tensor,
    spec: GemmaSpec,
    past: tuple[Tensor, Tensor] | None = None,
) -> tuple[list[Tensor | None], tuple[Tensor, Tensor]]:
    """One layer over several streams (prefix / suffix) sharing one attention; returns (outputs, (k, v)).

    `past` holds cached keys / values (post-RoPE) of earlier tokens, prepended to this call's.
    """
    qs, ks, vs, gates, lens = [], [], [], [], []
    for block, h, cond in zip(blocks, hiddens, conds, strict=True):
        if h is None:
            gates.append(None)
            lens.append(0)
            continue
        x, gate = block.input_layernorm(h, cond)
        gates.append(gate)
        lens.append(h.shape[1])
        shape = (*x.shape[:-1], -1, spec.head_dim)
        qs.append(block.self_attn.q_proj(x).view(shape).transpose(1, 2))
        ks.append(block.self_attn.k_proj(x).view(shape).transpose(1, 2))
        vs.append(block.self_attn.v_proj(x).view(shape).transpose(1, 2))
    q, k, v = torch.cat(qs, dim=2), torch.cat(ks, dim=2), torch.cat(vs, dim=2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
    new_kv = (k, v)
    if past is not None:
        k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
    groups = spec.num_heads // spec.num_kv_heads
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    att = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask.to(q.dtype), scale=spec.head_dim**-0.5
    )
    att = att.transpose(1, 2).reshape(q.shape[0], q.shape[2], spec.num_heads * spec.head_dim)
    outs: list[Tensor | None] = []
    start = 0
    for block, h, cond, gate, n in zip(blocks, hiddens, conds, gates, lens, strict=True):
        if h is None:
            outs.append(None)
            continue
        o = att[:, start : start + n]
        start += n
        o = block.self_attn.o_proj(o.to(block.self_attn.o_proj.weight.dtype))
        h = _gated(h, o, gate)
        x, gate2 = block.post_attention_layernorm(h, cond)
        x = block.mlp(x.to(block.mlp.up_proj.weight.dtype))
        outs.append(_gated(h, x, gate2))
    return outs, new_kv


# ---- the model --------------------------------------------------------------------------------
class Pi0Model(nn.Module):
    """pi0 (`cfg.variant == "pi0"`) or pi0.5 (`"pi05"`): see the module docstring."""

    def __init__(self, cfg: Pi0Config):
        super().__init__()
        self.cfg = cfg
        vlm, ex = cfg.vlm, cfg.expert
        pi05 = cfg.variant == "pi05"
        self.vision = VisionTower(cfg)
        self.projector = nn.Linear(cfg.vision.hidden_size, vlm.width)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, vlm.width)
        self.vlm_layers = nn.ModuleList(GemmaBlock(vlm, cfg.rms_norm_eps) for _ in range(vlm.depth))
        self.vlm_norm = RMSNorm(vlm.width, cfg.rms_norm_eps)
        self.vlm_lm_head = nn.Linear(
            vlm.width, cfg.vocab_size, bias=False
        )  # unused; in the released file
        cond = ex.width if pi05 else None
        self.expert_layers = nn.ModuleList(
            GemmaBlock(ex, cfg.rms_norm_eps, cond) for _ in range(ex.depth)
        )
        self.expert_norm = RMSNorm(ex.width, cfg.rms_norm_eps, cond)
        self.expert_lm_head = nn.Linear(
            ex.width, cfg.vocab_size, bias=False
        )  # unused; in the released file
        self.action_in_proj = nn.Linear(cfg.max_action_dim, ex.width)
        self.action_out_proj = nn.Linear(ex.width, cfg.max_action_dim)
        if pi05:
            self.time_mlp_in = nn.Linear(ex.width, ex.width)
            self.time_mlp_out = nn.Linear(ex.width, ex.width)
        else:
            self.state_proj = nn.Linear(cfg.max_state_dim, ex.width)
            self.action_time_mlp_in = nn.Linear(2 * ex.width, ex.width)
            self.action_time_mlp_out = nn.Linear(ex.width, ex.width)
        self.gradient_checkpointing = (
            False  # recompute each joint layer in backward (LeRobot's option)
        )
        if vlm.depth != ex.depth:
            raise ValueError(
                f"VLM depth {vlm.depth} != expert depth {ex.depth}: joint attention pairs layers"
            )

    # ---- precision (LeRobot's `to_bfloat16_for_selected_params`) ----
    def set_precision(self, dtype: str) -> None:
        """float32 everywhere, or bfloat16 for the Gemma stacks with vision, projector and norms in float32."""
        if dtype == "float32":
            self.float()
            return
        if dtype != "bfloat16":
            raise ValueError(f"dtype {dtype!r}: use 'float32' or 'bfloat16'")
        keep = ("vision.", "projector.", "input_layernorm", "post_attention_layernorm", "_norm.")
        stacks = ("embed_tokens", "vlm_", "expert_")
        for name, p in self.named_parameters():
            if name.startswith(stacks) and not any(k in name for k in keep):
                p.data = p.data.to(torch.bfloat16)

    # ---- embeddings ----
    def embed_image(self, image: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, patches, VLM width); the vision path runs in float32."""
        dtype = self.projector.weight.dtype
        return self.projector(self.vision(image.to(dtype)))

    def embed_language(self, tokens: Tensor) -> Tensor:
        w = self.embed_tokens.weight
        return self.embed_tokens(tokens) * torch.tensor(
            self.cfg.vlm.width**0.5, dtype=w.dtype, device=w.device
        )

    def embed_prefix(
        self, images: list[Tensor], img_masks: list[Tensor], tokens: Tensor, token_masks: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Images then language: (embeddings, pad mask, attention-block mask (all 0: bidirectional))."""
        embs, pads = [], []
        for img, m in zip(images, img_masks, strict=True):
            e = self.embed_image(img)
            embs.append(e)
            pads.append(m[:, None].expand(e.shape[0], e.shape[1]))
        lang = self.embed_language(tokens)
        embs.append(lang.to(embs[0].dtype) if embs else lang)
        pads.append(token_masks.bool())
        emb, pad = torch.cat(embs, dim=1), torch.cat(pads, dim=1)
        return emb, pad, torch.zeros_like(pad, dtype=torch.long)

    def embed_suffix(
        self, state: Tensor | None, x_t: Tensor, time: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Expert tokens: (embeddings, pad mask, block mask, adaRMS condition or None)."""
        bsz, horizon = x_t.shape[:2]
        width = self.cfg.expert.width
        time_emb = sinusoidal_time(time, width, self.cfg.min_period, self.cfg.max_period).to(
            time.dtype
        )
        action_emb = self.action_in_proj(x_t)
        blocks = [1] + [0] * (horizon - 1)
        if self.cfg.variant == "pi05":
            cond = F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(time_emb))))
            emb = action_emb
        else:
            if state is None:
                raise ValueError(
                    "pi0 needs the state (B, max_state_dim): it is the expert's first token"
                )
            state_emb = self.state_proj(state.to(self.state_proj.weight.dtype))[:, None]
            fused = torch.cat([action_emb, time_emb[:, None].expand_as(action_emb)], dim=2)
            fused = self.action_time_mlp_out(F.silu(self.action_time_mlp_in(fused)))
            emb, cond = torch.cat([state_emb, fused], dim=1), None
            blocks = [1] + blocks
        pad = torch.ones(bsz, emb.shape[1], dtype=torch.bool, device=x_t.device)
        att = torch.tensor(blocks, dtype=torch.long, device=x_t.device)[None].expand(bsz, -1)
        return emb, pad, att, cond

    # ---- the two stacks ----
    def _layers_dtype(self) -> torch.dtype:
        return self.vlm_layers[0].self_attn.q_proj.weight.dtype

    def run_layers(
        self,
        prefix: Tensor | None,
        suffix: Tensor | None,
        positions: Tensor,
        mask: Tensor,
        cond: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> tuple[Tensor | None, Tensor | None, KVCache]:
        """Both stacks layer by layer (either stream may be None); returns normed outputs and the new K/V."""
        dtype = self._layers_dtype()
        hs = [
            None if prefix is None else prefix.to(dtype),
            None if suffix is None else suffix.to(dtype),
        ]
        cos, sin = rope(positions, self.cfg.vlm.head_dim, self.cfg.rope_theta, dtype)
        conds = [None, cond]
        new_cache: KVCache = []
        for i, (vb, eb) in enumerate(zip(self.vlm_layers, self.expert_layers, strict=True)):
            past = cache[i] if cache is not None else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hs, kv = checkpoint(
                    joint_layer,
                    [vb, eb],
                    hs,
                    conds,
                    cos,
                    sin,
                    mask,
                    self.cfg.vlm,
                    past,
                    use_reentrant=False,
                )
            else:
                hs, kv = joint_layer([vb, eb], hs, conds, cos, sin, mask, self.cfg.vlm, past)
            new_cache.append(kv)
        pre = None if hs[0] is None else self.vlm_norm(hs[0])[0]
        suf = None if hs[1] is None else self.expert_norm(hs[1], cond)[0]
        return pre, suf, new_cache

    # ---- training ----
    def forward(
        self,
        images: list[Tensor],
        img_masks: list[Tensor],
        tokens: Tensor,
        token_masks: Tensor,
        state: Tensor | None,
        actions: Tensor,
        noise: Tensor | None = None,
        time: Tensor | None = None,
    ) -> Tensor:
        """Elementwise flow-matching loss (B, H, max_action_dim); noise / time drawn when not given."""
        if noise is None:
            noise = self.sample_noise(actions.shape, actions.device)
        if time is None:
            time = self.sample_time(actions.shape[0], actions.device)
        t = time[:, None, None]
        x_t = t * noise + (1 - t) * actions
        u_t = noise - actions
        v_t = self.velocity_joint(images, img_masks, tokens, token_masks, state, x_t, time)
        return F.mse_loss(u_t, v_t, reduction="none")

    def velocity_joint(
        self,
        images: list[Tensor],
        img_masks: list[Tensor],
        tokens: Tensor,
        token_masks: Tensor,
        state: Tensor | None,
        x_t: Tensor,
        time: Tensor,
    ) -> Tensor:
        """v_t from one pass over prefix and suffix together (training); float32 (B, H, max_action_dim)."""
        pre, pre_pad, pre_att = self.embed_prefix(images, img_masks, tokens, token_masks)
        suf, suf_pad, suf_att, cond = self.embed_suffix(state, x_t, time)
        pad = torch.cat([pre_pad, suf_pad], dim=1)
        att = torch.cat([pre_att, suf_att], dim=1)
        mask = additive_mask(make_att_2d_masks(pad, att), self._layers_dtype())
        positions = torch.cumsum(pad, dim=1) - 1
        _, out, _ = self.run_layers(pre, suf, positions, mask, cond)
        out = out[:, -x_t.shape[1] :].to(self.action_out_proj.weight.dtype)
        return self.action_out_proj(out).float()

    def sample_noise(self, shape, device) -> Tensor:
        return torch.randn(shape, dtype=torch.float32, device=device)

    def sample_time(self, bsz: int, device) -> Tensor:
        c = self.cfg
        beta = torch.distributions.Beta(
            torch.tensor(c.time_sampling_beta_alpha), torch.tensor(c.time_sampling_beta_beta)
        )
        t = beta.sample((bsz,)) * c.time_sampling_scale + c.time_sampling_offset
        return t.to(device=device, dtype=torch.float32)

    # ---- inference ----
    @torch.no_grad()
    def sample_actions(
        self,
        images: list[Tensor],
        img_masks: list[Tensor],
        tokens: Tensor,
        token_masks: Tensor,
        state: Tensor | None = None,
        noise: Tensor | None = None,
        num_steps: int | None = None,
    ) -> Tensor:
        """Euler integration from x_1 = noise at t = 1 to t = 0; (B, H, max_action_dim)."""
        steps = num_steps or self.cfg.num_inference_steps
        bsz = tokens.shape[0]
        if noise is None:
            noise = self.sample_noise(
                (bsz, self.cfg.chunk_size, self.cfg.max_action_dim), tokens.device
            )
        pre_pad, cache = self.prefix_cache(images, img_masks, tokens, token_masks)
        dt = -1.0 / steps
        x_t = noise
        for step in range(steps):
            t = torch.full((bsz,), 1.0 + step * dt, dtype=torch.float32, device=noise.device)
            x_t = x_t + dt * self.velocity(state, pre_pad, cache, x_t, t)
        return x_t

    def prefix_cache(
        self, images: list[Tensor], img_masks: list[Tensor], tokens: Tensor, token_masks: Tensor
    ) -> tuple[Tensor, KVCache]:
        """The prefix pad mask and its per-layer keys / values (computed once per chunk)."""
        pre, pre_pad, pre_att = self.embed_prefix(images, img_masks, tokens, token_masks)
        mask = additive_mask(make_att_2d_masks(pre_pad, pre_att), self._layers_dtype())
        _, _, cache = self.run_layers(pre, None, torch.cumsum(pre_pad, dim=1) - 1, mask)
        return pre_pad, cache

    def velocity(
        self, state: Tensor | None, pre_pad: Tensor, cache: KVCache, x_t: Tensor, t: Tensor
    ) -> Tensor:
        """v_t of the expert tokens attending to the cached prefix."""
        suf, suf_pad, suf_att, cond = self.embed_suffix(state, x_t, t)
        n_suf, n_pre = suf_pad.shape[1], pre_pad.shape[1]
        full = torch.cat(
            [pre_pad[:, None, :].expand(-1, n_suf, n_pre), make_att_2d_masks(suf_pad, suf_att)],
            dim=2,
        )
        positions = pre_pad.sum(-1, keepdim=True) + torch.cumsum(suf_pad, dim=1) - 1
        mask = additive_mask(full, self._layers_dtype())
        _, out, _ = self.run_layers(None, suf, positions, mask, cond, cache)
        out = out[:, -x_t.shape[1] :].to(self.action_out_proj.weight.dtype)
        return self.action_out_proj(out).float()


def count_parameters(cfg: Pi0Config) -> dict[str, int]:
    """Parameter counts of `cfg` built on the meta device (no memory): total and per part."""
    with torch.device("meta"):
        model = Pi0Model(cfg)
    parts: dict[str, int] = {}
    for name, p in model.named_parameters():
        head = name.split(".")[0]
        key = (
            "lm_heads_unused" if head.endswith("lm_head")
            else "vision" if head in ("vision", "projector")
            else "vlm" if head.startswith("vlm_") or head == "embed_tokens"
            else "expert" if head.startswith("expert_")
            else "action_heads"
        )  # fmt: skip
        parts[key] = parts.get(key, 0) + p.numel()
    parts["total_in_file"] = sum(parts.values())
    parts["total_used"] = parts["total_in_file"] - parts["lm_heads_unused"]
    return parts
