"""The pi0 family against LeRobot's own outputs: `check_reference(folder)` for the shared harness.

`folder` is a fixture as `../shared/reference/pi0` / `pi05` (README there): a LeRobot-saved tiny
checkpoint, `inputs.safetensors` (model-level batch, recorded noise / time draws, `raw.*` policy
batch) and `expected.safetensors`. Every size comes from the folder (`config.json`,
`reference_arch.json`). The recorded draws replace the model's samplers in LeRobot's order
(noise, then time, in training; the inference noise in sampling). Tolerance atol = rtol = 1e-4
(the fixtures' README); masks compare exactly.

    >>> check_reference(Path("../shared/reference/pi0"))   # raises AssertionError naming the mismatch
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from vlatune.policies.pi0.convert import load_released, to_released_key
from vlatune.policies.pi0.processor import model_inputs, unpad_actions
from vlatune.policies.reference_check import assert_close, read_keys_txt


class _Replay:
    """Recorded draws handed out in order; fails if the model asks for another kind or shape."""

    def __init__(self, draws: list[tuple[str, torch.Tensor]]):
        self.draws = list(draws)

    def take(self, kind: str, shape) -> torch.Tensor:
        assert self.draws, f"the model drew an extra {kind} sample beyond the recorded ones"
        want, t = self.draws.pop(0)
        assert want == kind, (
            f"the model drew {kind} where the reference drew {want} (order differs)"
        )
        assert tuple(t.shape) == tuple(shape), (
            f"{kind} draw of shape {tuple(shape)}, recorded {tuple(t.shape)}"
        )
        return t.clone()


def check_reference(folder: Path) -> None:
    """Strict load, key list, intermediates, elementwise / reduced loss and sampled actions vs LeRobot."""
    folder = Path(folder)
    model, report = load_released(folder)
    model.eval()
    cfg = model.cfg
    # 1. the checkpoint: every key of keys.txt, shapes included, and nothing else
    listed = read_keys_txt(folder / "keys.txt")
    ours = {to_released_key(k): tuple(v.shape) for k, v in model.state_dict().items()}
    assert set(ours) == set(listed), (
        f"{folder}: keys differ from keys.txt: missing {sorted(set(listed) - set(ours))[:5]}, "
        f"extra {sorted(set(ours) - set(listed))[:5]}"
    )
    bad = [k for k in listed if listed[k] != ours[k]]
    assert not bad, f"{folder}: shapes differ from keys.txt for {bad[:5]}"
    assert report.tensors == len(listed) and not report.renamed, report.lines()

    inp = load_file(str(folder / "inputs.safetensors"))
    exp = load_file(str(folder / "expected.safetensors"))
    cams = sorted((k for k in inp if k.startswith("images.")), key=lambda k: int(k.split(".")[1]))
    images = [inp[k] for k in cams]
    img_masks = [inp[f"img_masks.{k.split('.')[1]}"] for k in cams]
    tokens, token_masks = inp["lang_tokens"], inp["lang_masks"]
    state = inp.get("state")
    assert (state is not None) == (cfg.variant == "pi0"), (
        f"{folder}: state tensor presence vs variant {cfg.variant}"
    )

    # 2. the processor: raw policy batch -> the model-level tensors LeRobot handed the model
    # cameras in config.json's input_features order (LeRobot's `image_features` order)
    feats = (cfg.lerobot_config or {}).get("input_features", {})
    raw_cams = [
        f"raw.{k}" for k, v in feats.items() if v.get("type") == "VISUAL" and f"raw.{k}" in inp
    ]
    if raw_cams:
        prepared = model_inputs(
            [inp[k] for k in raw_cams], inp.get("raw.observation.state"), inp.get("raw.action"),
            cfg.image_size, cfg.max_state_dim, cfg.max_action_dim, len(images) - len(raw_cams),
        )  # fmt: skip
        for i, (img, m) in enumerate(zip(prepared["images"], prepared["img_masks"], strict=True)):
            assert_close(f"processor images.{i}", img, images[i])
            assert torch.equal(m, img_masks[i].bool()), f"processor img_masks.{i} differ"
        assert_close("processor actions", prepared["actions"], inp["actions"])
        if state is not None:
            assert_close("processor state", prepared["state"], state)

    with torch.no_grad():
        # 3. intermediates, to localise a mismatch
        for i, img in enumerate(images):
            if f"intermediate.image_emb.{i}" in exp:
                assert_close(
                    f"intermediate.image_emb.{i}",
                    model.embed_image(img),
                    exp[f"intermediate.image_emb.{i}"],
                )
        emb, pad, _ = model.embed_prefix(images, img_masks, tokens, token_masks)
        assert_close("intermediate.prefix_embs", emb, exp["intermediate.prefix_embs"])
        assert torch.equal(pad, exp["intermediate.prefix_pad_masks"].bool()), (
            "intermediate.prefix_pad_masks differ"
        )

        # 4. training loss with the recorded draws replacing the samplers (noise, then time)
        replay = _Replay([("noise", inp["noise"]), ("time", inp["time"])])
        model.sample_noise = lambda shape, device: replay.take("noise", shape)
        model.sample_time = lambda bsz, device: replay.take("time", (bsz,))
        loss = model(images, img_masks, tokens, token_masks, state, inp["actions"])
        assert not replay.draws, (
            f"the model did not use the recorded draws {[k for k, _ in replay.draws]}"
        )
        assert_close("loss_elementwise", loss, exp["loss_elementwise"])
        cut = loss[:, :, : cfg.action_dim]
        assert_close("loss", cut.mean(), exp["loss"])
        assert_close("loss_per_sample", cut.mean(dim=(1, 2)), exp["loss_per_sample"])

        # 5. sampling: 10 (config) Euler steps from the recorded x_1, prefix cache
        replay = _Replay([("noise", inp["inference_noise"])])
        model.sample_noise = lambda shape, device: replay.take("noise", shape)
        actions = model.sample_actions(images, img_masks, tokens, token_masks, state)
        assert not replay.draws, "sample_actions did not draw its starting noise"
        assert_close("actions_padded", actions, exp["actions_padded"])
        assert_close("actions", unpad_actions(actions, cfg.action_dim), exp["actions"])
    del model.sample_noise, model.sample_time
