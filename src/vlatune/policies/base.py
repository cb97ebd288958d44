"""The small interface every policy family implements, and what the trainer wraps around it.

Follows LeRobot's `PreTrainedPolicy` and openpi's `BaseModel` in spirit, kept smaller: the
trainer, the evaluator and the CLI see only these members (design: ../shared/POLICY_FAMILIES.md).

- `compute_loss(batch) -> (loss, metrics)`: the scalar to back-propagate and the numbers to log
  (`metrics["loss"]` included; values are floats or 0-d tensors, detached).
- `predict_chunk(batch) -> (B, H, action_dim)`: the sampled chunk in the units the model was
  trained on (normalised); undoing the normalisation belongs to the policy's output steps.
- `param_groups(optim_cfg) -> list[dict]`: AdamW groups of the trainable parameters. A group may
  carry `name` and `warmup_steps`: a group with its own `warmup_steps` gets a linear warm-up to
  its `lr` and then stays constant, instead of the run's `optim.schedule` (the energy model).
- `save(folder)`: the family's own checkpoint folder, complete or absent (`vlatune.fsutil`).
- `prepare(datasets) -> str | None`: called once by the trainer with the training (and
  validation) datasets before the first step, for work a family does on the data as a whole
  (the composed family's rdt-style backbone encodes each instruction once there). Returns a
  line for the log, or None.

Families are `nn.Module`s whose `forward` is their own business: `vlatune train` wraps the
policy in `LossModule`, whose `forward` is `compute_loss`, because DDP / FSDP synchronise
gradients only through the wrapped module's `forward`.

    >>> loss, metrics = policy.compute_loss(batch); loss.backward()
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

INTERFACE = ("compute_loss", "predict_chunk", "param_groups", "save")


@runtime_checkable
class Policy(Protocol):
    def compute_loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]: ...

    def predict_chunk(self, batch: dict[str, Any]) -> Tensor: ...

    def param_groups(self, optim_cfg: Any) -> list[dict]: ...

    def save(self, folder: Any) -> Any: ...


def missing_members(obj: Any) -> list[str]:
    """The interface members `obj` lacks (empty: it is a policy the trainer can drive)."""
    return [m for m in INTERFACE if not callable(getattr(obj, m, None))]


class LossModule(nn.Module):
    """`forward(batch)` = `policy.compute_loss(batch)`: what the trainer hands to accelerate.
    `.policy` is the family's module itself (saved, averaged, evaluated)."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        missing = missing_members(policy)
        if missing:
            raise TypeError(
                f"{type(policy).__name__} does not implement the policy interface: "
                f"missing {', '.join(missing)} (vlatune.policies.base)"
            )
        self.policy = policy

    def forward(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        return self.policy.compute_loss(batch)
