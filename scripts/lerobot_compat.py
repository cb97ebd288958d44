"""Does the LeRobot library itself load what `vlatune data convert --to lerobot[-v3]` writes?

The check runs in two interpreters. This one (vlatune's) builds a small LIBERO-layout HDF5
dataset, converts it to LeRobot v2.1 and v3.0 with our writers and reads every frame back with
our own reader. Then, for each version, a Python that has the `lerobot` package (v2.1 needs
lerobot 0.3.x, v3.0 needs lerobot >= 0.4) loads the same folder with
`lerobot.datasets.lerobot_dataset.LeRobotDataset(repo_id, root=..., video_backend="pyav")`
and compares, frame by frame: actions and states (bit-exact, after LeRobot's own cast of float64 to
float32), task strings, episode and frame
indices, timestamps, every camera's decoded frame (against our decoder: the same mp4, so equal
up to LeRobot's float conversion), `delta_timestamps` action chunks with their padding mask
(against our training view's chunk and mask), and the stats LeRobot loads. And the other way:
LeRobot writes a dataset (`LeRobotDataset.create`, `add_frame`, `save_episode`, LIBERO camera
names `image` / `wrist_image`), and vlatune's reader detects the version, names the cameras
`agentview` / `wrist`, and reads actions, states and tasks exactly, frames above 35 dB PSNR.

Why a second interpreter: LeRobot imports torchvision, and this machine's CPU torch has no
torchvision build (../shared/ENVIRONMENT.md), so lerobot lives in side environments that
scripts/setup_lerobot.sh makes (a CUDA build of torch + torchvision, ~6 GB; runs on the CPU):

    scripts/setup_lerobot.sh      # .venv-lerobot (lerobot 0.3.3), .venv-lerobot-v3 (0.4.4)
    .venv/bin/python scripts/lerobot_compat.py --v21-python .venv-lerobot/bin/python \\
        --v30-python .venv-lerobot-v3/bin/python

Prints a table, writes benchmarks/results/lerobot_compat.json, exits 1 when a check fails.
`make test-lerobot` runs both through tests/test_lerobot_compat.py.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
HORIZON = 4  # action chunk length for the delta_timestamps check


# ---- child: runs under the lerobot interpreter; imports nothing from vlatune ---------------


def child(root: Path, expect: Path) -> dict:
    import lerobot
    import torch
    from lerobot.datasets.lerobot_dataset import CODEBASE_VERSION, LeRobotDataset

    exp = np.load(expect, allow_pickle=False)

    def loaded(a: np.ndarray) -> np.ndarray:
        # LeRobot turns each row's python floats into torch.tensor(...): float64 columns (raw
        # LIBERO actions are float64, and our files keep them) arrive as float32
        return a.astype(np.float32) if a.dtype == np.float64 else a

    cams = [str(c) for c in exp["cameras"]]
    fps = float(exp["fps"])
    ds = LeRobotDataset("vlatune/compat", root=root, video_backend="pyav")
    n = len(ds)
    actions, states, tasks, eps, frames, stamps = [], [], [], [], [], []
    image_diff = {c: 0.0 for c in cams}
    for i in range(n):
        item = ds[i]
        actions.append(item["action"].numpy())
        states.append(item["observation.state"].numpy())
        tasks.append(item["task"])
        eps.append(int(item["episode_index"]))
        frames.append(int(item["frame_index"]))
        stamps.append(float(item["timestamp"]))
        for c in cams:
            img = item[f"observation.images.{c}"]  # float (C, H, W) in [0, 1]
            ours = torch.from_numpy(exp[f"frames_{c}"][i]).permute(2, 0, 1).float() / 255
            image_diff[c] = max(image_diff[c], float((img - ours).abs().max()) * 255)
    chunked = LeRobotDataset(
        "vlatune/compat",
        root=root,
        video_backend="pyav",
        delta_timestamps={"action": [k / fps for k in range(HORIZON)]},
    )
    chunk_ok, mask_ok = True, True
    for i in range(n):
        item = chunked[i]
        chunk_ok &= bool(np.array_equal(item["action"].numpy(), loaded(exp["chunks"][i])))
        mask_ok &= bool(np.array_equal(~item["action_is_pad"].numpy(), exp["chunk_masks"][i]))
    stats = ds.meta.stats or {}
    stats_ok = all(
        np.allclose(np.asarray(stats[k]["mean"]).ravel(), exp[f"mean_{k}"], atol=1e-6)
        for k in ("action", "observation.state")
    )
    return {
        "lerobot": getattr(lerobot, "__version__", "?"),
        "codebase_version": CODEBASE_VERSION,
        "episodes": int(ds.num_episodes),
        "frames": int(ds.num_frames),
        "fps": float(ds.fps),
        "actions_exact": bool(np.array_equal(np.stack(actions), loaded(exp["actions"]))),
        "states_exact": bool(np.array_equal(np.stack(states), loaded(exp["states"]))),
        "tasks_equal": tasks == [str(t) for t in exp["tasks"]],
        "indices_equal": eps == exp["episode_index"].tolist()
        and frames == exp["frame_index"].tolist(),
        "timestamps_equal": bool(np.allclose(stamps, exp["timestamp"], atol=1e-6)),
        "image_max_abs_diff": {c: round(v, 3) for c, v in image_diff.items()},
        "chunks_equal": chunk_ok,
        "pad_mask_equal": mask_ok,
        "stats_mean_equal": bool(stats_ok),
    }


def child_write(root: Path, out: Path) -> dict:
    """LeRobot writes a small dataset (LIBERO camera names, 2 tasks, video); `out` gets what
    was written, for vlatune's reader to be compared against."""
    import inspect

    import lerobot
    from lerobot.datasets.lerobot_dataset import CODEBASE_VERSION, LeRobotDataset

    res, fps = 48, 10
    features = {
        "action": {"dtype": "float32", "shape": (7,), "names": None},
        "observation.state": {"dtype": "float32", "shape": (8,), "names": None},
        **{
            f"observation.images.{c}": {
                "dtype": "video",
                "shape": (res, res, 3),
                "names": ["height", "width", "channels"],
            }
            for c in ("image", "wrist_image")
        },
    }
    ds = LeRobotDataset.create("vlatune/written", fps=fps, root=root, features=features)
    task_arg = "task" in inspect.signature(ds.add_frame).parameters  # 0.3: an argument
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:res, 0:res] / res
    written: dict[str, list] = {"actions": [], "states": [], "tasks": [], "lengths": []}
    written.update({"image": [], "wrist_image": []})
    for ep, (task, T) in enumerate(
        [
            ("put the bowl on the plate", 9),
            ("open the drawer", 12),
            ("put the bowl on the plate", 7),
        ]
    ):
        for t in range(T):
            a = rng.uniform(-1, 1, 7).astype(np.float32)
            a[6] = -1.0 if t < T // 2 else 1.0
            st = rng.normal(size=8).astype(np.float32)
            phase = (ep * 20 + t) / 40
            imgs = {
                c: np.stack(
                    [255 * xx, 255 * yy, 127 + 100 * np.sin(6 * (xx + k + phase))], -1
                ).astype(np.uint8)
                for k, c in enumerate(("image", "wrist_image"))
            }
            frame = {
                "action": a,
                "observation.state": st,
                **{f"observation.images.{c}": v for c, v in imgs.items()},
            }
            if task_arg:
                ds.add_frame(frame, task=task)
            else:
                ds.add_frame({**frame, "task": task})
            written["actions"].append(a)
            written["states"].append(st)
            for c, v in imgs.items():
                written[c].append(v)
        written["tasks"].append(task)
        written["lengths"].append(T)
        ds.save_episode()
    if hasattr(ds, "finalize"):  # v3.0: closes the parquet writers
        ds.finalize()
    np.savez(out, **{k: np.array(v) for k, v in written.items()}, fps=fps)
    return {"lerobot": getattr(lerobot, "__version__", "?"), "codebase_version": CODEBASE_VERSION}


