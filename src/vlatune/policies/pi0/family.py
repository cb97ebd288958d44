"""The pi0 family behind `vlatune train` / `vlatune eval`: build from a released folder, save, load.

`build_policy(cfg, stats)` starts from `cfg.policy.pretrained`, a local LeRobot pi0 / pi0.5
folder (`lerobot/pi0_base`, `lerobot/pi05_base` downloaded with `huggingface-cli download`):
there is no random-weight start, a recipe without a folder is refused. The released config is
adapted to the dataset (chunk = `data.action_horizon`, state / action sizes from the statistics,
cameras = `data.cameras` + `policy.empty_cameras`); the weights do not depend on these. The
processor (`vlatune.policies.pi0.processor.build_processor`) is built from the data config, the
statistics and the PaliGemma tokenizer (`policy.tokenizer`).

A saved policy folder is LeRobot's layout (`config.json` + `model.safetensors`, what LeRobot's
`from_pretrained` reads, plus `pi0_arch.json`) with `processor.json` (+ `tokenizer/`) and
`pi0_training.json` (what trains: freezing, LoRA). LoRA checkpoints: `model.safetensors` always
holds the merged weights (deployable as they are); the adapters are kept besides in
`lora_adapters.safetensors`, and loading rebuilds the trainable adapters on the base weights of
`policy.pretrained` (recorded in `pi0_training.json`) when that folder is still there, so a
resumed run continues the same adapters and optimizer state; without it the merged model loads
for evaluation.

    >>> policy = build_policy(cfg, stats)                # cfg.policy.type == "pi0"
    >>> policy.save("out"); again = load_policy("out")   # vlatune eval --policy out
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vlatune import fsutil
from vlatune.policies.pi0.configuration import Pi0Config
from vlatune.policies.pi0.convert import (
    from_released_state_dict,
    load_released,
    load_strict,
    to_released_key,
)
from vlatune.policies.pi0.policy import Pi0Policy
from vlatune.policies.pi0.processor import build_processor, load_tokenizer
from vlatune.policies.processor import PROCESSOR_FILE, ProcessedPolicy, Processor, batch_to_device

log = logging.getLogger(__name__)

TRAINING_FILE = "pi0_training.json"
ADAPTERS_FILE = "lora_adapters.safetensors"
NORM_NAMES = {"mean_std": "MEAN_STD", "q99": "QUANTILES", "none": "IDENTITY"}


class Pi0FamilyPolicy(ProcessedPolicy, Pi0Policy):
    """`Pi0Policy` with its processor: the trainer's interface and `vlatune eval`'s."""

    def __init__(self, model, processor: Processor, training: dict[str, Any] | None = None):
        super().__init__(model)
        self.processor = processor
        self.training_state = dict(training or {})
        self.source: str | None = None

    # batches come from the loader on the CPU; the trainer moves tensors and dicts of tensors,
    # not the lists `images` / `img_masks` are, so the policy moves what is left
    def _on_device(self, batch: dict) -> dict:
        device = next(self.model.parameters()).device
        return batch_to_device(batch, device)

    def compute_loss(self, batch):
        return super().compute_loss(self._on_device(batch))

    @torch.no_grad()
    def predict_chunk(self, batch):
        return super().predict_chunk(self._on_device(batch))

    def param_groups(self, optim_cfg=None, lr: float | None = None, weight_decay: float = 0.0):
        """The trainer passes `cfg.optim`; `lr=` / `weight_decay=` as `Pi0Policy`'s."""
        if optim_cfg is not None:
            lr, weight_decay = optim_cfg.lr, optim_cfg.weight_decay
        return super().param_groups(lr=lr, weight_decay=weight_decay)

    def enable_gradient_checkpointing(self) -> str:
        self.model.gradient_checkpointing = True
        return "each joint VLM + expert layer recomputed in the backward pass"

    def has_lora(self) -> bool:
        return any("lora_" in k for k in self.model.state_dict())

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """Our-named tensors with the adapters folded in (the live model is not changed)."""
        from peft.tuners.lora import LoraLayer

        deltas = {}
        for name, module in self.model.named_modules():
            if isinstance(module, LoraLayer):
                deltas[f"{name}.base_layer.weight"] = module.get_delta_weight("default")
        out = {}
        for k, v in self.model.state_dict().items():
            if "lora_" in k:
                continue
            if k in deltas:
                v = (v.float() + deltas[k].float()).to(v.dtype)
            out[k.replace(".base_layer.", ".")] = v
        return out

    def save(self, folder: str | Path) -> None:
        """LeRobot's layout (adapters merged) + processor.json + pi0_training.json, atomically."""
        tensors = {
            to_released_key(k): v.detach().contiguous().clone()
            for k, v in self.merged_state_dict().items()
        }
        adapters = {
            k: v.detach().contiguous().clone()
            for k, v in self.model.state_dict().items()
            if "lora_" in k
        }
        with fsutil.atomic_dir(Path(folder)) as tmp:
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            (tmp / "config.json").write_text(json.dumps(self.cfg.to_lerobot(), indent=4) + "\n")
            (tmp / "pi0_arch.json").write_text(json.dumps(self.cfg.arch_dict(), indent=2) + "\n")
            if adapters:
                save_file(adapters, str(tmp / ADAPTERS_FILE), metadata={"format": "pt"})
            fsutil.write_json(tmp / TRAINING_FILE, self.training_state)
            self.processor.save(tmp)


