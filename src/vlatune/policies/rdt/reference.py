"""The RDT port checked against a reference fixture folder (`shared/reference/rdt` layout).

The folder holds a tiny random-weight checkpoint saved by upstream `RDTRunner.save_pretrained`
(`config.json` + `pytorch_model.bin`), the model-level batch with the recorded draws
(`inputs.safetensors`: `noise` and `timesteps` for `compute_loss`, `inference_noise` for
`predict_action`, in upstream's draw order) and upstream's outputs (`expected.safetensors`).
Every size comes from the folder's own files; nothing is a constant here.

Checks: the checkpoint loads through the real loader (`convert.load_released`) strictly and its
keys / shapes equal `keys.txt`; loss, elementwise loss and the network output inside the loss
match at atol = rtol = 1e-4; the 5-step DPM-Solver++ sample matches at 1e-4; the inference
timesteps are equal.

    >>> check_reference(Path("../shared/reference/rdt"))   # raises AssertionError on a mismatch
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlatune.policies.reference_check import assert_close, read_keys_txt


def check_reference(folder: Path) -> None:
    from safetensors.torch import load_file

    from vlatune.policies.rdt.convert import load_released, read_released_state_dict

    folder = Path(folder)
    model = load_released(folder, dtype=torch.float32).eval()

    keys_txt = folder / "keys.txt"
    if keys_txt.is_file():
        want = read_keys_txt(keys_txt)
        released, _ = read_released_state_dict(folder)
        got = {k: tuple(v.shape) for k, v in released.items()}
        assert got == want, f"{folder}: checkpoint tensors differ from keys.txt"
        assert len(model.state_dict()) == len(want), (
            f"model has {len(model.state_dict())} tensors, keys.txt lists {len(want)}"
        )

    x = load_file(str(folder / "inputs.safetensors"))
    exp = load_file(str(folder / "expected.safetensors"))
    cond = (x["lang_tokens"], x["lang_attn_mask"], x["img_tokens"], x["state_tokens"])
    with torch.no_grad():
        out = model.compute_loss(
            *cond,
            x["action_gt"],
            x["action_mask"],
            x["ctrl_freqs"],
            noise=x["noise"],
            timesteps=x["timesteps"],
        )
    assert_close("pred", out.pred, exp["pred"])
    assert_close("loss_elementwise", out.loss_elementwise, exp["loss_elementwise"])
    assert_close("loss", out.loss, exp["loss"])

    if "inference_timesteps" in exp:
        got_t = model.inference_timesteps()
        assert torch.equal(got_t.long(), exp["inference_timesteps"].long()), (
            f"inference timesteps {got_t.tolist()}, reference {exp['inference_timesteps'].tolist()}"
        )
    actions = model.predict_action(
        *cond, x["action_mask"], x["ctrl_freqs"], noise=x["inference_noise"]
    )
    assert_close("actions", actions, exp["actions"])
