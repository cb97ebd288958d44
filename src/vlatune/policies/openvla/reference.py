"""Compare this port with the reference fixtures `openvla/` and `openvla_oft/`.

`check_reference(folder)` detects the family from the folder's files (OFT has an
`action_head--*_checkpoint.pt`), loads the checkpoint through `convert.load_released` (strict:
missing == unexpected == [], tensor count and shapes as `keys.txt`), with the tiny tower sizes of
`reference_arch.json` (`timm_overrides`) and OFT's constants (`oft_constants`), feeds
`inputs.safetensors` and asserts `expected.safetensors` at the fixture README's tolerances:
1e-4 for logits / losses / hidden states / actions, 1e-5 for the single-layer OFT outputs,
exact equality for token ids and argmaxes. Every size comes from the folder's files.

    >>> check_reference(Path("../shared/reference/openvla"))
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from vlatune.policies.openvla.configuration import OFTConfig
from vlatune.policies.openvla.convert import ACTION_HEAD_GLOB, load_released
from vlatune.policies.reference_check import assert_close

TOL = 1e-4
TOL_LAYER = 1e-5


def _equal(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    assert torch.equal(got.long().cpu(), want.long()), (
        f"{name}: {got.tolist()} != expected {want.tolist()}"
    )


def _check_keys(folder: Path, model_sd: dict[str, torch.Tensor], section: str | None) -> None:
    """Tensor count and shapes of keys.txt's section (`model.safetensors` or a side file)."""
    rows, cur = {}, "model.safetensors"
    for line in (folder / "keys.txt").read_text().splitlines():
        if line.startswith("# ("):
            cur = line[3:].rstrip(")")
            continue
        if not line.strip() or line.startswith("#"):
            continue
        key, shape, _ = line.split("\t")
        if cur == (section or "model.safetensors"):
            rows[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    assert len(rows) == len(model_sd), f"keys.txt lists {len(rows)} tensors, loaded {len(model_sd)}"
    for k, shape in rows.items():
        assert k in model_sd, f"keys.txt key {k} not loaded"
        assert tuple(model_sd[k].shape) == shape, f"{k}: {tuple(model_sd[k].shape)} != {shape}"


def check_reference(folder: Path) -> None:
    folder = Path(folder)
    arch = json.loads((folder / "reference_arch.json").read_text())
    overrides = arch.get("timm_overrides", {})
    if any(folder.glob(ACTION_HEAD_GLOB)):
        _check_oft(folder, arch, overrides)
    else:
        _check_openvla(folder, arch, overrides)


def _check_openvla(folder: Path, arch: dict, overrides: dict) -> None:
    from vlatune.policies.openvla.convert import released_state_dict

    model, _ = load_released(folder, timm_overrides=overrides)
    model.eval()
    _check_keys(folder, released_state_dict(model), None)
    inp, exp = (
        load_file(str(folder / "inputs.safetensors")),
        load_file(str(folder / "expected.safetensors")),
    )
    with torch.no_grad():
        pv = inp["pixel_values"]
        feats = model.vision_backbone(pv)
        assert_close("intermediate.patch_features", feats, exp["intermediate.patch_features"], TOL)
        assert_close(
            "intermediate.projected_patches",
            model.projector(feats),
            exp["intermediate.projected_patches"],
            TOL,
        )
        out = model(inp["input_ids"], inp["attention_mask"], pv, inp["labels"])
        logits = out["logits"].float()
        assert_close("loss", out["loss"], exp["loss"], TOL)
        assert_close("loss_elementwise", out["loss_elementwise"], exp["loss_elementwise"], TOL)
        assert_close("logits_logsumexp", logits.logsumexp(-1), exp["logits_logsumexp"], TOL)
        cols = exp["logit_columns"]
        assert_close("logits_at_columns", logits[..., cols], exp["logits_at_columns"], TOL)
        _equal("logits_argmax", logits.argmax(-1), exp["logits_argmax"])
        unnorm_key = arch.get("unnorm_key") or next(iter(model.config.norm_stats))
        acts, ids = [], []
        for i in range(pv.shape[0]):
            a, t = model.predict_action(inp[f"prompt_ids.{i}"][None], pv[i : i + 1], unnorm_key)
            acts.append(a[0])
            ids.append(t[0])
        _equal("action_token_ids", torch.stack(ids), exp["action_token_ids"])
        assert_close("actions", np.stack(acts), exp["actions"], TOL)


def _check_oft(folder: Path, arch: dict, overrides: dict) -> None:
    oft = OFTConfig.from_constants(arch["oft_constants"])
    model, heads = load_released(folder, timm_overrides=overrides, oft=oft)
    from vlatune.policies.openvla.convert import released_state_dict

    _check_keys(folder, released_state_dict(model), None)
    _check_keys(
        folder,
        {"module." + k: v for k, v in heads.action_head.state_dict().items()},
        next(p.name for p in folder.glob(ACTION_HEAD_GLOB)),
    )
    _check_keys(
        folder,
        {"module." + k: v for k, v in heads.proprio_projector.state_dict().items()},
        next(p.name for p in folder.glob("proprio_projector--*_checkpoint.pt")),
    )
    inp, exp = (
        load_file(str(folder / "inputs.safetensors")),
        load_file(str(folder / "expected.safetensors")),
    )
    heads.action_head.eval()
    with torch.no_grad():
        norm = heads.action_head.predict_action(inp["actions_hidden_states"])
        assert_close("normalized_actions", norm, exp["normalized_actions"], TOL_LAYER)
        assert_close(
            "proprio_features",
            heads.proprio_projector(inp["proprio"]),
            exp["proprio_features"],
            TOL_LAYER,
        )
        loss = heads.action_head.l1_loss(inp["actions_hidden_states"], inp["ground_truth_actions"])
        assert_close("l1_loss", loss, exp["l1_loss"], TOL_LAYER)
        key = arch.get("unnorm_key") or next(iter(model.config.norm_stats))
        acts = [
            unnormalize_oft(model, norm[i].numpy(), key, oft.normalization_type)
            for i in range(norm.shape[0])
        ]
        assert_close("actions", np.stack(acts), exp["actions"], TOL)


def unnormalize_oft(model, normalized: np.ndarray, key: str, norm_type: str) -> np.ndarray:
    """OFT's `_unnormalize_actions`: bounds_q99 (q01/q99) or bounds (min/max), range + 1e-8."""
    st = model.action_stats(key)
    if norm_type == "bounds":
        high, low = np.array(st["max"]), np.array(st["min"])
    elif norm_type == "bounds_q99":
        high, low = np.array(st["q99"]), np.array(st["q01"])
    else:
        raise ValueError(f"OFT normalisation type {norm_type!r}: expected 'bounds' or 'bounds_q99'")
    mask = np.array(st.get("mask", np.ones_like(low, dtype=bool)))
    return np.where(mask, 0.5 * (normalized + 1) * (high - low + 1e-8) + low, normalized)
