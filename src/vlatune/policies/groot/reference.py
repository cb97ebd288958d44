"""The GR00T N1.5 family against NVIDIA's own outputs: `check_reference(folder)` for the harness.

`folder` is a fixture as `../shared/reference/groot_n15` (README there): a tiny checkpoint saved
by `GR00TN15.save_pretrained` (+ `eagle_config.json`), `inputs.safetensors` (NVIDIA's model-level
batch and the recorded draws) and `expected.safetensors`. Every size comes from the folder's
files. The draws replace our samplers in the reference's order: training draws the flow noise
(`noise`), then the raw Beta draw (`beta_sample`; our t = (s - beta) / s is compared with the
recorded `time`); sampling draws `inference_noise`. Tolerance atol = rtol = 1e-4 (the fixtures' README).

    >>> check_reference(Path("../shared/reference/groot_n15"))   # AssertionError names a mismatch
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from vlatune.policies.groot.convert import load_released, normalize_released_key, to_released_key
from vlatune.policies.reference_check import assert_close, read_keys_txt


def keys_txt(folder: Path) -> dict[str, tuple[int, ...]]:
    """keys.txt with each key in NVIDIA's layout (either SigLIP layout, convert.py)."""
    shapes = read_keys_txt(Path(folder) / "keys.txt")
    return {normalize_released_key(k)[0]: v for k, v in shapes.items()}


class Replay:
    """Recorded draws handed out in order; fails if the model asks for another kind or shape."""

    def __init__(self, draws: list[tuple[str, torch.Tensor]]):
        self.draws = list(draws)

    def take(self, kind: str, shape) -> torch.Tensor:
        assert self.draws, f"the model drew an extra {kind} beyond the recorded ones"
        want, t = self.draws.pop(0)
        assert want == kind, f"the model drew {kind} where the reference drew {want}"
        assert tuple(t.shape) == tuple(shape), (
            f"{kind}: drawn with shape {tuple(shape)}, recorded {tuple(t.shape)}"
        )
        return t.clone()

    def done(self) -> None:
        assert not self.draws, f"recorded draws left unused: {[k for k, _ in self.draws]}"


def check_reference(folder: Path) -> None:
    """Strict load, key list, backbone features, elementwise / reduced loss and sampled actions."""
    folder = Path(folder)
    model, report = load_released(folder)
    model.eval()
    # 1. the checkpoint: every key of keys.txt with its shape, and nothing else
    listed = keys_txt(folder)
    ours = {to_released_key(k): tuple(v.shape) for k, v in model.state_dict().items()}
    if report.lm_head_tied_from_embeddings:  # tied: the file holds embed_tokens only
        ours = {k: v for k, v in ours.items() if not k.endswith("language_model.lm_head.weight")}
    assert set(ours) == set(listed), (
        f"{folder}: keys differ from keys.txt: missing {sorted(set(listed) - set(ours))[:5]}, "
        f"extra {sorted(set(ours) - set(listed))[:5]}"
    )
    bad = [k for k in listed if listed[k] != ours[k]]
    assert not bad, f"{folder}: shapes differ from keys.txt for {bad[:5]}"
    assert report.tensors == len(listed), report.lines()

    inputs = load_file(str(folder / "inputs.safetensors"))
    expected = load_file(str(folder / "expected.safetensors"))
    batch = {
        k: inputs[k]
        for k in (
            "eagle_input_ids",
            "eagle_attention_mask",
            "eagle_pixel_values",
            "state",
            "embodiment_id",
            "action",
            "action_mask",
        )
    }
    # 2. the backbone alone
    with torch.no_grad():
        feats = model.features(batch)
    assert_close(
        "intermediate.backbone_features", feats, expected["intermediate.backbone_features"]
    )

    # 3. training loss with the recorded noise, then the raw Beta draw (our t from it)
    replay = Replay([("noise", inputs["noise"]), ("beta", inputs["beta_sample"])])
    model.draw = lambda kind, shape, device, dtype: replay.take(kind, shape).to(device, dtype)
    with torch.no_grad():
        loss, parts = model.compute_loss(batch)
    replay.done()
    if "time" in inputs:
        assert_close("time", parts["time"], inputs["time"])
    for name in ("pred_velocity", "loss_elementwise"):  # intermediates, where recorded
        if name in expected:
            assert_close(name, parts[name], expected[name])
    assert_close("loss", loss, expected["loss"])

    # 4. sampling with the recorded start noise (action / action_mask not given)
    replay = Replay([("inference_noise", inputs["inference_noise"])])
    model.draw = lambda kind, shape, device, dtype: replay.take(kind, shape).to(device, dtype)
    sample_batch = {k: v for k, v in batch.items() if k not in ("action", "action_mask")}
    actions = model.sample_actions(sample_batch)
    replay.done()
    assert_close("action_pred", actions, expected["action_pred"])