def _local_folder(value: str, key: str, example: str) -> Path:
    path = Path(value).expanduser()
    if path.is_dir():
        return path
    raise FileNotFoundError(
        f"{key} '{value}' is not a local folder and vlatune does not download models: run "
        f"`huggingface-cli download {value if '/' in value else example} --local-dir DIR` and "
        f"pass {key}=DIR"
    )


def _tokenizer(value: str):
    if Path(value).expanduser().is_dir():
        return load_tokenizer(str(Path(value).expanduser()))
    from transformers import AutoTokenizer

    try:  # a hub id already in the local cache; never a download
        return AutoTokenizer.from_pretrained(value, local_files_only=True)
    except (OSError, ValueError):
        raise FileNotFoundError(
            f"policy.tokenizer '{value}' is neither a local folder nor in the Hugging Face cache "
            f"and vlatune does not download: run `huggingface-cli download {value} --local-dir "
            "DIR` and pass policy.tokenizer=DIR"
        ) from None


def _adapted_config(base: Pi0Config, cfg, state_dim: int | None, action_dim: int) -> Pi0Config:
    """The released config for this dataset: chunk, state / action sizes, cameras, features."""
    d, p = cfg.data, cfg.policy
    lerobot = dict(base.lerobot_config or base.to_lerobot())
    feats: dict[str, Any] = {
        f"observation.images.{cam}": {
            "type": "VISUAL",
            "shape": [3, base.image_size, base.image_size],
        }
        for cam in d.cameras
    }
    if state_dim is not None:
        feats["observation.state"] = {"type": "STATE", "shape": [state_dim]}
    norm = NORM_NAMES[d.normalization]
    lerobot.update(
        input_features=feats,
        output_features={"action": {"type": "ACTION", "shape": [action_dim]}},
        empty_cameras=p.empty_cameras,
        normalization_mapping={"VISUAL": "IDENTITY", "STATE": norm, "ACTION": norm},
        freeze_vision_encoder=p.freeze_vision,
        train_expert_only=p.train_expert_only,
    )
    values = base.model_dump()
    values.update(
        chunk_size=d.action_horizon,
        n_action_steps=d.action_horizon,
        state_dim=state_dim if state_dim is not None else base.state_dim,
        action_dim=action_dim,
        num_cameras=len(d.cameras) + p.empty_cameras,
        lerobot_config=lerobot,
    )
    return Pi0Config(**values)


