"""Does vlatune read what TensorFlow Datasets writes, and does TFDS load what vlatune writes?

Runs in the side environment `.venv-rlds` (tensorflow-cpu + tensorflow-datasets, made by
scripts/setup_rlds.sh; vlatune itself needs neither):

(a) TFDS writes: a tiny `tfds.core.GeneratorBasedBuilder` with the RLDS features of OpenVLA's
    LIBERO datasets (`steps`: a `tfds.features.Dataset` of `observation` {image: JPEG Image,
    wrist_image: PNG Image, state: Tensor (8,) float32, joint_state: Tensor (7,) float32},
    action Tensor (7,) float32, discount / reward Scalar float32, is_first / is_last /
    is_terminal Scalar bool, language_instruction Text; `episode_metadata` {file_path: Text}),
    named `libero_object_no_noops`, built by `download_and_prepare`. vlatune's reader opens the
    folder; the values are compared with what TFDS's own `as_dataset` gives: actions, states,
    joint states and flags bit-identical, instructions equal, images identical after decoding
    (TFDS / TensorFlow's decoders against Pillow's).
(b) vlatune writes: a LIBERO-layout HDF5 dataset (tests/data_fixtures.py) converted with
    `vlatune.data.convert.convert(..., to="rlds")`, loaded with `tfds.builder_from_directory`
    and compared the same way (float64 actions stored as raw bytes come back bit-identical).

With --fixture DIR it also copies the TFDS-written folder (a) and the values TFDS read into
DIR (tests/fixtures/rlds_tfds: the committed peer files tests/test_rlds.py reads without
tensorflow). Prints one JSON object, writes it to --out, exits 1 when a check fails.

    scripts/setup_rlds.sh && .venv-rlds/bin/python scripts/rlds_compat.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
NAME = "libero_object_no_noops"
EPISODES = [
    (5, "pick up the alphabet soup and place it in the basket"),
    (7, "pick up the milk and place it in the basket"),
    (4, "pick up the butter and place it in the basket"),
]


def _source_episodes() -> list[dict]:
    from data_fixtures import frames

    rng = np.random.default_rng(7)
    out = []
    for e, (T, text) in enumerate(EPISODES):
        action = rng.uniform(-1, 1, (T, 7)).astype(np.float32)
        action[:, 6] = np.where(np.arange(T) < T // 2, -1.0, 1.0)
        out.append(
            {
                "image": frames(T, 16, e),
                "wrist_image": frames(T, 16, 50 + e),
                "state": rng.normal(size=(T, 8)).astype(np.float32),
                "joint_state": rng.normal(size=(T, 7)).astype(np.float32),
                "action": action,
                "instruction": text,
                "file_path": f"/data/libero_object/demo_{e}.hdf5",
            }
        )
    return out


def tfds_writes(data_dir: Path) -> Path:
    import tensorflow_datasets as tfds

    episodes = _source_episodes()

    class LiberoObjectNoNoops(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "vlatune compatibility check."}

        def _info(self):
            F = tfds.features
            return tfds.core.DatasetInfo(
                builder=self,
                features=F.FeaturesDict(
                    {
                        "steps": F.Dataset(
                            {
                                "observation": F.FeaturesDict(
                                    {
                                        "image": F.Image(shape=(16, 16, 3), encoding_format="jpeg"),
                                        "wrist_image": F.Image(
                                            shape=(16, 16, 3), encoding_format="png"
                                        ),
                                        "state": F.Tensor(shape=(8,), dtype=np.float32),
                                        "joint_state": F.Tensor(shape=(7,), dtype=np.float32),
                                    }
                                ),
                                "action": F.Tensor(shape=(7,), dtype=np.float32),
                                "discount": F.Scalar(dtype=np.float32),
                                "reward": F.Scalar(dtype=np.float32),
                                "is_first": F.Scalar(dtype=np.bool_),
                                "is_last": F.Scalar(dtype=np.bool_),
                                "is_terminal": F.Scalar(dtype=np.bool_),
                                "language_instruction": F.Text(),
                            }
                        ),
                        "episode_metadata": F.FeaturesDict({"file_path": F.Text()}),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for e, ep in enumerate(episodes):
                T = len(ep["action"])
                steps = [
                    {
                        "observation": {
                            "image": ep["image"][t],
                            "wrist_image": ep["wrist_image"][t],
                            "state": ep["state"][t],
                            "joint_state": ep["joint_state"][t],
                        },
                        "action": ep["action"][t],
                        "discount": 1.0,
                        "reward": float(t == T - 1),
                        "is_first": t == 0,
                        "is_last": t == T - 1,
                        "is_terminal": t == T - 1,
                        "language_instruction": ep["instruction"],
                    }
                    for t in range(T)
                ]
                yield (
                    f"episode_{e}",
                    {
                        "steps": steps,
                        "episode_metadata": {"file_path": ep["file_path"]},
                    },
                )

    builder = LiberoObjectNoNoops(data_dir=str(data_dir))
    builder.download_and_prepare()
    return Path(builder.data_dir)


def tfds_read(path: Path) -> list[dict]:
    """Every episode as TFDS's own loader gives it (numpy)."""
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(path))
    out = []
    for ep in tfds.as_numpy(builder.as_dataset(split="train", shuffle_files=False)):
        steps = list(ep["steps"])
        out.append(
            {
                "steps": steps,
                "meta": {k: v for k, v in ep["episode_metadata"].items()},
            }
        )
    return out


