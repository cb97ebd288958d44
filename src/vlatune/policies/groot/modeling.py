"""GR00T N1.5: Eagle 2.5 VL backbone + flow-matching DiT action head, readable top to bottom.

Follows NVIDIA's Isaac-GR00T N1.5 as vendored by lerobot 0.5.1 (`lerobot/policies/groot`:
`groot_n1.py`, `eagle2_hg_model/modeling_eagle2_5_vl.py`, `action_head/*`), rewritten on
transformers' `SiglipVisionModel` / `Qwen3Model` and plain torch:

- backbone: SigLIP patches -> (pixel shuffle) -> `mlp1` connector -> written over the image
  tokens of the prompt -> Qwen3 cut after `select_layer` layers (its final RMSNorm applied, as
  NVIDIA's `hidden_states[select_layer]` with the later layers removed) -> (B, S, D) features.
- action head: `vlln` LayerNorm + `vl_self_attention` over the features; the sequence
  [state token, `future_tokens`, action tokens (+ position embedding)] goes through a DiT whose
  blocks alternate cross-attention to the features (even) and self-attention (odd), each with an
  AdaLayerNorm on the timestep embedding; embodiment-specific encoders / decoder hold one weight
  matrix per embodiment (`W[embodiment, in, out]`).
- flow matching with GR00T's time convention: t ~ (s - Beta(1.5, 1)) / s, 0 = noise, 1 = data,
  x_t = (1 - t) noise + t action, velocity target action - noise, timestep bucket int(t * 1000);
  sampling: Euler from t = 0 in `num_inference_timesteps` steps.

The DiT and VL self-attention ignore the VL attention mask (padded tokens are attended to), as
the reference does. Module names differ from NVIDIA's; `convert.py` holds the explicit key map.
Measured size of the released config (nvidia/GR00T-N1.5-3B sizes, built on the meta device,
`GrootConfig.released()`): 2,413,522,880 parameters (1,344,716,736 backbone: SigLIP 427,680,704
incl. its unused 15,238,352-parameter pooling head, connector 2,361,344, Qwen3 cut at 12 layers
914,674,688 with lm_head tied to the embeddings as Qwen3-1.7B ties them; 1,068,806,144 action
head). 1,483,609,840 are trained with NVIDIA's defaults (LLM frozen). An untied lm_head would add
310,640,640.

    >>> model = GrootModel(GrootConfig.from_folder(folder))
    >>> loss, parts = model.compute_loss(batch)           # batch: NVIDIA's model-level keys
    >>> actions = model.sample_actions(batch)             # (B, action_horizon, action_dim)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from vlatune.policies.groot.configuration import GrootConfig

# ---------------------------------------------------------------------------------------------
# Backbone: Eagle 2.5 VL
# ---------------------------------------------------------------------------------------------


def pixel_shuffle(x: Tensor, scale: float) -> Tensor:
    """(N, W, H, C) -> (N, W*s, H*s, C/s^2), Eagle / InternVL's space-to-depth."""
    n, w, h, c = x.shape
    x = x.reshape(n, w, int(h * scale), int(c / scale))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.reshape(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    return x.permute(0, 2, 1, 3).contiguous()


class EagleBackbone(nn.Module):
    """SigLIP + connector + Qwen3 (first `select_layer` layers), NVIDIA's `EagleBackbone`."""

    def __init__(self, cfg: GrootConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        from transformers import Qwen3Config, Qwen3Model, SiglipVisionConfig, SiglipVisionModel

        e = cfg.eagle
        vis = {k: v for k, v in e.vision_config.items() if not k.startswith("_")}
        vis.pop("model_type", None)
        vcfg = SiglipVisionConfig(**vis)
        vcfg._attn_implementation = attn_implementation
        txt = {k: v for k, v in e.text_config.items() if not k.startswith("_")}
        txt["num_hidden_layers"] = cfg.backbone.select_layer  # the layers past it are dropped
        tcfg = Qwen3Config(**txt)
        tcfg._attn_implementation = attn_implementation
        self.text_config = tcfg
        tower = SiglipVisionModel(vcfg)
        # transformers < 5 nests the tower under `.vision_model`; the keys are the same below it.
        self.vision = getattr(tower, "vision_model", tower)
        if getattr(self.vision, "head", None) is not None:
            # The pooling head is in the checkpoint but never used by GR00T: frozen, no grads.
            self.vision.head.requires_grad_(False)
        vit, llm = vcfg.hidden_size, tcfg.hidden_size
        self.use_pixel_shuffle = e.use_pixel_shuffle
        self.downsample_ratio = e.downsample_ratio
        self.vision_select_layer = e.select_layer
        self.image_token_index = e.image_token_index
        wide = vit * int(1 / e.downsample_ratio) ** 2 if e.use_pixel_shuffle else vit
        if e.mlp_connector_layers == 2:
            self.connector = nn.Sequential(
                nn.LayerNorm(wide), nn.Linear(wide, llm), nn.GELU(), nn.Linear(llm, llm)
            )
        else:
            self.connector = nn.Sequential(nn.Linear(wide, llm))
        self.llm = Qwen3Model(tcfg)
        self.lm_head = nn.Linear(llm, tcfg.vocab_size, bias=False)  # in the release, unused
        self.tie_weights()
        if not tcfg.tie_word_embeddings:
            self.lm_head.requires_grad_(False)
        p = cfg.backbone.project_to_dim
        self.project = nn.Linear(llm, p) if p is not None else None

    def tie_weights(self) -> None:
        """lm_head shares the embedding matrix when the text config ties them (again after
        `to_empty`, which allocates each parameter separately)."""
        if self.text_config.tie_word_embeddings:
            self.lm_head.weight = self.llm.embed_tokens.weight

    def image_features(self, pixel_values: Tensor) -> Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, tokens_per_image, llm width)."""
        if self.vision_select_layer == -1:
            x = self.vision(pixel_values=pixel_values).last_hidden_state
        else:
            out = self.vision(pixel_values=pixel_values, output_hidden_states=True)
            x = out.hidden_states[self.vision_select_layer]
        if self.use_pixel_shuffle:
            side = int(x.shape[1] ** 0.5)
            x = pixel_shuffle(x.reshape(x.shape[0], side, side, -1), self.downsample_ratio)
            x = x.reshape(x.shape[0], -1, x.shape[-1])
        return self.connector(x)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor) -> Tensor:
        embeds = self.llm.embed_tokens(input_ids)
        vit = self.image_features(pixel_values.to(embeds.dtype))
        is_image = input_ids == self.image_token_index
        n_slots, n_feats = int(is_image.sum()), vit.shape[0] * vit.shape[1]
        if n_slots != n_feats:
            raise ValueError(
                f"the prompt holds {n_slots} image tokens (id {self.image_token_index}) but the "
                f"images give {n_feats} embeddings ({vit.shape[0]} images x {vit.shape[1]})"
            )
        embeds = embeds.masked_scatter(is_image.unsqueeze(-1), vit.to(embeds.dtype))
        out = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)
        feats = out.last_hidden_state
        return self.project(feats) if self.project is not None else feats


# ---------------------------------------------------------------------------------------------
# Action head: DiT blocks (diffusers' BasicTransformerBlock as NVIDIA configures it)
# ---------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head attention with diffusers' parameter names (`to_q/k/v`, `to_out.0`)."""

    def __init__(
        self, dim: int, heads: int, head_dim: int, kv_dim: int | None, bias: bool, p: float
    ):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_k = nn.Linear(kv_dim or dim, inner, bias=bias)
        self.to_v = nn.Linear(kv_dim or dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(p)])

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        ctx = x if context is None else context
        b = x.shape[0]
        q, k, v = (
            t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2)
            for t in (self.to_q(x), self.to_k(ctx), self.to_v(ctx))
        )
        o = F.scaled_dot_product_attention(q, k, v)
        o = o.transpose(1, 2).reshape(b, x.shape[1], -1)
        return self.to_out[1](self.to_out[0](o))