def _apply_training(policy: Pi0FamilyPolicy, training: dict[str, Any]) -> None:
    if training.get("freeze_vision") or training.get("train_expert_only"):
        policy.freeze(
            vision=bool(training.get("freeze_vision")), vlm=bool(training.get("train_expert_only"))
        )
    lora = training.get("lora")
    if lora:
        policy.apply_lora(r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"])


def build_policy(cfg, stats: dict[str, Any], chunks=None) -> Pi0FamilyPolicy:
    """A pi0 / pi0.5 policy from `cfg.policy.pretrained` with its processor for `cfg.data`."""
    from vlatune.data.transforms import Normalizer

    p, d = cfg.policy, cfg.data
    example = "lerobot/pi05_base" if p.variant == "pi05" else "lerobot/pi0_base"
    if not p.pretrained:
        raise ValueError(
            f"policy.pretrained is not set: the pi0 family fine-tunes a released checkpoint "
            f"(`huggingface-cli download {example} --local-dir DIR`, then policy.pretrained=DIR)"
        )
    folder = _local_folder(p.pretrained, "policy.pretrained", example)
    if d.augment.enabled or d.camera_dropout > 0:
        raise ValueError(
            "the pi0 family trains without image augmentation or camera dropout (as LeRobot): "
            "set data.augment.enabled=false and data.camera_dropout=0"
        )
    model, report = load_released(folder)
    if model.cfg.variant != p.variant:
        raise ValueError(
            f"policy.variant is '{p.variant}' but {folder / 'config.json'} has type "
            f"'{model.cfg.variant}': set policy.variant={model.cfg.variant}"
        )
    if d.image_size != model.cfg.image_size:
        raise ValueError(
            f"data.image_size is {d.image_size} but {folder} takes {model.cfg.image_size} px "
            f"(its SigLIP position embeddings): set data.image_size={model.cfg.image_size}"
        )
    a_norm = Normalizer.from_stats(stats["action"], d.normalization)  # gripper included
    s_norm = Normalizer.from_stats(stats["state"], d.normalization) if "state" in stats else None
    state_dim = len(s_norm.low) if s_norm is not None else None
    model.cfg = _adapted_config(model.cfg, cfg, state_dim, len(a_norm.low))
    processor = build_processor(
        p.variant, d.cameras, model.cfg.image_size, _tokenizer(p.tokenizer),
        model.cfg.tokenizer_max_length, a_norm, s_norm, model.cfg.max_state_dim,
        model.cfg.max_action_dim, p.empty_cameras, d.action_horizon,
    )  # fmt: skip
    training = {
        "freeze_vision": p.freeze_vision,
        "train_expert_only": p.train_expert_only,
        "lora": None
        if p.lora is None
        else {"r": p.lora.r, "alpha": p.lora.alpha, "dropout": p.lora.dropout},
        "base": str(folder.resolve()),
    }
    policy = Pi0FamilyPolicy(model, processor, training)
    _apply_training(policy, training)
    policy.source = str(folder)
    for line in report.lines():
        log.info("pi0: %s", line)
    return policy


def load_policy(path: str | Path) -> Pi0FamilyPolicy:
    """A folder this family saved (LeRobot's layout + processor.json): the policy as trained,
    trainable again (LoRA adapters rebuilt on the recorded base folder when it exists)."""
    path = Path(path)
    if not (path / PROCESSOR_FILE).is_file():
        raise FileNotFoundError(
            f"{path / PROCESSOR_FILE} not found: a LeRobot pi0 / pi0.5 folder without vlatune's "
            "processor has no dataset statistics vlatune reads (LeRobot keeps them in its "
            "policy_preprocessor files); fine-tune it with `vlatune train` (policy.pretrained="
            f"{path}) or use vlatune.policies.pi0.convert.load_released for the bare model"
        )
    processor = Processor.load(path)
    model, _ = load_released(path)
    training_file = path / TRAINING_FILE
    training = json.loads(training_file.read_text()) if training_file.is_file() else {}
    adapters_file = path / ADAPTERS_FILE
    base = Path(training.get("base") or "")
    rebuild = training.get("lora") and adapters_file.is_file()
    if rebuild and not (base / "model.safetensors").is_file():
        log.warning(
            "%s: LoRA base folder %s is gone; loaded the merged weights (evaluation works, "
            "resuming the adapters does not)",
            path,
            base,
        )
        training = {**training, "lora": None}
        rebuild = False
    if rebuild:  # the exact base weights under this folder's config, then the saved adapters
        sd, _ = from_released_state_dict(
            load_file(str(base / "model.safetensors")), model.cfg, str(base / "model.safetensors")
        )
        load_strict(model, sd, str(base / "model.safetensors"))
        if model.cfg.dtype == "bfloat16":
            model.set_precision("bfloat16")
    policy = Pi0FamilyPolicy(model, processor, training)
    if rebuild:
        _apply_training(policy, training)
        adapters = load_file(str(adapters_file))
        own = {k for k in policy.model.state_dict() if "lora_" in k}
        if set(adapters) != own:
            raise ValueError(
                f"{adapters_file}: adapter keys differ from the model's LoRA layers "
                f"(missing {sorted(own - set(adapters))[:3]}, unexpected "
                f"{sorted(set(adapters) - own)[:3]})"
            )
        policy.model.load_state_dict(adapters, strict=False)
    else:
        frozen = {k: v for k, v in training.items() if k != "lora"}
        _apply_training(policy, frozen)
    policy.source = str(path)
    return policy