def compare_written(root: Path, written: Path) -> dict:
    """vlatune's reader on a dataset LeRobot wrote: values exact, frames up to codec loss."""
    from vlatune.data import open_dataset
    from vlatune.data.video import psnr

    w = np.load(written)
    r = open_dataset(root)
    eps = [r.load_episode(i) for i in range(len(r))]
    lengths = [len(e.actions) for e in eps]
    out = {
        "format_detected": r.info.format,
        "cameras": list(r.info.cameras),
        "fps": float(r.info.fps),
        "lengths_equal": lengths == w["lengths"].tolist(),
        "actions_exact": bool(
            np.array_equal(np.concatenate([e.actions for e in eps]), w["actions"])
        ),
        "states_exact": bool(np.array_equal(np.concatenate([e.states for e in eps]), w["states"])),
        "tasks_equal": [e.instruction for e in eps] == w["tasks"].tolist(),
    }
    for ours, theirs in (("agentview", "image"), ("wrist", "wrist_image")):
        if ours in r.info.cameras:
            frames = np.concatenate([e.images[ours] for e in eps])
            out[f"psnr_{ours}"] = round(float(psnr(frames, w[theirs])), 1)
    return out


# ---- parent: vlatune's interpreter -------------------------------------------------------


def expectations(path: Path, out: Path) -> dict:
    """What our reader and training view say of the converted dataset, frame by frame."""
    from vlatune.data import open_dataset
    from vlatune.data.stats import dataset_stats

    r = open_dataset(path)
    info = r.info
    arrays: dict[str, list] = {
        k: [] for k in ("actions", "states", "tasks", "episode_index", "frame_index", "timestamp")
    }
    arrays.update({"chunks": [], "chunk_masks": []})
    frames: dict[str, list] = {c: [] for c in info.cameras}
    for ep in range(len(r)):
        e = r.load_episode(ep)
        T = len(e.actions)
        arrays["actions"].append(e.actions)
        arrays["states"].append(e.states)
        arrays["tasks"] += [e.instruction] * T
        arrays["episode_index"] += [ep] * T
        arrays["frame_index"] += list(range(T))
        arrays["timestamp"] += [t / info.fps for t in range(T)]
        for t in range(T):  # the training view's chunk convention: repeat the last, mask it
            idx = np.arange(t, t + HORIZON)
            arrays["chunks"].append(e.actions[np.minimum(idx, T - 1)])
            arrays["chunk_masks"].append(idx < T)
        for c in info.cameras:
            frames[c].append(e.images[c])
    stats = dataset_stats(r)
    np.savez(
        out,
        cameras=np.array(info.cameras),
        fps=info.fps,
        actions=np.concatenate(arrays["actions"]),
        states=np.concatenate(arrays["states"]),
        tasks=np.array(arrays["tasks"]),
        episode_index=np.array(arrays["episode_index"]),
        frame_index=np.array(arrays["frame_index"]),
        timestamp=np.array(arrays["timestamp"]),
        chunks=np.stack(arrays["chunks"]),
        chunk_masks=np.stack(arrays["chunk_masks"]),
        mean_action=np.asarray(stats["action"]["mean"]),
        **{"mean_observation.state": np.asarray(stats["state"]["mean"])},
        **{f"frames_{c}": np.concatenate(v) for c, v in frames.items()},
    )
    return {"episodes": len(r), "frames": int(sum(len(a) for a in arrays["actions"]))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--v21-python", help="a Python with lerobot 0.3.x (reads v2.1)")
    ap.add_argument("--v30-python", help="a Python with lerobot >= 0.4 (reads v3.0)")
    ap.add_argument("--child", nargs=2, metavar=("ROOT", "EXPECT"), help=argparse.SUPPRESS)
    ap.add_argument("--child-write", nargs=2, metavar=("ROOT", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results" / "lerobot_compat.json"
    )
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child[0]), Path(args.child[1]))))
        return 0
    if args.child_write:
        print(json.dumps(child_write(Path(args.child_write[0]), Path(args.child_write[1]))))
        return 0
    if not (args.v21_python or args.v30_python):
        ap.error("give --v21-python and/or --v30-python: interpreters with lerobot installed")

    sys.path.insert(0, str(REPO))
    from tests.data_fixtures import make_libero_hdf5
    from vlatune.data import open_dataset
    from vlatune.data.convert import convert

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src = make_libero_hdf5(Path(tmp) / "hdf5", demos=2, T=15, res=64)
        for version, python, to in (
            ("v2.1", args.v21_python, "lerobot"),
            ("v3.0", args.v30_python, "lerobot-v3"),
        ):
            if not python:
                continue
            row: dict = {"format": version}
            rows.append(row)
            # 1. LeRobot loads what we wrote
            root = Path(tmp) / f"ours_{version}"
            convert(open_dataset(src), root, to)
            expect = Path(tmp) / f"expect_{version}.npz"
            ours = expectations(root, expect)
            got = _run(python, "--child", root, expect)
            if "error" in got:
                row["load_error"] = got["error"]
            else:
                got["counts_equal"] = (got["episodes"], got["frames"]) == (
                    ours["episodes"],
                    ours["frames"],
                )
                row["lerobot_loads_ours"] = got
            # 2. we read what LeRobot wrote
            theirs, written = Path(tmp) / f"theirs_{version}", Path(tmp) / f"written_{version}.npz"
            made = _run(python, "--child-write", theirs, written)
            if "error" in made:
                row["write_error"] = made["error"]
            else:
                row["we_read_theirs"] = {**made, **compare_written(theirs, written)}
    ok = True
    for row in rows:
        row["ok"], failed = _verdict(row)
        ok &= row["ok"]
        load, back = row.get("lerobot_loads_ours", {}), row.get("we_read_theirs", {})
        print(
            f"{row['format']}  lerobot {load.get('lerobot', back.get('lerobot', '?'))}: "
            f"loads ours ({load.get('episodes')} episodes, {load.get('frames')} frames, image "
            f"max |diff| {load.get('image_max_abs_diff')}); we read theirs (detected "
            f"{back.get('format_detected')}, cameras {back.get('cameras')}, PSNR "
            f"{back.get('psnr_agentview')}/{back.get('psnr_wrist')} dB): "
            + ("all checks pass" if row["ok"] else f"FAILED: {', '.join(failed)}")
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if ok else 1


LOAD_CHECKS = (
    "counts_equal",
    "actions_exact",
    "states_exact",
    "tasks_equal",
    "indices_equal",
    "timestamps_equal",
    "chunks_equal",
    "pad_mask_equal",
    "stats_mean_equal",
)
READ_CHECKS = ("lengths_equal", "actions_exact", "states_exact", "tasks_equal")
MIN_PSNR = 35.0  # dB; LeRobot's default encoding (AV1, crf 30) gives ~37 on these frames


def _run(python: str, mode: str, root: Path, data: Path) -> dict:
    proc = subprocess.run(
        [python, __file__, mode, str(root), str(data)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        return {"error": "\n".join(proc.stderr.strip().splitlines()[-15:])}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _verdict(row: dict) -> tuple[bool, list[str]]:
    failed = [k for k in ("load_error", "write_error") if k in row]
    load, back = row.get("lerobot_loads_ours"), row.get("we_read_theirs")
    if load is not None:
        failed += [f"load:{c}" for c in LOAD_CHECKS if not load[c]]
        if max(load["image_max_abs_diff"].values()) > 1.0:
            failed.append("load:images")
    if back is not None:
        failed += [f"read:{c}" for c in READ_CHECKS if not back[c]]
        if back["cameras"] != ["agentview", "wrist"]:
            failed.append("read:camera_names")
        if min(back.get("psnr_agentview", 0), back.get("psnr_wrist", 0)) < MIN_PSNR:
            failed.append("read:psnr")
    return not failed, failed


if __name__ == "__main__":
    sys.exit(main())
