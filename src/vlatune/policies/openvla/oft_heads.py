"""OpenVLA-OFT's heads: the L1-regression action head (MLP-ResNet) and the proprio projector.

As `moojink/openvla-oft` `prismatic/models/action_heads.py` / `projectors.py`, with the same
module names so that the released `action_head--<step>_checkpoint.pt` and
`proprio_projector--<step>_checkpoint.pt` (DDP `module.` prefix stripped) load strictly:

- `L1RegressionActionHead.model` = MLPResNet: LayerNorm(D * action_dim), fc1, ReLU,
  2 x [x + ReLU(Linear(LayerNorm(x)))] (`mlp_resnet_blocks.i.ffn.{0,1}`), LayerNorm, fc2.
  Its input is the (B, chunk * action_dim, D) action hidden states, regrouped per time step
  to (B, chunk, action_dim * D).
- `ProprioProjector`: fc1 (proprio_dim -> D), GELU, fc2 (D -> D); one token after the patches.

- `DiffusionActionHead`: `noise_predictor.mlp_resnet` (the same MLP-ResNet, output = noise),
  diffusers' `DDIMScheduler(num_train_timesteps=50, beta_schedule="squaredcos_cap_v2")` and a
  sinusoidal timestep encoder (llm_dim wide; its embedding is one token after the proprio token);
  `NoisyActionProjector` (fc1: 1 -> D, GELU, fc2) embeds each noisy action scalar in place of the
  action-token embeddings. Not covered by a fixture (the OFT fixture is the L1 head).

FiLM (OFT's `film_vit_wrapper.py`) lives in the ViT blocks of `modeling.py` (`film=True`).

    >>> head = L1RegressionActionHead(input_dim=4096, hidden_dim=4096, action_dim=7, chunk=8)
    >>> chunk = head.predict_action(actions_hidden_states)       # (B, 8, 7), normalised
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MLPResNetBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(x)


class MLPResNet(nn.Module):
    def __init__(self, num_blocks: int, input_dim: int, hidden_dim: int, output_dim: int):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(input_dim)
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.mlp_resnet_blocks = nn.ModuleList(
            MLPResNetBlock(hidden_dim) for _ in range(num_blocks)
        )
        self.layer_norm2 = nn.LayerNorm(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(self.layer_norm1(x)))
        for blk in self.mlp_resnet_blocks:
            x = blk(x)
        return self.fc2(self.layer_norm2(x))


class L1RegressionActionHead(nn.Module):
    def __init__(
        self, input_dim: int, hidden_dim: int, action_dim: int, chunk: int, num_blocks: int = 2
    ):
        super().__init__()
        self.action_dim = action_dim
        self.chunk = chunk
        self.model = MLPResNet(num_blocks, input_dim * action_dim, hidden_dim, action_dim)

    def predict_action(self, actions_hidden_states: torch.Tensor) -> torch.Tensor:
        b, n, _ = actions_hidden_states.shape
        if n != self.chunk * self.action_dim:
            raise ValueError(
                f"action hidden states have {n} positions; expected chunk x action_dim = "
                f"{self.chunk} x {self.action_dim}"
            )
        return self.model(actions_hidden_states.reshape(b, self.chunk, -1))

    def l1_loss(self, actions_hidden_states: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """OFT finetune.py's objective: mean |target - prediction| over (B, chunk, action_dim)."""
        return F.l1_loss(self.predict_action(actions_hidden_states), target)


class ProprioProjector(nn.Module):
    def __init__(self, llm_dim: int, proprio_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(proprio_dim, llm_dim)
        self.fc2 = nn.Linear(llm_dim, llm_dim)

    def forward(self, proprio: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(proprio)))


class NoisyActionProjector(nn.Module):
    """[Diffusion] one noisy action scalar -> one LLM embedding (fc1, GELU, fc2)."""

    def __init__(self, llm_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(1, llm_dim)
        self.fc2 = nn.Linear(llm_dim, llm_dim)

    def forward(self, noisy_actions: torch.Tensor) -> torch.Tensor:
        """(B, chunk, action_dim) -> (B, chunk * action_dim, D)."""
        return self.fc2(F.gelu(self.fc1(noisy_actions.reshape(noisy_actions.shape[0], -1, 1))))


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """OFT's `SinusoidalPositionalEncoding`: [sin(t * w), cos(t * w)], w = 10000^(-i / (dim/2 - 1))."""
    if dim % 2:
        raise ValueError(f"timestep embedding width {dim} must be even")
    half = dim // 2
    w = torch.exp(torch.arange(half, device=t.device) * -math.log(10000) / (half - 1))
    e = t.float()[:, None] * w[None]
    return torch.cat([e.sin(), e.cos()], dim=-1)


class NoisePredictionModel(nn.Module):
    def __init__(
        self, transformer_hidden_dim: int, hidden_dim: int, action_dim: int, num_blocks: int = 2
    ):
        super().__init__()
        self.mlp_resnet = MLPResNet(num_blocks, transformer_hidden_dim, hidden_dim, action_dim)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.mlp_resnet(obs)


class DiffusionActionHead(nn.Module):
    """OFT's DDIM head: predicts the noise of each action from the action hidden states."""

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        action_dim: int,
        chunk: int,
        num_diffusion_steps_train: int = 50,
        num_blocks: int = 2,
    ):
        super().__init__()
        try:
            from diffusers import DDIMScheduler
        except ImportError as e:  # a declared dependency; say what to install
            raise ImportError(
                "OFT's diffusion head needs diffusers: pip install 'diffusers>=0.30'"
            ) from e
        self.action_dim, self.chunk, self.hidden_dim = action_dim, chunk, hidden_dim
        self.noise_predictor = NoisePredictionModel(
            hidden_dim * action_dim, hidden_dim, action_dim, num_blocks
        )
        self.noise_scheduler = DDIMScheduler(
            num_train_timesteps=num_diffusion_steps_train, beta_schedule="squaredcos_cap_v2"
        )

    def time_embedding(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(B,) diffusion timesteps -> (B, 1, D), the extra token after the patches / proprio."""
        return sinusoidal_embedding(timesteps, self.hidden_dim)[:, None]

    def add_noise(
        self, actions: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """Closed-form forward diffusion (`sample_noisy_actions` with the draws injected)."""
        return self.noise_scheduler.add_noise(actions, noise, timesteps)

    def predict_noise(self, actions_hidden_states: torch.Tensor) -> torch.Tensor:
        b, n, _ = actions_hidden_states.shape
        if n != self.chunk * self.action_dim:
            raise ValueError(
                f"action hidden states have {n} positions; expected {self.chunk} x {self.action_dim}"
            )
        return self.noise_predictor(actions_hidden_states.reshape(b, self.chunk, -1))
