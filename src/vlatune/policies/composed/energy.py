"""Energy model E(h, a): scores a (context features, action chunk) pair; low = compatible.

Trained with the in-batch InfoNCE loss: E_ij = E(h_i, a_j) over all B x B pairs of a batch,
logits = -E / tau, cross-entropy with the diagonal (each context's own chunk) as the positive.
The context is detached: the energy model has its own learning rate (and optional warm-up) and
does not shape the backbone. At inference it can correct a sampled chunk by gradient steps
a <- a - alpha * grad_a E(h, a), each step clipped elementwise.

    >>> E = EnergyModel(hidden=256, context_dim=128, horizon=8, action_dim=7)
    >>> loss, metrics = infonce(E.pairwise(h, a), tau=1.0)
"""

from __future__ import annotations

import torch
from torch import nn


class EnergyModel(nn.Module):
    def __init__(self, hidden: int, context_dim: int, horizon: int, action_dim: int):
        super().__init__()
        self.ctx = nn.Linear(context_dim, hidden)
        self.act = nn.Linear(horizon * action_dim, hidden)
        self.net = nn.Sequential(
            nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 1)
        )

    def forward(self, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Matching pairs: h (B, d), a (B, H, A) -> (B,)."""
        return self.net(self.ctx(h) + self.act(a.flatten(1))).squeeze(-1)

    def pairwise(self, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """All pairs: E[i, j] = E(h_i, a_j), (B, B)."""
        ch = self.ctx(h)[:, None]  # (B, 1, hidden)
        ca = self.act(a.flatten(1))[None]  # (1, B, hidden)
        return self.net(ch + ca).squeeze(-1)

    def correct(
        self, h: torch.Tensor, a: torch.Tensor, alpha: float, steps: int, max_step: float
    ) -> torch.Tensor:
        a = a.detach().clone()
        for _ in range(steps):
            with torch.enable_grad():
                a.requires_grad_(True)
                (grad,) = torch.autograd.grad(self(h.detach(), a).sum(), a)
            a = (a - (alpha * grad).clamp(-max_step, max_step)).detach()
        return a


def infonce(energies: torch.Tensor, tau: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """In-batch InfoNCE over a (B, B) energy matrix whose diagonal holds the positives."""
    B = energies.shape[0]
    target = torch.arange(B, device=energies.device)
    loss = nn.functional.cross_entropy(-energies / tau, target)
    eye = torch.eye(B, dtype=torch.bool, device=energies.device)
    pos = energies[eye].mean().detach()
    neg = energies[~eye].mean().detach() if B > 1 else torch.zeros((), device=energies.device)
    return loss, {"energy_pos": pos, "energy_neg": neg}
