"""The `nora` family for `vlatune train` / `vlatune eval`: NORA / NORA-Long fine-tuned as NORA
fine-tunes them (next-token loss on the FAST+ action tokens, LoRA r16 by default).

- `build_policy(cfg, stats)`: starts from `policy.pretrained`, a local NORA folder (a hub id is
  refused: download it first) and the FAST+ tokenizer (`policy.fast_tokenizer`, default
  `<pretrained>/fast_tokenizer`). The FAST time horizon is `data.action_horizon` (1 for
  `declare-lab/nora`, 5 for `declare-lab/nora-long`; a horizon other than the checkpoint's is
  allowed, as NORA-Long was NORA fine-tuned to 5, and logged). Actions are normalised with the
  dataset's q01 / q99 (gripper in NORA's [0, 1], masked), or with NORA's `norm_stats.json`
  when `policy.keep_norm_stats`. The processor (`processor.build_processor`) runs in the
  loader workers and at evaluation.
- `NoraFamilyPolicy`: `NoraPolicy` + `ProcessedPolicy` (the `vlatune eval` interface).
  `predict_chunk` returns the normalised chunk (the processor's inverses unnormalise it and
  convert the gripper); undecodable generations are answered with the safe chunk and counted
  (`model_fallbacks()["undecodable_tokens"]`).
- `save(folder)`: NORA's layout (merged weights when LoRA is on, tokenizer, image processor,
  `norm_stats.json`) + `fast_tokenizer/`, `nora_config.json`, `processor.json`,
  `lora_adapters.safetensors` and `vlatune_nora.json`, written under a temporary name.
- `load_policy(path)`: such a folder (LoRA adapters put back, the merged base minus their
  product: equal to float rounding), or a released NORA folder without `processor.json` (the
  processor from its `norm_stats.json`; `fast_tokenizer/` must be in the folder).

    >>> policy = load_policy("runs/nora/checkpoint-2/policy")
    >>> actions = policy.predict(obs)          # (H, 7) env actions
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vlatune.fsutil import atomic_dir, write_json
from vlatune.policies.nora import processor as P
from vlatune.policies.nora.configuration import (
    CONFIG_FILE,
    FAST_FOLDER,
    NORM_STATS,
    horizon_for,
)
from vlatune.policies.nora.convert import load_released
from vlatune.policies.nora.modeling import NoraPolicy
from vlatune.policies.processor import PROCESSOR_FILE, ProcessedPolicy, Processor

log = logging.getLogger(__name__)
META_NAME = "vlatune_nora.json"
META_FORMAT = "vlatune-nora/1"
LORA_NAME = "lora_adapters.safetensors"
DATASET_KEY = "vlatune"  # the norm_stats.json key of the dataset's statistics (no unnorm_key)


class NoraFamilyPolicy(ProcessedPolicy, NoraPolicy):
    """NORA behind the policy interface, with its processor."""

    def __init__(
        self,
        model,
        tokenizer,
        image_processor,
        fast,
        cfg,
        processor: Processor,
        spec: dict[str, Any],
        norm_stats: dict[str, Any] | None = None,
        unnorm_key: str | None = None,
    ):
        super().__init__(model, tokenizer, image_processor, fast, cfg, norm_stats, unnorm_key)
        self.processor = processor
        self.spec = dict(spec)
        self.source: str | None = None

    @classmethod
    def wrap(cls, base: NoraPolicy, processor, spec, norm_stats, unnorm_key):
        return cls(
            base.model,
            base.tokenizer,
            base.image_processor,
            base.fast,
            base.cfg,
            processor,
            spec,
            norm_stats,
            unnorm_key,
        )

    def _model_inputs(self, batch: dict[str, Any], with_labels: bool):
        """A processor batch (fixed-length prompts + `target_ids`) is joined into NORA's
        left-padded batch first; a NORA batch or a raw batch goes on as `NoraPolicy` takes it."""
        if "input_ids" in batch and "labels" not in batch:
            if with_labels and "target_ids" not in batch:
                raise KeyError(
                    "NORA's loss needs `target_ids` (the processor adds them to samples with "
                    "an action chunk)"
                )
            batch = P.join_batch(batch, self.pad_id, self.cfg, with_labels)
        return super()._model_inputs(batch, with_labels)

    def model_fallbacks(self) -> dict[str, int]:
        """`undecodable_tokens`: queries FAST could not decode (answered with the safe chunk)."""
        return {"undecodable_tokens": int(self.decode_failures)}

    def enable_gradient_checkpointing(self) -> str:
        enable = getattr(self.model, "activation_checkpointing_enable", None)
        (enable or self.model.gradient_checkpointing_enable)()
        if self.lora is not None:
            self.model.enable_input_require_grads()
        return "Qwen2.5-VL gradient checkpointing on"

    # ------------------------------------------------------------------ folder
    def adapter_state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        sd = get_peft_model_state_dict(self.model)
        return {k: v.detach().cpu().contiguous() for k, v in sd.items()}

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        model = self.model
        adapters = None
        if self.lora is not None:
            adapters = self.adapter_state()
            model = copy.deepcopy(self.model).merge_and_unload()
        with atomic_dir(folder) as tmp:
            model.save_pretrained(tmp)
            self.processor.save(tmp)  # tokenizer, image processor, fast_tokenizer/
            if self.norm_stats is not None:
                (tmp / NORM_STATS).write_text(json.dumps(self.norm_stats, indent=2) + "\n")
            (tmp / CONFIG_FILE).write_text(json.dumps(self.cfg.to_json(), indent=2) + "\n")
            if adapters is not None:
                save_file(adapters, str(tmp / LORA_NAME))
            write_json(tmp / META_NAME, {"format": META_FORMAT, **self.spec})
        return folder


def _lora_args(lora: dict[str, Any]) -> dict[str, Any]:
    return {
        "r": int(lora["r"]),
        "alpha": int(lora["alpha"]),
        "dropout": float(lora["dropout"]),
        "target_modules": lora.get("target_modules", "all-linear"),
    }


def build_policy(cfg, stats: dict[str, Any], chunks=None) -> NoraFamilyPolicy:
    """A policy for `vlatune train` from `policy.pretrained` and the training statistics."""
    p = cfg.policy
    if not p.pretrained:
        raise ValueError(
            "policy.pretrained: the nora family starts from a NORA folder (declare-lab/nora or "
            "declare-lab/nora-long, downloaded); none was given"
        )
    folder = Path(p.pretrained).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"policy.pretrained {p.pretrained!r} is not a local folder: hub models are not "
            f"downloaded by vlatune; run `huggingface-cli download {p.pretrained} --local-dir "
            "DIR` and set policy.pretrained=DIR"
        )
    fast = Path(p.fast_tokenizer).expanduser() if p.fast_tokenizer else folder / FAST_FOLDER
    if not fast.is_dir():
        raise FileNotFoundError(
            f"policy.fast_tokenizer: no FAST tokenizer folder at {fast}; download "
            "physical-intelligence/fast (FAST+) and set policy.fast_tokenizer to it"
        )
    horizon = int(cfg.data.action_horizon)
    meta = folder / CONFIG_FILE
    named = json.loads(meta.read_text())["horizon"] if meta.is_file() else horizon_for(folder.name)
    if named != horizon:
        log.warning(
            "nora: %s was trained with FAST horizon %d; fine-tuning with data.action_horizon %d",
            folder,
            named,
            horizon,
        )
    base = load_released(
        folder,
        fast_tokenizer=fast,
        horizon=horizon,
        dtype=p.dtype,
        max_new_tokens=p.max_new_tokens,
    )
    if p.keep_norm_stats:
        key = p.unnorm_key
        entry = P.action_stats(base.norm_stats, key)
        key = key or next(iter(base.norm_stats))
        norm_stats, source = base.norm_stats, "NORA norm_stats.json"
    else:
        key = p.unnorm_key or DATASET_KEY
        entry = P.stats_entry(stats, cfg.data.gripper_dim)
        norm_stats, source = {key: {"action": entry}}, "dataset"
    if len(entry["q01"]) != base.cfg.action_dim:
        raise ValueError(
            f"the action statistics have {len(entry['q01'])} dims, NORA's actions "
            f"{base.cfg.action_dim}"
        )
    camera = p.camera or list(cfg.data.cameras)[0]
    processor = P.build_processor(
        base.tokenizer,
        base.image_processor,
        base.fast,
        base.cfg,
        entry,
        camera,
        cfg.data.gripper_dim,
        p.max_prompt_tokens,
        source,
    )
    spec = {
        "lora": p.lora.model_dump() if p.lora else None,
        "unnorm_key": key,
        "dtype": p.dtype,
        "keep_norm_stats": bool(p.keep_norm_stats),
    }
    policy = NoraFamilyPolicy.wrap(base, processor, spec, norm_stats, key)
    if p.lora:
        n = policy.apply_lora(**_lora_args(spec["lora"]))
        log.info("nora: LoRA r%d on all linear layers, %d trainable parameters", p.lora.r, n)
    policy.source = str(folder)
    return policy


def _restore_adapters(policy: NoraFamilyPolicy, path: Path) -> None:
    """Adapters back into the peft model; model.safetensors held the merged weights, so each
    base weight becomes merged - B A scale (float rounding, not bit exact)."""
    from peft import set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    sd = load_file(str(path))
    want = set(policy.adapter_state())
    if set(sd) != want:
        raise KeyError(
            f"{path}: adapter keys differ from the model's: missing {sorted(want - set(sd))[:5]}, "
            f"unexpected {sorted(set(sd) - want)[:5]}"
        )
    set_peft_model_state_dict(policy.model, sd)
    with torch.no_grad():
        for m in policy.model.modules():
            if isinstance(m, LoraLayer) and "default" in getattr(m, "lora_A", {}):
                w = m.base_layer.weight
                w.copy_((w.float() - m.get_delta_weight("default").float()).to(w.dtype))


def load_policy(path) -> NoraFamilyPolicy:
    """A folder this family saved (`vlatune_nora.json` + `processor.json`), or a released NORA
    folder (the processor from its norm_stats.json and `fast_tokenizer/`)."""
    folder = Path(path).expanduser()
    if (folder / "policy" / "config.json").is_file():
        folder = folder / "policy"
    meta_path = folder / META_NAME
    if not meta_path.is_file():
        return _load_released_folder(folder)
    spec = json.loads(meta_path.read_text())
    if spec.pop("format", None) != META_FORMAT:
        raise ValueError(f"{meta_path}: key 'format' is not {META_FORMAT!r}")
    if not (folder / PROCESSOR_FILE).is_file():
        raise FileNotFoundError(f"{folder}: no {PROCESSOR_FILE} beside {META_NAME}")
    processor = Processor.load(folder)
    enc = next((s for s in processor.steps if isinstance(s, P.EncodeStep)), None)
    if enc is None:
        raise ValueError(f"{folder / PROCESSOR_FILE}: no nora.encode step")
    base = load_released(
        folder,
        fast_tokenizer=enc.fast,
        horizon=enc.cfg.horizon,
        dtype=spec.get("dtype", "float32"),
        max_new_tokens=enc.cfg.max_new_tokens,
    )
    # one tokenizer / FAST object for the processor and the model
    base.tokenizer, base.image_processor = enc.tokenizer, enc.image_processor
    policy = NoraFamilyPolicy.wrap(base, processor, spec, base.norm_stats, spec.get("unnorm_key"))
    if spec.get("lora"):
        policy.apply_lora(**_lora_args(spec["lora"]))
        lora_path = folder / LORA_NAME
        if not lora_path.is_file():
            raise FileNotFoundError(f"{folder}: no {LORA_NAME}, but the policy was saved with LoRA")
        _restore_adapters(policy, lora_path)
    policy.source = str(folder)
    return policy


def _load_released_folder(folder: Path) -> NoraFamilyPolicy:
    base = load_released(folder)
    stats = base.norm_stats
    if len(stats) != 1:
        raise ValueError(
            f"{folder / NORM_STATS}: {len(stats)} datasets {sorted(stats)}; a released folder "
            "loads by itself only with one (build it with policy.keep_norm_stats and "
            "policy.unnorm_key to choose)"
        )
    key = next(iter(stats))
    entry = P.action_stats(stats, key)
    processor = P.build_processor(
        base.tokenizer,
        base.image_processor,
        base.fast,
        base.cfg,
        entry,
        "agentview",
        -1,
        256,
        "NORA norm_stats.json",
    )
    spec = {"lora": None, "unnorm_key": key, "dtype": "float32", "keep_norm_stats": True}
    policy = NoraFamilyPolicy.wrap(base, processor, spec, stats, key)
    policy.source = str(folder)
    return policy
