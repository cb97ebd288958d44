"""The GR00T N1.5 family behind `vlatune train` / `vlatune eval`: `build_policy` and `load_policy`.

`GrootPolicy` wraps the network (`modeling.GrootModel`) with its processor chain
(`processor.build_processor`: images -> min-max state / actions -> Eagle pixels + prompt ->
padding, masks, embodiment id) and the policy interface (`vlatune.policies.base`).

- Start: `policy.pretrained` names NVIDIA's folder (config.json + model.safetensors +
  eagle_config.json), loaded strictly; the chunk length becomes `data.action_horizon` (no GR00T
  weight depends on it: the position embedding has `max_seq_len` rows). A recipe without a
  pretrained folder is refused: GR00T is only fine-tuned here, never trained from scratch.
- What trains follows GR00T's flags: `tune_llm` (Qwen3 layers), `tune_visual` (SigLIP + mlp1),
  `tune_projector` (state / action encoders, action decoder, position embedding),
  `tune_diffusion_model` (the DiT); `vlln`, `vl_self_attention` and `future_tokens` always
  train (as in NVIDIA's head). `lora` adds low-rank adapters to DiT linears through forward
  hooks, so the network's own parameter names (NVIDIA's keys) never change.
- Saved folder: NVIDIA's layout (config.json, eagle_config.json, model.safetensors with
  `backbone.*` / `action_head.*` keys, what NVIDIA's `GR00TN15.from_pretrained` and
  `convert.load_released` read strictly) + `processor.json` (+ `tokenizer/`) +
  `vlatune_groot.json` (the training settings: flags, LoRA, inference steps). With LoRA the
  rule is pi0's: model.safetensors holds the weights with the adapters *merged* (deployable as
  they are), and `lora.safetensors` (`LORA_FILE`) is kept beside it for resuming: per adapted
  DiT linear `<name>.A`, `<name>.B` (the adapters) and `<name>.base` (that linear's weight
  before merging; `<name>` is the DiT module path with `.` written `__`). `load_policy` puts
  the `.base` weights back in place of the merged ones and re-attaches the adapters, so a
  resumed run continues from bit-identical weights and adapters (subtracting the delta from
  the merged weight would not give the base back exactly in floating point, and unlike pi0 the
  base is not re-read from `policy.pretrained`: vlln, vl_self_attention and the projectors
  train beside the adapters, and that folder may have moved). The cost is one more copy of the
  adapted linears (the DiT attention and feed-forward weights). A `lora.safetensors` without
  `.base` keys is a folder vlatune wrote before this rule: its model.safetensors holds the
  unmerged base weights and loads as such.

    >>> policy = load_policy("runs/groot/checkpoint-2000/policy")
    >>> actions = policy.predict({"images": {...}, "state": s, "instruction": "open the drawer"})
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from vlatune import fsutil
from vlatune.policies.groot import processor as P
from vlatune.policies.groot.configuration import GrootConfig
from vlatune.policies.groot.convert import (
    WEIGHTS,
    load_released,
    to_released_key,
    to_released_state_dict,
)
from vlatune.policies.groot.modeling import GrootModel
from vlatune.policies.processor import PROCESSOR_FILE, ProcessedPolicy

SETTINGS_FILE = "vlatune_groot.json"
LORA_FILE = "lora.safetensors"
# 'all-linear' inside the DiT blocks: attention projections and the feed-forward linears
DIT_LINEARS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")


class LoRA(nn.Module):
    """y = W x + (alpha / r) B A dropout(x), attached to an nn.Linear by a forward hook."""

    def __init__(self, linear: nn.Linear, r: int, alpha: int, dropout: float):
        super().__init__()
        self.A = nn.Parameter(torch.empty(r, linear.in_features, device=linear.weight.device))
        self.B = nn.Parameter(torch.zeros(linear.out_features, r, device=linear.weight.device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scale = alpha / r
        self.dropout = nn.Dropout(dropout)

    def hook(self, module: nn.Module, args: tuple, out: Tensor) -> Tensor:
        x = self.dropout(args[0]).to(self.A.dtype)
        return out + ((x @ self.A.t()) @ self.B.t()).to(out.dtype) * self.scale

    def delta(self) -> Tensor:
        return (self.B @ self.A) * self.scale


class GrootPolicy(ProcessedPolicy, nn.Module):
    """GR00T N1.5 + its processor behind the policy interface."""

    def __init__(self, model: GrootModel, processor, settings: dict[str, Any]):
        super().__init__()
        self.model = model
        self.processor = processor
        self.settings = dict(settings)
        self.source: str | None = None
        self.lora = nn.ModuleDict()
        self._hooks: list = []
        self.apply_flags()
        lora = self.settings.get("lora")
        if lora:
            self.add_lora(**lora)

    # ------------------------------------------------------------------ what trains
    def apply_flags(self) -> None:
        s, m = self.settings, self.model
        m.set_trainable(bool(s.get("tune_llm", False)), bool(s.get("tune_visual", True)))
        head = m.head
        for mod in (head.state_encoder, head.action_encoder, head.action_decoder):
            mod.requires_grad_(bool(s.get("tune_projector", True)))
        if head.position_embedding is not None:
            head.position_embedding.requires_grad_(bool(s.get("tune_projector", True)))
        head.dit.requires_grad_(bool(s.get("tune_diffusion_model", True)))

    def add_lora(self, r: int, alpha: int, dropout: float, target_modules) -> None:
        targets = DIT_LINEARS if target_modules == "all-linear" else tuple(target_modules)
        found = 0
        for name, mod in self.model.head.dit.named_modules():
            if not isinstance(mod, nn.Linear) or ".transformer_blocks." not in f".{name}":
                continue
            if not any(name == t or name.endswith("." + t) for t in targets):
                continue
            adapter = LoRA(mod, r, alpha, dropout)
            self.lora[name.replace(".", "__")] = adapter
            self._hooks.append(mod.register_forward_hook(adapter.hook))
            found += 1
        if not found:
            raise ValueError(
                f"policy.lora.target_modules {target_modules!r} match no linear of the DiT blocks "
                f"(names end with one of {list(DIT_LINEARS)})"
            )

    def merged_state_dict(self) -> dict[str, Tensor]:
        """NVIDIA-keyed weights with the LoRA deltas added (what NVIDIA's loader can read)."""
        sd = to_released_state_dict(self.model)
        for key, adapter in self.lora.items():
            k = to_released_key("head.dit." + key.replace("__", ".") + ".weight")
            sd[k] = (sd[k].float() + adapter.delta().detach().float()).to(sd[k].dtype)
        return sd

    # ------------------------------------------------------------------ interface
    def compute_loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        loss, _ = self.model.compute_loss(P.model_batch(batch))
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def predict_chunk(self, batch: dict[str, Any]) -> Tensor:
        batch = {k: v for k, v in batch.items() if k not in ("action", "action_mask")}
        batch = P.model_batch(batch)
        return self.model.sample_actions(batch, steps=int(self.settings["num_inference_steps"]))

    def param_groups(self, optim_cfg) -> list[dict]:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("policy (groot): no trainable parameters (every tune_* flag is off)")
        return [{"params": params, "lr": optim_cfg.lr, "weight_decay": optim_cfg.weight_decay}]

    def num_parameters(self) -> tuple[int, int]:
        params = {id(p): p for p in self.parameters()}.values()
        return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)

    def lora_state_dict(self) -> dict[str, Tensor]:
        """`lora.safetensors`: per adapted linear `<name>.A`, `<name>.B` and `<name>.base` (the
        linear's own weight, unmerged), contiguous copies."""
        out: dict[str, Tensor] = {}
        for key, adapter in self.lora.items():
            linear = self.model.head.dit.get_submodule(key.replace("__", "."))
            out[f"{key}.A"] = adapter.A.detach().contiguous().clone()
            out[f"{key}.B"] = adapter.B.detach().contiguous().clone()
            out[f"{key}.base"] = linear.weight.detach().contiguous().clone()
        return out

    def save(self, folder: str | Path) -> Path:
        """NVIDIA's layout (LoRA merged into model.safetensors) + processor.json + settings +
        `lora.safetensors` for resuming (module docstring), atomically."""
        folder = Path(folder)
        with fsutil.atomic_dir(folder) as tmp:
            self.model.cfg.save(tmp)
            if len(self.lora):
                weights = self.merged_state_dict()
            else:
                weights = to_released_state_dict(self.model)
            save_file(weights, str(tmp / WEIGHTS), metadata={"format": "pt"})
            if len(self.lora):
                save_file(self.lora_state_dict(), str(tmp / LORA_FILE), metadata={"format": "pt"})
            fsutil.write_json(tmp / SETTINGS_FILE, self.settings)
            self.processor.save(tmp)
        return folder


