"""Small datasets the tests build themselves, written with h5py directly (not with vlatune's
writers), so the readers are tested against the real layouts."""

from __future__ import annotations

import io
import json
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

LIBERO_TASKS = {
    "pick_up_the_alphabet_soup_and_place_it_in_the_basket": "pick the alphabet soup and place it in the basket",
    "KITCHEN_SCENE3_turn_on_the_stove": "turn on the stove",
}


def frames(T: int, res: int, seed: int) -> np.ndarray:
    """Smooth images with a moving square: video codecs keep them well (PSNR > 30 dB)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:res, 0:res]
    base = np.stack([x * 255 / res, y * 255 / res, np.full_like(x, rng.integers(0, 255))], -1)
    out = np.repeat(base[None], T, 0).astype(np.uint8)
    start = int(rng.integers(0, res // 2))
    for t in range(T):
        r0 = (3 * t + start) % (res - 8)
        out[t, r0 : r0 + 8, 4:12] = [255, 255, 0]
    return out


def make_libero_hdf5(root: Path, demos: int = 3, T: int = 12, res: int = 32, seed: int = 0) -> Path:
    """LIBERO HDF5 files with the real layout and attrs (raw orientation: 'opengl')."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k, (task, bddl_lang) in enumerate(LIBERO_TASKS.items()):
        with h5py.File(root / f"{task}_demo.hdf5", "w") as f:
            data = f.create_group("data")
            data.attrs["env_name"] = "Libero_Tabletop_Manipulation"
            data.attrs["problem_info"] = json.dumps(
                {
                    "problem_name": "libero_tabletop_manipulation",
                    "domain_name": "robosuite",
                    "language_instruction": bddl_lang,
                }
            )
            data.attrs["bddl_file_name"] = f"libero/libero/bddl_files/libero_object/{task}.bddl"
            data.attrs["bddl_file_content"] = "(define (problem x))"
            data.attrs["env_args"] = json.dumps(
                {"type": 1, "env_name": "Libero_Tabletop_Manipulation"}
            )
            data.attrs["macros_image_convention"] = "opengl"
            total = 0
            for d in range(demos):
                n = T + d
                g = data.create_group(f"demo_{d}")
                g.attrs["num_samples"] = n
                g.attrs["init_state"] = rng.normal(size=20)
                g.attrs["model_file"] = "<mujoco/>"
                actions = np.clip(rng.normal(0, 0.4, (n, 7)), -1, 1)
                actions[:, 6] = np.where(np.arange(n) < n // 2, -1.0, 1.0)
                g.create_dataset("actions", data=actions)
                g.create_dataset("states", data=rng.normal(size=(n, 20)))
                g.create_dataset("robot_states", data=rng.normal(size=(n, 9)))
                rewards = np.zeros(n, np.uint8)
                rewards[-1] = 1
                g.create_dataset("rewards", data=rewards)
                g.create_dataset("dones", data=rewards.copy())
                obs = g.create_group("obs")
                obs.create_dataset("agentview_rgb", data=frames(n, res, seed + 10 * k + d))
                obs.create_dataset("eye_in_hand_rgb", data=frames(n, res, seed + 100 + 10 * k + d))
                ee = rng.normal(size=(n, 6))
                obs.create_dataset("ee_states", data=ee)
                obs.create_dataset("ee_pos", data=ee[:, :3])
                obs.create_dataset("ee_ori", data=ee[:, 3:])
                obs.create_dataset("gripper_states", data=rng.normal(size=(n, 2)))
                obs.create_dataset("joint_states", data=rng.normal(size=(n, 7)))
                total += n
            data.attrs["num_demos"] = demos
            data.attrs["total"] = total
    return root


def encode_image(img: np.ndarray, fmt: str) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt.upper(), **({"quality": 95} if fmt == "jpeg" else {}))
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


MAPPING = """\
action: action
state: [observations/ee_pose, observations/qpos]
cameras: {camera1: observations/images/camera1}
instruction: language_instruction
default_instruction: stack the blocks
extras: {timestamp: timestamp, phase: phase}
fps: 10
image_orientation: upright
gripper: "1_open"
"""


def make_custom_hdf5(
    root: Path,
    episodes: int = 3,
    T: int = 10,
    res: int = 32,
    encoded: str | None = None,
    seed: int = 0,
    mapping: str = MAPPING,
) -> Path:
    """Seed-style custom HDF5: one file per episode, 6-d actions, images raw or encoded ("jpeg", "png")."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for e in range(episodes):
        n = T + e
        with h5py.File(root / f"episode_{e:03d}.hdf5", "w") as f:
            f.create_dataset("action", data=rng.uniform(-1, 1, (n, 6)).astype(np.float32))
            f.create_dataset(
                "observations/ee_pose", data=rng.normal(size=(n, 6)).astype(np.float32)
            )
            f.create_dataset("observations/qpos", data=rng.normal(size=(n, 7)).astype(np.float32))
            imgs = frames(n, res, seed + e)
            if encoded:
                dt = h5py.vlen_dtype(np.dtype("uint8"))
                ds = f.create_dataset("observations/images/camera1", (n,), dtype=dt)
                for t in range(n):
                    ds[t] = encode_image(imgs[t], encoded)
            else:
                f.create_dataset("observations/images/camera1", data=imgs)
            f.create_dataset("timestamp", data=np.arange(n) / 10.0)
            f.create_dataset("phase", data=(np.arange(n) * 3 // n).astype(np.int64))
            if e != 1:  # episode 1 has no instruction: the default is used
                f.create_dataset(
                    "language_instruction", data="stack the red block on the blue block"
                )
    (root / "vlatune_mapping.yaml").write_text(mapping)
    return root
