"""Training samples/s of the data layer: LIBERO HDF5 vs LeRobot v2.1 mp4 vs RLDS (JPEG frames, as
OpenVLA's and Open X-Embodiment's RLDS sets store them) made from the same episodes.

Setting (the Data issue's): 2 cameras, 224 px output, action horizon 8, batch 32, DataLoader
workers 0 and 2, augmentation on (90% crop + colour jitter). The dataset is LIBERO-shaped
(128 px frames, 7-d actions, 8-d state) and built here; frames are smooth synthetic images, so
video decoding cost is representative of real LIBERO frames of the same size.

    $ .venv/bin/python benchmarks/data_loading.py [--episodes 20] [--frames 120] [--batches 40] [--repeats 3]

Prints a table and writes benchmarks/results/data_loading.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.data_fixtures import make_libero_hdf5  # noqa: E402
from vlatune.config import load_config  # noqa: E402
from vlatune.data import open_dataset  # noqa: E402
from vlatune.data.convert import convert  # noqa: E402
from vlatune.data.formats.rlds import write_rlds  # noqa: E402
from vlatune.data.stats import dataset_stats  # noqa: E402
from vlatune.data.training import FrameDataset, make_loader  # noqa: E402
from vlatune.train.sampler import StepBatchSampler  # noqa: E402


def measure(path: Path, workers: int, batches: int, batch_size: int, augment: bool = True) -> float:
    cfg = load_config(
        None,
        [
            "data.cameras=[agentview, wrist]",
            "data.image_size=224",
            "data.action_horizon=8",
            f"data.augment.enabled={str(augment).lower()}",
        ],
    )
    stats = dataset_stats(open_dataset(path))
    ds = FrameDataset.from_config(path, cfg.data, stats)
    # the loader `vlatune train` builds (Trainer._loader): make_loader with the step sampler
    warmup = 2 + 3 * workers
    sampler = StepBatchSampler(len(ds), batch_size, seed=0, stop=warmup + batches)
    it = iter(make_loader(ds, num_workers=workers, batch_sampler=sampler))
    # warm-up: workers start, open files and fill their per-episode caches (a worker's first
    # few batches run at about half its steady rate; a training run lives in the steady state)
    for _ in range(warmup):
        next(it)
    n = 0
    t0 = time.perf_counter()
    for _ in range(batches):
        n += len(next(it)["actions"])
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--episodes", type=int, default=10, help="episodes per task (2 tasks)")
    ap.add_argument("--frames", type=int, default=120)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3, help="median of this many runs")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "data_loading.json"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        hdf5 = make_libero_hdf5(Path(tmp) / "hdf5", demos=args.episodes, T=args.frames, res=128)
        mp4 = Path(tmp) / "lerobot"
        convert(open_dataset(hdf5), mp4, "lerobot")
        rlds = Path(tmp) / "rlds"
        write_rlds(open_dataset(hdf5), rlds, name="bench", image_format="jpeg")
        for name, path in (
            ("libero_hdf5", hdf5),
            ("lerobot_v21_mp4", mp4),
            ("rlds_jpeg", rlds),
        ):
            for augment in (True, False):
                for workers in (0, 2):
                    runs = [
                        measure(path, workers, args.batches, args.batch_size, augment)
                        for _ in range(args.repeats)
                    ]
                    sps = statistics.median(runs)
                    per_worker = sps / max(workers, 1)
                    rows.append(
                        {
                            "format": name,
                            "augment": augment,
                            "workers": workers,
                            "samples_per_s": round(sps, 1),
                            "per_worker": round(per_worker, 1),
                            "runs": [round(r, 1) for r in runs],
                        }
                    )
                    print(
                        f"{name:<16} augment={augment!s:<5} workers={workers}  {sps:8.1f} samples/s  ({per_worker:.1f} per worker)",
                        flush=True,
                    )
    result = {
        "benchmark": "data_loading",
        "setting": {
            "cameras": 2,
            "image_size": 224,
            "horizon": 8,
            "batch_size": args.batch_size,
            "source_resolution": 128,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "targets": {"libero_hdf5": 1000, "lerobot_v21_mp4": 300},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