# ---------------------------------------------------------------------- build / load
def _tokenizer_dir(pcfg, pretrained: Path) -> Path:
    if pcfg.tokenizer:
        return Path(pcfg.tokenizer)
    if (pretrained / "tokenizer").is_dir():
        return pretrained / "tokenizer"
    return pretrained


def _with_horizon(cfg: GrootConfig, horizon: int) -> GrootConfig:
    raw = json.loads(json.dumps(cfg.raw))
    raw["action_horizon"] = horizon
    raw["action_head_cfg"]["action_horizon"] = horizon
    if horizon > cfg.head.max_seq_len:
        raise ValueError(
            f"data.action_horizon {horizon} exceeds max_seq_len {cfg.head.max_seq_len}"
        )
    return GrootConfig(raw, cfg.eagle_raw, source="config")


def build_policy(cfg, stats: dict[str, Any], chunks=None) -> GrootPolicy:
    """The run's policy: NVIDIA's folder `cfg.policy.pretrained` (required), its chunk length set
    to `data.action_horizon`, the processor from the data config + statistics + tokenizer."""
    pcfg, data = cfg.policy, cfg.data
    if not pcfg.pretrained:
        raise ValueError(
            "policy.pretrained (groot) is required: an NVIDIA GR00T N1.5 folder (config.json, "
            "model.safetensors, eagle_config.json); GR00T is fine-tuned, not trained from scratch"
        )
    folder = Path(pcfg.pretrained)
    model, _ = load_released(folder, dtype=torch.float32)
    horizon = int(data.action_horizon)
    if horizon != model.cfg.head.action_horizon:
        model.cfg = _with_horizon(model.cfg, horizon)
        model.head.cfg = model.cfg.head
    aug = data.augment
    on = aug.enabled
    proc = P.build_processor(
        data.cameras,
        data.image_size,
        model.cfg,
        _tokenizer_dir(pcfg, folder),
        stats["action"],
        stats.get("state"),
        horizon=horizon,
        crop_area=aug.crop_area if on else 1.0,
        jitter=(aug.brightness, aug.contrast, aug.saturation) if on else (0.0, 0.0, 0.0),
        camera_dropout=data.camera_dropout,
        min_cameras=data.min_cameras,
        gripper_dim=data.gripper_dim,
        embodiment_id=pcfg.embodiment_id,
    )
    settings = {
        "tune_llm": pcfg.tune_llm,
        "tune_visual": pcfg.tune_visual,
        "tune_projector": pcfg.tune_projector,
        "tune_diffusion_model": pcfg.tune_diffusion_model,
        "lora": pcfg.lora.model_dump() if pcfg.lora is not None else None,
        "num_inference_steps": pcfg.num_inference_steps,
    }
    policy = GrootPolicy(model, proc, settings)
    policy.source = str(folder)
    return policy


