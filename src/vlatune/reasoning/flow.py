"""Dense optical flow of the main camera, for NORA's visual chain-of-thought.

Backends: OpenCV DIS (default; CPU, opencv-python-headless), OpenCV Farneback, and RAFT through
torchvision when it is installed with local weights (not on CPU-only machines with the CPU torch
build, where torchvision cannot be imported). Flow of frame t is from t to min(t + k, T - 1), on
upright frames, in pixels of the frame's resolution: flow[..., 0] = dx (right), [..., 1] = dy
(down).

`vlatune annotate flow DATASET --out DIR` writes DIR/flows.h5 (one dataset per episode,
(T, S, S, 2) float16 at `size` px, flows rescaled to that size) through a temporary file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

BACKENDS = ("dis", "farneback", "raft")


def _cv2():
    try:
        import cv2
    except ImportError:
        raise ImportError("optical flow needs OpenCV: pip install opencv-python-headless") from None
    return cv2


def compute_flow(frame0: np.ndarray, frame1: np.ndarray, backend: str = "dis") -> np.ndarray:
    """(H, W, 3) uint8 RGB x 2 -> (H, W, 2) float32 flow in pixels."""
    if backend == "raft":
        return _raft(frame0, frame1)
    if backend not in BACKENDS:
        raise ValueError(f"flow backend '{backend}': choose one of {BACKENDS}")
    cv2 = _cv2()
    g0 = cv2.cvtColor(np.ascontiguousarray(frame0), cv2.COLOR_RGB2GRAY)
    g1 = cv2.cvtColor(np.ascontiguousarray(frame1), cv2.COLOR_RGB2GRAY)
    if backend == "dis":
        dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
        flow = dis.calc(g0, g1, None)
    else:
        flow = cv2.calcOpticalFlowFarneback(g0, g1, None, 0.5, 3, 15, 3, 5, 1.2, 0)
    return flow.astype(np.float32)


def _raft(frame0: np.ndarray, frame1: np.ndarray) -> np.ndarray:
    try:
        import torch
        from torchvision.models.optical_flow import Raft_Small_Weights, raft_small
    except Exception as e:  # ImportError, or torchvision's operator error with a CPU torch
        raise ImportError(
            f"the raft backend needs a working torchvision ({type(e).__name__}: {e}); use "
            "--backend dis (OpenCV) on this machine"
        ) from None
    weights = Raft_Small_Weights.DEFAULT
    model = raft_small(weights=weights, progress=False).eval()
    a = torch.from_numpy(frame0).permute(2, 0, 1)[None].float() / 127.5 - 1
    b = torch.from_numpy(frame1).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        flow = model(a, b)[-1][0].permute(1, 2, 0).numpy()
    return flow.astype(np.float32)


def resize_flow(flow: np.ndarray, size: int) -> np.ndarray:
    """Resize a flow field to (size, size), scaling the vectors with the image."""
    cv2 = _cv2()
    H, W = flow.shape[:2]
    out = cv2.resize(flow, (size, size), interpolation=cv2.INTER_AREA)
    out[..., 0] *= size / W
    out[..., 1] *= size / H
    return out


def flow_to_rgb(flow: np.ndarray, max_norm: float | None = None) -> np.ndarray:
    """HSV colour coding: hue = direction, value = magnitude (saturated at max_norm)."""
    cv2 = _cv2()
    mag, ang = cv2.cartToPolar(flow[..., 0].astype(np.float32), flow[..., 1].astype(np.float32))
    top = max_norm or max(float(mag.max()), 1e-6)
    hsv = np.zeros((*flow.shape[:2], 3), np.uint8)
    hsv[..., 0] = (ang * 180 / np.pi / 2).astype(np.uint8)
    hsv[..., 1] = 255
    hsv[..., 2] = np.clip(mag / top * 255, 0, 255).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def dataset_flows(
    reader,
    out_dir: Path,
    camera: str | None = None,
    k: int = 4,
    size: int = 64,
    backend: str = "dis",
    episodes=None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Flows of every frame (t -> t + k) of the main camera, written to out_dir/flows.h5."""
    import h5py

    from vlatune.conventions import to_upright

    cam = camera or reader.info.cameras[0]
    if cam not in reader.info.cameras:
        raise ValueError(f"camera '{cam}' not in the dataset (cameras: {reader.info.cameras})")
    upright = reader.info.image_orientation == "upright"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / "flows.h5"
    tmp = out_dir / ".flows.h5.tmp"
    todo = list(range(len(reader))) if episodes is None else list(episodes)
    with h5py.File(tmp, "w") as f:
        f.attrs.update(
            camera=cam,
            k=k,
            size=size,
            backend=backend,
            units="pixels at size",
            dataset=str(Path(reader.info.path).resolve())
            if getattr(reader.info, "path", None)
            else "",
        )
        for i, ep in enumerate(todo):
            frames = np.asarray(reader.load_episode(ep, cameras=[cam]).images[cam])
            if not upright:
                frames = to_upright(frames)
            T = len(frames)
            flows = np.zeros((T, size, size, 2), np.float16)
            for t in range(T):
                flow = compute_flow(frames[t], frames[min(t + k, T - 1)], backend)
                flows[t] = resize_flow(flow, size)
            f.create_dataset(f"episode_{ep}", data=flows, compression="gzip")
            if progress:
                progress(i + 1, len(todo))
    tmp.replace(final)
    return final


def flows_source(path: Path) -> tuple[str, str]:
    """(dataset path, camera) recorded in a flows.h5 ('' when unknown)."""
    import h5py

    path = Path(path)
    if path.is_dir():
        path = path / "flows.h5"
    with h5py.File(path, "r") as f:
        return str(f.attrs.get("dataset", "")), str(f.attrs.get("camera", ""))


def load_flows(path: Path) -> dict[int, np.ndarray]:
    import h5py

    path = Path(path)
    if path.is_dir():
        path = path / "flows.h5"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no flows (run `vlatune annotate flow` first)")
    with h5py.File(path, "r") as f:
        return {
            int(k.split("_")[1]): f[k][()].astype(np.float32) for k in f if k.startswith("episode_")
        }