def tfds_jpeg_accurate(path: Path) -> list[np.ndarray]:
    """The JPEG camera's frames decoded by TensorFlow with the accurate integer IDCT (TFDS's
    default decoder uses TensorFlow's fast IDCT, libjpeg's JDCT_IFAST; Pillow uses JDCT_ISLOW)."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(path))
    skip = {"steps": {"observation": {"image": tfds.decode.SkipDecoding()}}}
    out = []
    for ep in builder.as_dataset(split="train", shuffle_files=False, decoders=skip):
        frames = [
            tf.io.decode_jpeg(s["observation"]["image"], dct_method="INTEGER_ACCURATE").numpy()
            for s in ep["steps"]
        ]
        out.append(np.stack(frames))
    return out


def compare_a(path: Path, theirs: list[dict]) -> dict:
    from vlatune.data import open_dataset

    accurate = tfds_jpeg_accurate(path)

    ds = open_dataset(path)
    info = ds.info.to_json(ds.tasks())
    res = {
        "tfds_path": str(path.relative_to(path.parents[1])),
        "format_detected": ds.format,
        "episodes": len(ds),
        "cameras": info["cameras"],
        "conventions": info["conventions"],
        "actions_exact": True,
        "states_exact": True,
        "joint_states_exact": True,
        "flags_exact": True,
        "instructions_equal": True,
        "file_paths_equal": True,
        "image_max_abs_diff": {"agentview": 0, "wrist": 0},
        "jpeg_vs_tf_accurate_idct_max_abs_diff": 0,
        "jpeg_vs_tfds_default_mean_abs_diff": 0.0,
    }
    res["episodes_equal"] = len(ds) == len(theirs)
    diffs = []
    for i, t in enumerate(theirs):
        ep = ds.load_episode(i)
        steps = t["steps"]
        act = np.stack([s["action"] for s in steps])
        res["actions_exact"] &= ep.actions.dtype == act.dtype and np.array_equal(ep.actions, act)
        st = np.stack([s["observation"]["state"] for s in steps])
        res["states_exact"] &= np.array_equal(ep.states, st)
        js = np.stack([s["observation"]["joint_state"] for s in steps])
        res["joint_states_exact"] &= np.array_equal(ep.extras["observation.joint_state"], js)
        for flag in ("is_first", "is_last", "is_terminal", "reward", "discount"):
            theirs_flag = np.array([s[flag] for s in steps])
            res["flags_exact"] &= np.array_equal(ep.extras[flag], theirs_flag)
        res["instructions_equal"] &= all(
            s["language_instruction"].decode() == ep.instruction for s in steps
        )
        res["file_paths_equal"] &= (
            ep.meta["episode_metadata/file_path"] == t["meta"]["file_path"].decode()
        )
        for cam, key in (("agentview", "image"), ("wrist", "wrist_image")):
            theirs_img = np.stack([s["observation"][key] for s in steps]).astype(np.int16)
            diff = int(np.abs(ep.images[cam].astype(np.int16) - theirs_img).max())
            res["image_max_abs_diff"][cam] = max(res["image_max_abs_diff"][cam], diff)
            if cam == "agentview":
                diffs.append(np.abs(ep.images[cam].astype(np.int16) - theirs_img).ravel())
        acc = int(np.abs(ep.images["agentview"].astype(np.int16) - accurate[i]).max())
        res["jpeg_vs_tf_accurate_idct_max_abs_diff"] = max(
            res["jpeg_vs_tf_accurate_idct_max_abs_diff"], acc
        )
    res["jpeg_vs_tfds_default_mean_abs_diff"] = round(float(np.concatenate(diffs).mean()), 3)
    res["ok"] = bool(
        res["episodes_equal"]
        and res["actions_exact"]
        and res["states_exact"]
        and res["joint_states_exact"]
        and res["flags_exact"]
        and res["instructions_equal"]
        and res["file_paths_equal"]
        and res["image_max_abs_diff"]["wrist"] == 0  # PNG: lossless, identical
        and res["jpeg_vs_tf_accurate_idct_max_abs_diff"] == 0  # JPEG: same IDCT, identical
    )
    return res


def compare_b(tmp: Path) -> dict:
    from data_fixtures import make_libero_hdf5
    from vlatune.data import open_dataset
    from vlatune.data.convert import convert

    src = open_dataset(make_libero_hdf5(tmp / "libero"))
    convert(src, tmp / "vlatune_rlds", to="rlds")
    theirs = tfds_read(tmp / "vlatune_rlds")
    res = {
        "episodes_equal": len(theirs) == len(src),
        "actions_exact": True,
        "states_exact": True,
        "extras_exact": True,
        "instructions_equal": True,
        "flags_as_rlds": True,
        "image_max_abs_diff": {"agentview": 0, "wrist": 0},
    }
    for i, t in enumerate(theirs):
        ep = src.load_episode(i)
        steps = t["steps"]
        act = np.stack([s["action"] for s in steps])
        res["action_dtype"] = str(act.dtype)
        res["actions_exact"] &= act.dtype == ep.actions.dtype and np.array_equal(act, ep.actions)
        st = np.stack([s["observation"]["state"] for s in steps])
        res["states_exact"] &= np.array_equal(st, ep.states)
        joint = np.stack([s["obs"]["joint_states"] for s in steps])
        res["extras_exact"] &= np.array_equal(joint, ep.extras["obs/joint_states"])
        res["instructions_equal"] &= all(
            s["language_instruction"].decode() == ep.instruction for s in steps
        )
        T = len(steps)
        res["flags_as_rlds"] &= [bool(s["is_first"]) for s in steps] == [
            t == 0 for t in range(T)
        ] and [bool(s["is_last"]) for s in steps] == [t == T - 1 for t in range(T)]
        for cam, key in (("agentview", "image"), ("wrist", "wrist_image")):
            img = np.stack([s["observation"][key] for s in steps]).astype(np.int16)
            diff = int(np.abs(img - ep.images[cam].astype(np.int16)).max())
            res["image_max_abs_diff"][cam] = max(res["image_max_abs_diff"][cam], diff)
    res["ok"] = bool(
        res["episodes_equal"]
        and res["actions_exact"]
        and res["states_exact"]
        and res["extras_exact"]
        and res["instructions_equal"]
        and res["flags_as_rlds"]
        and all(v == 0 for v in res["image_max_abs_diff"].values())
    )
    return res


def write_fixture(path: Path, theirs: list[dict], dest: Path) -> None:
    """The TFDS-written folder and the values TFDS read from it (JSON: float32 values round-trip
    exactly through Python floats)."""
    target = dest / NAME / path.name
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(path, target)
    accurate = tfds_jpeg_accurate(path)
    episodes = []
    for i, t in enumerate(theirs):
        steps = t["steps"]
        act = np.stack([s["action"] for s in steps])
        episodes.append(
            {
                "instruction": steps[0]["language_instruction"].decode(),
                "action": act.tolist(),
                "action_dtype": str(act.dtype),
                "state": np.stack([s["observation"]["state"] for s in steps]).tolist(),
                "is_last": [bool(s["is_last"]) for s in steps],
                # per-frame pixel sums; the JPEG camera decoded with the accurate IDCT
                "image_sums": {
                    "agentview": [int(f.astype(np.int64).sum()) for f in accurate[i]],
                    "wrist": [
                        int(s["observation"]["wrist_image"].astype(np.int64).sum()) for s in steps
                    ],
                },
                "file_path": t["meta"]["file_path"].decode(),
            }
        )
    doc = {
        "written_by": "tensorflow-datasets (scripts/rlds_compat.py, GeneratorBasedBuilder)",
        "dataset": f"{NAME}/{path.name}",
        "episodes": episodes,
    }
    (dest / "expected.json").write_text(json.dumps(doc, indent=1) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results" / "rlds_compat.json"
    )
    ap.add_argument("--fixture", type=Path, help="also write the committed peer files here")
    args = ap.parse_args()
    import tensorflow as tf
    import tensorflow_datasets as tfds

    result: dict = {"tensorflow": tf.__version__, "tensorflow_datasets": tfds.__version__}
    with tempfile.TemporaryDirectory(prefix="vlatune-rlds-") as d:
        tmp = Path(d)
        path = tfds_writes(tmp / "tfds")
        theirs = tfds_read(path)
        result["vlatune_reads_tfds"] = compare_a(path, theirs)
        result["tfds_loads_vlatune"] = compare_b(tmp)
        if args.fixture:
            write_fixture(path, theirs, args.fixture)
    result["ok"] = result["vlatune_reads_tfds"]["ok"] and result["tfds_loads_vlatune"]["ok"]
    text = json.dumps(result, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
