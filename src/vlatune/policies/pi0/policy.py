"""The pi0 family behind vlatune's small policy interface (compute_loss / predict_chunk / param_groups / save).

Model-level batches (what `processor.model_inputs` + `processor.tokenize` give): `images` (list of
(B, 3, S, S) in [-1, 1]), `img_masks` (list of (B,) bool), `tokens` / `token_masks` (B, L),
`state` (B, max_state_dim; pi0 only), `actions` (B, H, max_action_dim). The loss is LeRobot's: the
mean of the elementwise flow-matching loss over the first `action_dim` columns. Freezing follows
LeRobot's `freeze_vision_encoder` / `train_expert_only`; LoRA (peft) goes on the attention
projections of both Gemma stacks and on the state / action projections, everything else frozen
(the seed's LIBERO LoRA recipe). `save` writes LeRobot's layout (adapters merged first).

    >>> policy = Pi0Policy(load_released("lerobot_pi05_folder")[0]).apply_lora(r=32, alpha=32)
    >>> loss, metrics = policy.compute_loss(batch); loss.backward()
    >>> policy.merge_lora().save("out")          # LeRobot's from_pretrained reads "out"
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from vlatune.policies.pi0.convert import save_released
from vlatune.policies.pi0.modeling import Pi0Model
from vlatune.policies.pi0.processor import unpad_actions

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def lora_targets(model: Pi0Model) -> list[str]:
    """Module names for LoRA: q/k/v/o of every VLM and expert layer, and the state / action projections."""
    names = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and (
            (name.startswith(("vlm_layers.", "expert_layers.")) and name.endswith(ATTENTION))
            or name in ("state_proj", "action_in_proj", "action_out_proj")
            or name.startswith(("action_time_mlp_", "time_mlp_"))
        )
    ]
    return sorted(names)


class Pi0Policy(nn.Module):
    def __init__(self, model: Pi0Model):
        super().__init__()
        self.model = model
        self.cfg = model.cfg

    # ---- training / inference ----
    def _args(self, batch: dict) -> tuple:
        state = batch.get("state") if self.cfg.variant == "pi0" else None
        return batch["images"], batch["img_masks"], batch["tokens"], batch["token_masks"], state

    def compute_loss(self, batch: dict) -> tuple[Tensor, dict[str, float]]:
        losses = self.model(
            *self._args(batch), batch["actions"], batch.get("noise"), batch.get("time")
        )
        loss = losses[:, :, : self.cfg.action_dim].mean()
        return loss, {"loss": loss.item()}

    @torch.no_grad()
    def predict_chunk(self, batch: dict) -> Tensor:
        """(B, chunk_size, action_dim), in the (normalised) units the model was trained on."""
        chunk = self.model.sample_actions(*self._args(batch), noise=batch.get("noise"))
        return unpad_actions(chunk, self.cfg.action_dim)

    # ---- what trains ----
    def freeze(self, vision: bool = False, vlm: bool = False) -> Pi0Policy:
        """LeRobot's `freeze_vision_encoder` (vision) and `train_expert_only` (vision + VLM)."""
        frozen = []
        if vision or vlm:
            frozen += ["vision.", "projector."]
        if vlm:
            frozen += ["embed_tokens.", "vlm_layers.", "vlm_norm.", "vlm_lm_head."]
        for name, p in self.model.named_parameters():
            if name.startswith(tuple(frozen)):
                p.requires_grad_(False)
        return self

    def apply_lora(self, r: int = 32, alpha: int = 32, dropout: float = 0.0) -> Pi0Policy:
        from peft import LoraConfig, inject_adapter_in_model

        targets = lora_targets(self.model)
        cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
        self.model = inject_adapter_in_model(cfg, self.model)
        for name, p in self.model.named_parameters():
            p.requires_grad_("lora_" in name)
        return self

    def merge_lora(self) -> Pi0Policy:
        """Fold adapters into the base weights and drop the LoRA wrappers (outputs unchanged)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        for name, module in list(self.model.named_modules()):
            if isinstance(module, BaseTunerLayer):
                module.merge()
                parent_name, _, child = name.rpartition(".")
                parent = self.model.get_submodule(parent_name) if parent_name else self.model
                setattr(parent, child, module.get_base_layer())
        for p in self.model.parameters():
            p.requires_grad_(True)
        return self

    def param_groups(self, lr: float, weight_decay: float = 0.0) -> list[dict]:
        """One AdamW group of the trainable parameters (LeRobot / openpi decay every tensor alike)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("no trainable parameters: everything is frozen")
        return [{"params": params, "lr": lr, "weight_decay": weight_decay}]

    def num_parameters(self) -> tuple[int, int]:
        total = sum(p.numel() for p in self.model.parameters())
        return total, sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def save(self, folder: str | Path) -> None:
        if any("lora_" in k for k in self.model.state_dict()):
            raise ValueError(
                "the policy has LoRA adapters: call merge_lora() before saving LeRobot's layout"
            )
        save_released(self.model, folder)
