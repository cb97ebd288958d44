"""Optical-flow tokens: DIS flow, the flow VQ-VAE, `vlatune annotate flow / flow-vq`, and
NORA phase C training on ECoT text + flow tokens."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from data_fixtures import make_libero_hdf5
from vlatune.data.annotations import load_annotations
from vlatune.reasoning.flow import compute_flow, flow_to_rgb, resize_flow
from vlatune.reasoning.vq import VQConfig, train_flow_vq

ROOT = Path(__file__).resolve().parents[1]


def texture(size=128, seed=0):
    import cv2

    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.uniform(0, 255, (size, size, 3)).astype(np.float32), (0, 0), 2.0)
    return np.clip((img - img.mean()) * 4 + 128, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("backend", ["dis", "farneback"])
def test_flow_recovers_a_translation(backend):
    import cv2

    img = texture()
    dx, dy = 2.5, -1.5
    M = np.float32([[1, 0, dx], [0, 1, dy]])
    moved = cv2.warpAffine(img, M, (128, 128), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)
    flow = compute_flow(img, moved, backend)
    inner = flow[24:-24, 24:-24].reshape(-1, 2)
    est = np.median(inner, axis=0)
    assert abs(est[0] - dx) < 0.5 and abs(est[1] - dy) < 0.5, est
    small = resize_flow(flow, 64)
    assert abs(np.median(small[12:-12, 12:-12, 0]) - dx / 2) < 0.3  # vectors scale with the image
    rgb = flow_to_rgb(flow)
    assert rgb.shape == (128, 128, 3) and rgb.dtype == np.uint8


def test_raft_without_torchvision_is_clear():
    try:
        import torchvision  # noqa: F401

        pytest.skip("torchvision imports here; the error path is for machines without it")
    except Exception:
        pass
    with pytest.raises(ImportError, match="--backend dis"):
        compute_flow(texture(), texture(), "raft")


def synthetic_flows(n=384, size=64, seed=0):
    """Translations plus rotations about random centres: a small family a VQ-VAE can learn."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    out = np.zeros((n, size, size, 2), np.float32)
    for i in range(n):
        t = rng.normal(0, 2, 2)
        w = rng.normal(0, 0.03)
        cx, cy = rng.uniform(0, size, 2)
        out[i, ..., 0] = t[0] - w * (ys - cy)
        out[i, ..., 1] = t[1] + w * (xs - cx)
    return out


def test_vq_vae_learns_flow_codes(tmp_path):
    flows = synthetic_flows()
    model, report = train_flow_vq(
        flows, VQConfig(codebook=64, dim=16, hidden=32), steps=300, batch=32
    )
    b, a = report["before"], report["after"]
    assert a["epe_px"] < 0.5 * b["epe_px"] and a["epe_px"] < 0.5 * report["zero_flow_epe_px"]
    assert a["codebook_usage"] > 0.2 and a["perplexity"] > 5
    import torch

    from vlatune.reasoning.vq import FlowVQ

    x = torch.from_numpy(flows[:4]).permute(0, 3, 1, 2).contiguous()
    codes = model.encode(x)
    assert codes.shape == (4, 64) and int(codes.max()) < 64
    model.save(tmp_path / "vq")
    again = FlowVQ.from_pretrained(tmp_path / "vq")
    assert torch.equal(again.encode(x), codes)


def test_annotate_flow_cli_and_nora_phase_c(tmp_path):
    data = make_libero_hdf5(tmp_path / "data", demos=2, T=10, res=64)
    flow_dir, tok_dir = tmp_path / "flow", tmp_path / "tokens"
    r = run_cli("annotate", "flow", str(data), "--out", str(flow_dir), "--k", "2")
    assert r.returncode == 0, r.stderr
    r = run_cli(
        "annotate", "flow-vq", str(flow_dir), "--out", str(tok_dir), "--codebook", "16",
        "--steps", "30", "--batch", "8",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "codebook usage" in r.stdout
    assert (tok_dir / "flow_vq.png").read_bytes()[:4] == b"\x89PNG"
    # a dataset as the source: its flows are computed first; the picture shows the frames too
    r = run_cli("annotate", "flow-vq", str(data), "--out", str(tmp_path / "direct"),
                "--codebook", "8", "--steps", "5", "--batch", "4")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "direct" / "flows" / "flows.h5").is_file()
    from vlatune.reasoning.flow import flows_source

    assert flows_source(tmp_path / "direct" / "flows")[0] == str(data.resolve())
    report = json.loads((tok_dir / "report.json").read_text())
    assert report["codebook"] == 16 and "epe_px" in report["after"]
    rows = load_annotations(tok_dir / "flow_tokens.json")
    assert all(len(v["flow_tokens"]) == 64 for v in rows.values())
    r = run_cli(
        "annotate", "ecot", str(data), "--out", str(tmp_path / "ecot.json"), "--geometry", "off"
    )
    assert r.returncode == 0, r.stderr
    merged = load_annotations([tmp_path / "ecot.json", tok_dir / "flow_tokens.json"])
    assert set(merged[(0, 3)]) == {"reasoning", "flow_tokens"}
    # NORA phase C: the tokens head trains on text + <flow_k> targets
    from hf_fixtures import tiny_qwen2_5_vl, train_tiny_nora

    qwen = tiny_qwen2_5_vl(tmp_path / "qwen")
    annotations = f"data.annotations=[{tmp_path / 'ecot.json'},{tok_dir / 'flow_tokens.json'}]"
    metrics = train_tiny_nora(
        ROOT / "configs/nora/text_flow_cot.yaml", data, qwen, tmp_path / "run",
        annotations, "policy.reasoning.flow_tokens=16",
    )  # fmt: skip
    assert any(m.get("cot_loss", 0) > 0 for m in metrics)