class GeluProj(nn.Module):
    """diffusers' `GELU(approximate="tanh")`: a linear named `proj`, then tanh-GELU."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """diffusers' FeedForward: net = [GELU proj, dropout, linear, (final dropout)]."""

    def __init__(self, dim: int, p: float, final_dropout: bool):
        super().__init__()
        layers: list[nn.Module] = [GeluProj(dim, 4 * dim), nn.Dropout(p), nn.Linear(4 * dim, dim)]
        if final_dropout:
            layers.append(nn.Dropout(p))
        self.net = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class AdaLayerNorm(nn.Module):
    """LayerNorm without affine, scaled / shifted by a linear map of SiLU(timestep embedding)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        scale, shift = self.linear(F.silu(temb)).chunk(2, dim=1)  # scale first (NVIDIA)
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None]


class Block(nn.Module):
    """Pre-norm attention (self or cross) + feed-forward; AdaLayerNorm when `ada`."""

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        *,
        p: float,
        bias: bool,
        final_dropout: bool,
        ada: bool,
        affine: bool,
        eps: float,
        kv_dim: int | None = None,
    ):
        super().__init__()
        self.ada = ada
        self.norm1 = (
            AdaLayerNorm(dim) if ada else nn.LayerNorm(dim, eps=eps, elementwise_affine=affine)
        )
        self.attn1 = Attention(dim, heads, head_dim, kv_dim, bias, p)
        self.norm3 = nn.LayerNorm(dim, eps=eps, elementwise_affine=affine)
        self.ff = FeedForward(dim, p, final_dropout)
        self.final_dropout = nn.Dropout(p) if final_dropout else None

    def forward(
        self, x: Tensor, context: Tensor | None = None, temb: Tensor | None = None
    ) -> Tensor:
        h = self.norm1(x, temb) if self.ada else self.norm1(x)
        a = self.attn1(h, context)
        if self.final_dropout is not None:
            a = self.final_dropout(a)
        x = x + a
        return x + self.ff(self.norm3(x))


def timestep_features(t: Tensor, dim: int = 256) -> Tensor:
    """diffusers `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=1)`: [cos, sin]."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - 1)
    )
    arg = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(256, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimestepEncoder(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(dim)

    def forward(self, timesteps: Tensor) -> Tensor:
        dtype = self.timestep_embedder.linear_1.weight.dtype
        return self.timestep_embedder(timestep_features(timesteps).to(dtype))


class DiT(nn.Module):
    """NVIDIA's DiT: cross-attention blocks (even) interleaved with self-attention (odd)."""

    def __init__(self, cfg: GrootConfig):
        super().__init__()
        d = cfg.dit
        inner = d.num_attention_heads * d.attention_head_dim
        self.interleave = d.interleave_self_attention
        self.timestep_encoder = TimestepEncoder(inner)
        self.transformer_blocks = nn.ModuleList(
            Block(
                inner,
                d.num_attention_heads,
                d.attention_head_dim,
                p=d.dropout,
                bias=d.attention_bias,
                final_dropout=d.final_dropout,
                ada=True,
                affine=d.norm_elementwise_affine,
                eps=d.norm_eps,
                kv_dim=None if (i % 2 == 1 and self.interleave) else d.cross_attention_dim,
            )
            for i in range(d.num_layers)
        )
        self.norm_out = nn.LayerNorm(inner, eps=1e-6, elementwise_affine=False)
        self.proj_out_1 = nn.Linear(inner, 2 * inner)
        self.proj_out_2 = nn.Linear(inner, d.output_dim)

    def forward(self, x: Tensor, context: Tensor, timestep: Tensor) -> Tensor:
        temb = self.timestep_encoder(timestep)
        for i, block in enumerate(self.transformer_blocks):
            self_only = i % 2 == 1 and self.interleave
            x = block(x, None if self_only else context, temb)
        shift, scale = self.proj_out_1(F.silu(temb)).chunk(2, dim=1)  # shift first (NVIDIA)
        x = self.norm_out(x) * (1 + scale[:, None]) + shift[:, None]
        return self.proj_out_2(x)


class SelfAttentionTransformer(nn.Module):
    """`vl_self_attention`: plain pre-LayerNorm self-attention blocks over the VL features."""

    def __init__(self, cfg: GrootConfig):
        super().__init__()
        s = cfg.vl_sa
        inner = s.num_attention_heads * s.attention_head_dim
        self.transformer_blocks = nn.ModuleList(
            Block(
                inner,
                s.num_attention_heads,
                s.attention_head_dim,
                p=s.dropout,
                bias=s.attention_bias,
                final_dropout=s.final_dropout,
                ada=False,
                affine=True,
                eps=1e-5,
            )
            for _ in range(s.num_layers)
        )

    def forward(self, x: Tensor) -> Tensor:
        for block in self.transformer_blocks:
            x = block(x)
        return x


class CategorySpecificLinear(nn.Module):
    """One (in, out) weight and bias per embodiment: y = x @ W[id] + b[id]."""

    def __init__(self, n: int, d_in: int, d_out: int):
        super().__init__()
        self.W = nn.Parameter(0.02 * torch.randn(n, d_in, d_out))
        self.b = nn.Parameter(torch.zeros(n, d_out))

    def forward(self, x: Tensor, ids: Tensor) -> Tensor:
        return torch.bmm(x, self.W[ids]) + self.b[ids].unsqueeze(1)


class CategorySpecificMLP(nn.Module):
    def __init__(self, n: int, d_in: int, hidden: int, d_out: int):
        super().__init__()
        self.layer1 = CategorySpecificLinear(n, d_in, hidden)
        self.layer2 = CategorySpecificLinear(n, hidden, d_out)

    def forward(self, x: Tensor, ids: Tensor) -> Tensor:
        return self.layer2(F.relu(self.layer1(x, ids)), ids)


def sincos(t: Tensor, dim: int) -> Tensor:
    """(B, T) -> (B, T, dim) = [sin, cos] with 10000^(-i / (dim/2)) frequencies."""
    half = dim // 2
    exponent = -torch.arange(half, dtype=torch.float32, device=t.device) * (
        torch.log(torch.tensor(10000.0)) / half
    )
    arg = t.float().unsqueeze(-1) * exponent.exp()
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)


class ActionEncoder(nn.Module):
    """NVIDIA's MultiEmbodimentActionEncoder: W3(swish(W2([W1 a, sincos(bucket)])))."""

    def __init__(self, action_dim: int, width: int, n: int):
        super().__init__()
        self.width = width
        self.W1 = CategorySpecificLinear(n, action_dim, width)
        self.W2 = CategorySpecificLinear(n, 2 * width, width)
        self.W3 = CategorySpecificLinear(n, width, width)

    def forward(self, actions: Tensor, buckets: Tensor, ids: Tensor) -> Tensor:
        b, t, _ = actions.shape
        a = self.W1(actions, ids)
        tau = sincos(buckets.unsqueeze(1).expand(b, t), self.width).to(a.dtype)
        x = F.silu(self.W2(torch.cat([a, tau], dim=-1), ids))
        return self.W3(x, ids)


class FlowMatchingHead(nn.Module):
    """NVIDIA's FlowmatchingActionHead (training loss and Euler sampling)."""

    def __init__(self, cfg: GrootConfig):
        super().__init__()
        h = cfg.head
        self.cfg = h
        self.dit = DiT(cfg)
        n, width = h.max_num_embodiments, h.input_embedding_dim
        self.state_encoder = CategorySpecificMLP(n, h.max_state_dim, h.hidden_size, width)
        self.action_encoder = ActionEncoder(h.action_dim, width, n)
        self.action_decoder = CategorySpecificMLP(n, h.hidden_size, h.hidden_size, h.action_dim)
        self.future_tokens = nn.Embedding(h.num_target_vision_tokens, width)
        self.vlln = nn.LayerNorm(h.backbone_embedding_dim) if h.use_vlln else nn.Identity()
        self.vl_self_attention = SelfAttentionTransformer(cfg) if h.use_vlln else nn.Identity()
        self.position_embedding = nn.Embedding(h.max_seq_len, width) if h.add_pos_embed else None
        nn.init.normal_(self.future_tokens.weight, std=0.02)
        if self.position_embedding is not None:
            nn.init.normal_(self.position_embedding.weight, std=0.02)

    def condition(self, features: Tensor) -> Tensor:
        return self.vl_self_attention(self.vlln(features))

    def velocity(
        self, vl: Tensor, state_tokens: Tensor, x: Tensor, buckets: Tensor, ids: Tensor
    ) -> Tensor:
        a = self.action_encoder(x, buckets, ids)
        if self.position_embedding is not None:
            pos = torch.arange(a.shape[1], device=a.device)
            a = a + self.position_embedding(pos).unsqueeze(0)
        future = self.future_tokens.weight.unsqueeze(0).expand(vl.shape[0], -1, -1)
        seq = torch.cat([state_tokens, future, a], dim=1)
        out = self.action_decoder(self.dit(seq, vl, buckets), ids)
        return out[:, -x.shape[1] :]

    def beta_sample(self, batch: int) -> Tensor:
        """The raw Beta(noise_beta_alpha, noise_beta_beta) draw (NVIDIA's `beta_dist.sample`)."""
        h = self.cfg
        beta = torch.distributions.Beta(
            torch.tensor(h.noise_beta_alpha), torch.tensor(h.noise_beta_beta)
        )
        return beta.sample((batch,))

    def time_from_beta(self, beta: Tensor) -> Tensor:
        """GR00T's t = (s - beta) / s: 0 = noise, 1 = data (t may dip to 1 - 1/s)."""
        return (self.cfg.noise_s - beta) / self.cfg.noise_s


# (kind, shape, device, dtype) -> tensor; kinds: "noise", "beta", "inference_noise"
DrawFn = Callable[[str, tuple[int, ...], torch.device, torch.dtype], Tensor]


class GrootModel(nn.Module):
    """The whole GR00T N1.5 network on NVIDIA's model-level batch.

    Batch keys (NVIDIA's names, after its processor): `eagle_input_ids`, `eagle_attention_mask`,
    `eagle_pixel_values`, `state` (B, 1, max_state_dim), `embodiment_id` (B,), and for training
    `action` (B, action_horizon, action_dim) and `action_mask` (same shape, 0/1).
    """

    def __init__(self, cfg: GrootConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        self.cfg = cfg
        self.backbone = EagleBackbone(cfg, attn_implementation)
        self.head = FlowMatchingHead(cfg)
        # The random draws, in the reference's order: "noise", then "beta" in training;
        # "inference_noise" in sampling. Replaceable (the fixture replays recorded draws).
        self.draw: DrawFn = self.default_draw
        self.set_trainable(cfg.backbone.tune_llm, cfg.backbone.tune_visual)

    def default_draw(self, kind: str, shape, device, dtype) -> Tensor:
        if kind == "beta":
            return self.head.beta_sample(shape[0]).to(device, dtype)
        return torch.randn(shape, device=device, dtype=dtype)

    def set_trainable(self, tune_llm: bool, tune_visual: bool) -> None:
        """NVIDIA's defaults: the LLM frozen, vision + connector + action head trained."""
        bb = self.backbone
        bb.llm.requires_grad_(tune_llm)
        bb.vision.requires_grad_(tune_visual)
        bb.connector.requires_grad_(tune_visual)
        if getattr(bb.vision, "head", None) is not None:
            bb.vision.head.requires_grad_(False)
        if not bb.text_config.tie_word_embeddings:
            bb.lm_head.requires_grad_(False)

    def features(self, batch: dict[str, Tensor]) -> Tensor:
        """Backbone features (B, S, D) before the action head's vlln / self-attention."""
        return self.backbone(
            batch["eagle_input_ids"], batch["eagle_attention_mask"], batch["eagle_pixel_values"]
        )

    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Masked flow-matching MSE: sum(mse * action_mask) / sum(action_mask)."""
        head = self.head
        vl = head.condition(self.features(batch))
        actions = batch["action"].to(vl.dtype)
        ids = batch["embodiment_id"].long()
        state_tokens = head.state_encoder(batch["state"].to(vl.dtype), ids)
        noise = self.draw("noise", tuple(actions.shape), actions.device, actions.dtype)
        beta = self.draw("beta", (actions.shape[0],), actions.device, actions.dtype)
        t = head.time_from_beta(beta)[:, None, None]
        x_t = (1 - t) * noise + t * actions
        buckets = (t[:, 0, 0] * head.cfg.num_timestep_buckets).long()
        pred = head.velocity(vl, state_tokens, x_t, buckets, ids)
        mask = batch["action_mask"].to(pred.dtype)
        elementwise = F.mse_loss(pred, actions - noise, reduction="none")
        loss = (elementwise * mask).sum() / mask.sum()
        return loss, {"loss_elementwise": elementwise, "pred_velocity": pred, "time": t[:, 0, 0]}

    @torch.no_grad()
    def sample_actions(self, batch: dict[str, Tensor], steps: int | None = None) -> Tensor:
        """Euler integration from noise (t = 0) to data in `num_inference_timesteps` steps."""
        head, h = self.head, self.head.cfg
        vl = head.condition(self.features(batch))
        ids = batch["embodiment_id"].long()
        state_tokens = head.state_encoder(batch["state"].to(vl.dtype), ids)
        b = vl.shape[0]
        x = self.draw("inference_noise", (b, h.action_horizon, h.action_dim), vl.device, vl.dtype)
        n = steps or h.num_inference_timesteps
        for i in range(n):
            bucket = int(i / float(n) * h.num_timestep_buckets)
            buckets = torch.full((b,), bucket, device=vl.device)
            x = x + (1.0 / n) * head.velocity(vl, state_tokens, x, buckets, ids)
        return x


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied tensors counted once); works on the meta device."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