def load_policy(path: str | Path) -> GrootPolicy:
    """A folder `GrootPolicy.save` wrote (weights, processor, settings, adapters), or NVIDIA's
    released folder, which has no dataset statistics: that is refused naming processor.json."""
    folder = Path(path)
    if not (folder / PROCESSOR_FILE).is_file():
        raise FileNotFoundError(
            f"{folder}: no {PROCESSOR_FILE}. NVIDIA's GR00T N1.5 folder carries no statistics of "
            "your data: fine-tune it with `vlatune train` (policy.type groot, policy.pretrained "
            "this folder), whose checkpoints hold processor.json"
        )
    model, _ = load_released(folder, dtype=torch.float32)
    proc = P.load_processor(folder)
    settings_file = folder / SETTINGS_FILE
    settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
    settings.setdefault("num_inference_steps", model.cfg.head.num_inference_timesteps)
    policy = GrootPolicy(model, proc, settings)
    if len(policy.lora):
        if not (folder / LORA_FILE).is_file():
            raise FileNotFoundError(
                f"{folder}: {SETTINGS_FILE} names LoRA but {LORA_FILE} is missing"
            )
        _restore_lora(policy, folder / LORA_FILE)
    policy.source = str(folder)
    return policy


def _restore_lora(policy: GrootPolicy, path: Path) -> None:
    """`lora.safetensors` into a policy loaded from the merged model.safetensors: each adapted
    linear gets its `.base` weight back (bit-identical to the saved policy's), each adapter its
    A and B. Without `.base` keys (a folder written before the merged layout) the loaded
    weights are already the base."""
    tensors = load_file(str(path))
    own: set[str] = set()
    for key, adapter in policy.lora.items():
        own.update(f"{key}.{p}" for p in ("A", "B", "base"))
        for p in ("A", "B"):
            name = f"{key}.{p}"
            if name not in tensors:
                raise KeyError(f"{path}: key {name} missing (the LoRA settings name this layer)")
            getattr(adapter, p).data.copy_(tensors[name])
    unexpected = sorted(set(tensors) - own)
    if unexpected:
        raise KeyError(f"{path}: keys of no adapted layer: {unexpected[:5]}")
    if not any(k.endswith(".base") for k in tensors):
        return
    for key in policy.lora:
        name = f"{key}.base"
        if name not in tensors:
            raise KeyError(f"{path}: key {name} missing (other layers have their .base weight)")
        linear = policy.model.head.dit.get_submodule(key.replace("__", "."))
        if tuple(tensors[name].shape) != tuple(linear.weight.shape):
            raise ValueError(
                f"{path}: {name} has shape {tuple(tensors[name].shape)}, the layer's weight "
                f"{tuple(linear.weight.shape)}"
            )
        linear.weight.data.copy_(tensors[name])
