"""Nothing lost, nothing silent: broken data is refused (or skipped on request) by `data check`,
`data convert` and `train` with one line per problem naming file, episode and key; a full disk
is one sentence with nothing half-written left; stale temporaries of killed runs are removed;
corrupt checkpoints are skipped on resume; a refused run leaves no run folder.

Every test builds its broken input in a temporary folder. The full-disk tests mount a small
tmpfs (root only; skipped, saying why, where mounting is not permitted) and also fake ENOSPC.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from tests.data_fixtures import MAPPING, make_custom_hdf5, make_libero_hdf5
from vlatune import fsutil
from vlatune.cli import cli
from vlatune.data import open_dataset
from vlatune.data.check import check_dataset
from vlatune.data.convert import convert
from vlatune.data.episode import DataError
from vlatune.train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
CONFIG = next(  # the demo recipe (shipped inside the package, or at the repository root)
    (
        p
        for p in (ROOT / "src/vlatune/configs/demo/tiny.yaml", ROOT / "configs/demo/tiny.yaml")
        if p.is_file()
    ),
    ROOT / "configs/demo/tiny.yaml",
)
STOVE = "KITCHEN_SCENE3_turn_on_the_stove_demo.hdf5"  # sorts first: its demo_k is episode k


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _libero(tmp_path: Path, edit=None, **kw) -> Path:
    root = make_libero_hdf5(tmp_path / "src", **kw)
    if edit is not None:
        with h5py.File(root / STOVE, "a") as f:
            edit(f["data"])
    return root


def _replace(group, key: str, data) -> None:
    del group[key]
    group.create_dataset(key, data=data)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ------------------------------------------------------------------ broken numbers and shapes
def test_nan_gripper_value_is_refused_everywhere_and_skipped_on_request(tmp_path):
    src = _libero(tmp_path, lambda d: d["demo_1/actions"].__setitem__((3, 6), np.nan))
    where = f"{STOVE}:demo_1: episode 1: key 'action'"
    r = run("data", "check", src)
    assert r.exit_code == 1 and where in r.output and "NaN" in r.output
    r = run("data", "stats", src, "--out", tmp_path / "stats.json")  # never NaN statistics
    assert r.exit_code == 1 and where in r.output and not (tmp_path / "stats.json").exists()
    for to in ("lerobot", "lerobot-v3", "hdf5"):
        dst = tmp_path / f"out-{to}"
        r = run("data", "convert", src, dst, "--to", to)
        assert r.exit_code == 1, r.output
        assert where in r.output and "--skip-bad-episodes" in r.output
        assert not dst.exists() and _leftovers(tmp_path) == []
    dst = tmp_path / "skipped"
    r = run("data", "convert", src, dst, "--to", "lerobot", "--skip-bad-episodes")
    assert r.exit_code == 0, r.output
    assert "skipped 1 bad episode(s)" in r.output and "[1]" in r.output
    out, ds = open_dataset(dst), open_dataset(src)
    assert len(out) == len(ds) - 1 and check_dataset(out) == []
    kept = [i for i in range(len(ds)) if i != 1]
    for j, i in enumerate(kept):  # the other episodes are kept, bit for bit, in order
        a, b = out.load_episode(j, cameras=[]), ds.load_episode(i, cameras=[])
        np.testing.assert_array_equal(a.actions, b.actions)
        np.testing.assert_array_equal(a.states, b.states)


def _four_channels(ep: int):
    def edit(d):
        frames = d[f"demo_{ep}/obs/eye_in_hand_rgb"][()]
        alpha = np.full(frames.shape[:-1] + (1,), 255, np.uint8)
        _replace(d[f"demo_{ep}/obs"], "eye_in_hand_rgb", np.concatenate([frames, alpha], -1))

    return edit


def _six_d_actions(d):
    _replace(d["demo_2"], "actions", d["demo_2/actions"][()][:, :6])


def _short_state(d):
    _replace(d["demo_1/obs"], "gripper_states", d["demo_1/obs/gripper_states"][()][:5])


def _extra_camera(d):
    frames = d["demo_1/obs/agentview_rgb"][()]
    d["demo_1/obs"].create_dataset("side_rgb", data=frames)


def _inf_state(d):
    d["demo_2/obs/ee_states"][4, 1] = -np.inf


def _float_images_undeclared(d):
    frames = d["demo_1/obs/agentview_rgb"][()].astype(np.float32) / 255
    _replace(d["demo_1/obs"], "agentview_rgb", frames)


def _nan_extra(d):
    d["demo_0/robot_states"][2, 3] = np.nan


def _missing_state(d):
    del d["demo_1/obs/gripper_states"]


@pytest.mark.parametrize(
    "edit,episode,key,words",
    [
        (_four_channels(1), 1, "image.wrist", "4 channels; expected 3"),
        (_four_channels(0), 0, "image.wrist", "4 channels; expected 3"),
        (_six_d_actions, 2, "action", "per-frame shape (6,)"),
        (_short_state, 1, "state", "5 frames but 13 actions"),
        (_extra_camera, 1, "obs/side_rgb", "would be dropped"),
        (_inf_state, 2, "state", "NaN or inf"),
        (_float_images_undeclared, 1, "obs/agentview_rgb", "vlatune_image_range"),
        (_nan_extra, 0, "robot_states", "NaN or inf"),
        (_missing_state, 1, "state", "missing in this episode"),
    ],
    ids=[
        "4-channel-wrist",
        "4-channel-first-episode",
        "6d-actions",
        "short-state",
        "camera-in-one-episode",
        "inf-state",
        "float-images-undeclared",
        "nan-extra",
        "missing-state",
    ],
)
def test_broken_episode_is_named_by_check_and_refused_by_convert(
    tmp_path, edit, episode, key, words
):
    src = _libero(tmp_path, edit)
    r = run("data", "check", src)
    assert r.exit_code == 1, r.output
    line = next((x for x in r.output.splitlines() if f"key '{key}'" in x), None)
    assert line is not None, r.output
    assert f"{STOVE}:demo_{episode}: episode {episode}:" in line and words in line
    for to in ("lerobot", "hdf5"):
        dst = tmp_path / f"out-{to}"
        r = run("data", "convert", src, dst, "--to", to)
        assert r.exit_code == 1 and f"key '{key}'" in r.output and words in r.output, r.output
        assert not dst.exists() and _leftovers(tmp_path) == []
    # the bad episode alone is left out on request; everything else arrives
    dst = tmp_path / "skip"
    r = run("data", "convert", src, dst, "--to", "lerobot", "--skip-bad-episodes")
    assert r.exit_code == 0, r.output
    out = open_dataset(dst)
    assert len(out) == len(open_dataset(src)) - 1 and check_dataset(out) == []
    assert out.info.cameras == ["agentview", "wrist"] and "state" in out.info.features


def test_float_images_convert_when_their_range_is_declared(tmp_path):
    src = make_custom_hdf5(tmp_path / "src", episodes=2, T=6)
    raw = {}
    for e in range(2):
        with h5py.File(src / f"episode_{e:03d}.hdf5", "a") as f:
            u8 = f["observations/images/camera1"][()]
            raw[e] = u8
            _replace(f, "observations/images/camera1", u8.astype(np.float32) / 255)
    r = run("data", "check", src)
    assert r.exit_code == 1 and "image_range" in r.output and "episode_000" in r.output
    assert not (tmp_path / "a").exists()
    (src / "vlatune_mapping.yaml").write_text(MAPPING + "image_range: [0, 1]\n")
    ds = open_dataset(src)
    assert check_dataset(ds) == []
    for e in range(2):  # [0, 1] floats read as their uint8 values, not as near-black frames
        np.testing.assert_array_equal(ds.load_episode(e).images["camera1"], raw[e])
    assert convert(ds, tmp_path / "a", "hdf5")["episodes"] == 2
    ds.close()
    # values outside the declared range are refused, naming the file and the key
    with h5py.File(src / "episode_001.hdf5", "a") as f:
        f["observations/images/camera1"][2, 0, 0, 0] = 37.0
    r = run("data", "convert", src, tmp_path / "b", "--to", "hdf5")
    assert (
        r.exit_code == 1 and "episode_001.hdf5" in r.output and "outside the declared" in r.output
    )
    assert "observations/images/camera1" in r.output and not (tmp_path / "b").exists()


def test_libero_float_images_with_declared_range(tmp_path):
    src = _libero(tmp_path, _float_images_undeclared)
    with h5py.File(src / STOVE, "a") as f:
        f["data"].attrs["vlatune_image_range"] = [0.0, 1.0]
    ds = open_dataset(src)
    assert check_dataset(ds) == []
    frames = ds.load_episode(1).images["agentview"]
    assert frames.dtype == np.uint8 and frames.max() > 200  # not black
    np.testing.assert_array_equal(ds.read_frames(1, "agentview", [0, 3]), frames[[0, 3]])


def test_lerobot_feature_missing_from_info_json_is_not_dropped(tmp_path):
    v21 = tmp_path / "v21"
    convert(open_dataset(make_libero_hdf5(tmp_path / "d")), v21, "lerobot")
    info_path = v21 / "meta/info.json"
    info = json.loads(info_path.read_text())
    del info["features"]["observation.state"]
    info_path.write_text(json.dumps(info))
    r = run("data", "check", v21)
    assert r.exit_code == 1 and "key 'observation.state'" in r.output
    assert "episode_000000.parquet" in r.output and "not declared" in r.output
    r = run("data", "convert", v21, tmp_path / "copy", "--to", "lerobot-v3")
    assert r.exit_code == 1 and "observation.state" in r.output
    assert not (tmp_path / "copy").exists()
    # a camera whose videos exist but whose feature is not declared is not dropped either
    info = json.loads(info_path.read_text())
    info["features"]["observation.state"] = {"dtype": "float32", "shape": [8], "names": None}
    del info["features"]["observation.images.wrist"]
    info_path.write_text(json.dumps(info))
    (v21 / "meta/vlatune.json").unlink()
    r = run("data", "check", v21)
    assert r.exit_code == 1 and "key 'observation.images.wrist'" in r.output, r.output
    assert "info.json" in r.output


@pytest.mark.parametrize("kind", ["truncated", "not-hdf5"])
def test_corrupt_hdf5_under_format_auto_is_named_not_a_mapping_question(tmp_path, kind):
    src = make_libero_hdf5(tmp_path / "src")
    bad = src / STOVE
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 3] if kind == "truncated" else b"hello, not hdf5\n" * 99)
    for args in (("data", "inspect", src), ("data", "check", src)):
        r = run(*args)
        assert r.exit_code == 1, r.output
        assert STOVE in r.output and "unreadable HDF5" in r.output and "mapping" not in r.output
    r = run("data", "convert", src, tmp_path / "o", "--to", "lerobot")
    assert r.exit_code == 1 and "unreadable HDF5" in r.output and not (tmp_path / "o").exists()
    r = run("data", "check", bad)  # a single file too
    assert r.exit_code == 1 and "unreadable HDF5" in r.output and "mapping" not in r.output


def test_inspect_says_it_reads_metadata_only(tmp_path):
    src = _libero(tmp_path, lambda d: d["demo_1/actions"].__setitem__((3, 6), np.nan))
    r = run("data", "inspect", src)
    assert r.exit_code == 0 and "metadata only" in r.output and "data check" in r.output
    r = run("data", "inspect", src, "--json")
    assert json.loads(r.output)["contents_checked"] is False


def test_validation_reads_two_frames_per_camera_not_all(tmp_path, monkeypatch):
    from vlatune.data.validate import validate_dataset

    ds = open_dataset(make_libero_hdf5(tmp_path / "d"))
    seen = []
    real = type(ds).read_frames
    monkeypatch.setattr(
        type(ds), "read_frames", lambda self, i, c, f: seen.append(list(f)) or real(self, i, c, f)
    )
    assert validate_dataset(ds, images="sample").problems == []
    assert seen and all(len(f) <= 2 for f in seen)


# ------------------------------------------------------------------------- full disk, OS errors
@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KB tmpfs; skipped (with the reason) where mounting is not permitted."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("to", ["hdf5", "lerobot", "lerobot-v3"])
def test_full_disk_convert_is_one_sentence_and_leaves_nothing(tmp_path, tiny_disk, to):
    src = make_libero_hdf5(tmp_path / "src", demos=3, T=40, res=64)
    dst = tiny_disk / "out"
    r = subprocess.run(
        [sys.executable, "-m", "vlatune", "data", "convert", str(src), str(dst), "--to", to],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 1, (r.returncode, r.stderr[-3000:])  # not a segfault (-11)
    assert "no space left on tmpfs" in r.stderr and f"while writing {dst}" in r.stderr
    assert "free " in r.stderr and " MB" in r.stderr
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr
    assert list(tiny_disk.iterdir()) == []  # nothing half-written, no temporary


def test_enospc_from_any_writer_is_one_sentence(tmp_path, monkeypatch):
    src = make_libero_hdf5(tmp_path / "src")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    import pyarrow.parquet as pq

    monkeypatch.setattr(pq, "write_table", full)
    r = run("data", "convert", src, tmp_path / "out", "--to", "lerobot")
    assert r.exit_code == 1 and "no space left on" in r.output and "free " in r.output
    assert f"while writing {tmp_path / 'out'}" in r.output
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    # a failed JSON write removes its temporary and names the real file
    monkeypatch.setattr(Path, "write_text", lambda self, *a, **k: full())
    with pytest.raises(OSError) as e:
        fsutil.write_json(tmp_path / "x.json", {"a": 1})
    assert e.value.filename == str(tmp_path / "x.json") and _leftovers(tmp_path) == []
    text = fsutil.os_error_sentence(e.value)
    assert text.startswith("no space left on ") and "x.json: free " in text


def test_stale_temporaries_are_removed_only_when_provably_ours(tmp_path):
    src = make_libero_hdf5(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    host = fsutil._HOST
    stale = out / f".vlatune-tmp.copy.{host}.{_dead_pid()}"
    live = out / f".vlatune-tmp.other.{host}.{os.getpid()}"  # a running process: kept
    remote = out / f".vlatune-tmp.copy.elsewhere.{_dead_pid()}"  # another host: kept
    foreign = out / ".copy.tmp-1"  # not named by vlatune: kept
    for p in (stale, live, remote, foreign):
        p.mkdir()
        (p / "half.parquet").write_bytes(b"x" * 100)
    r = run("data", "convert", src, out / "copy", "--to", "lerobot")
    assert r.exit_code == 0, r.output
    assert not stale.exists() and live.exists() and remote.exists() and foreign.exists()
    assert (out / "copy/meta/info.json").is_file()


# ---------------------------------------------------------------------------------- training
def _train(run_dir: Path, data: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [
        sys.executable, "-m", "vlatune", "train", str(CONFIG), "--no-progress",
        f"data.path={data}", "data.image_size=64", "data.batch_size=4", "policy.tiny.dim=32",
        "policy.heads.mlp_dim=32", f"train.output_dir={run_dir}", "train.max_steps=4",
        "train.save_every=2", "train.log_every=1", "optim.warmup_steps=0", *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("VLATUNE_FAULT", None)
    return subprocess.run(
        args, capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL
    )


def test_train_refuses_nan_data_and_skips_bad_episodes_on_request(tmp_path):
    src = _libero(tmp_path, lambda d: d["demo_1/actions"].__setitem__((3, 6), np.nan), demos=3)
    run_dir = tmp_path / "run"
    r = _train(run_dir, src)
    assert r.returncode == 1, r.stderr[-3000:]
    assert f"{STOVE}:demo_1: episode 1: key 'action'" in r.stderr and "NaN" in r.stderr
    assert "data.skip_bad_episodes" in r.stderr and "Traceback" not in r.stderr
    assert not run_dir.exists()  # refused: no run folder, no split.json / stats.json
    r = _train(run_dir, src, "data.skip_bad_episodes=true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "leaving out 1" in r.stderr and "episode 1" in r.stderr
    split = json.loads((run_dir / "split.json").read_text())
    assert split["skipped"] == [1] and 1 not in split["train"] + split["test"]
    stats = json.loads((run_dir / "stats.json").read_text())
    assert all(np.isfinite(np.asarray(v["mean"], float)).all() for v in stats.values())
    from safetensors.torch import load_file

    weights = load_file(run_dir / "checkpoint-4/policy/model.safetensors")
    assert all(bool(t.isfinite().all()) for t in weights.values())


def test_refused_train_leaves_no_run_folder_and_keeps_an_existing_one(tmp_path):
    src = make_libero_hdf5(tmp_path / "src", demos=2)
    run_dir = tmp_path / "run"
    r = _train(run_dir, src, "data.cameras=[agentview,side]")
    assert r.returncode == 1 and "'side'" in r.stderr and "data.cameras" in r.stderr
    assert not run_dir.exists()
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    r = _train(run_dir, src, "data.cameras=[agentview,side]")
    assert r.returncode == 1
    assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt"]


def _tiny_cfg(run_dir: Path, data: Path, *extra: str):
    from vlatune.config import load_config

    return load_config(
        CONFIG,
        [
            f"data.path={data}", "data.image_size=64", "data.batch_size=4", "policy.tiny.dim=32",
            "policy.heads.mlp_dim=32", f"train.output_dir={run_dir}", "train.max_steps=6",
            "train.save_every=2", "train.log_every=1", "optim.warmup_steps=0", *extra,
        ],
    )  # fmt: skip


def test_non_finite_loss_stops_with_step_and_episodes(tmp_path, monkeypatch):
    from vlatune.train import trainer as tr

    src = make_libero_hdf5(tmp_path / "src", demos=2)
    real = tr.Trainer._batches_to_device
    calls = {"n": 0}

    def poisoned(self, batch):
        calls["n"] += 1
        out = real(self, batch)
        if calls["n"] == 3:
            out["actions"] = out["actions"] * float("nan")
        return out

    monkeypatch.setattr(tr.Trainer, "_batches_to_device", poisoned)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run_dir = tmp_path / "run"
    with pytest.raises(tr.TrainError) as e:
        tr.train(_tiny_cfg(run_dir, src), progress=False)
    msg = str(e.value)
    assert "step 3" in msg and "not finite" in msg and "episodes [" in msg
    assert (run_dir / "checkpoint-2").is_dir() and not (run_dir / "checkpoint-4").exists()
    assert not list(run_dir.glob(".checkpoint-*"))
    from safetensors.torch import load_file

    weights = load_file(run_dir / "checkpoint-2/policy/model.safetensors")
    assert all(bool(t.isfinite().all()) for t in weights.values())


def test_checkpoint_on_a_full_disk_is_removed_and_one_sentence(tmp_path, monkeypatch):
    from vlatune.train import trainer as tr

    src = make_libero_hdf5(tmp_path / "src", demos=2)
    run_dir = tmp_path / "run"

    def full(obj, f, *a, **k):  # torch reports a full disk as a RuntimeError
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(tr.torch, "save", full)
    monkeypatch.setattr(fsutil, "free_mb", lambda path: 0.2)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with pytest.raises(OSError) as e:
        tr.train(_tiny_cfg(run_dir, src), progress=False)
    assert e.value.errno == errno.ENOSPC and str(run_dir / "checkpoint-2") in e.value.filename
    assert not list(run_dir.glob(".checkpoint-*")) and not list(run_dir.glob("checkpoint-*"))
    text = fsutil.os_error_sentence(e.value)
    assert "no space left on" in text and "checkpoint-2" in text and "free 0.2 MB" in text


def test_full_disk_during_training_real_tmpfs(tmp_path, tiny_disk):
    src = make_libero_hdf5(tmp_path / "src", demos=2)
    r = _train(tiny_disk / "run", src)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "no space left on tmpfs" in r.stderr and "checkpoint-2" in r.stderr
    assert "Traceback" not in r.stderr
    assert not list((tiny_disk / "run").glob(".checkpoint-*"))
    assert not list((tiny_disk / "run").glob("checkpoint-*"))


def test_corrupt_latest_checkpoint_is_skipped_with_a_warning(tmp_path):
    src = make_libero_hdf5(tmp_path / "src", demos=2)
    run_dir = tmp_path / "run"
    r = _train(run_dir, src, "train.keep_last=5")
    assert r.returncode == 0, r.stderr[-3000:]
    weights = run_dir / "checkpoint-4/policy/model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    r = _train(run_dir, src, "train.keep_last=5", "train.max_steps=6")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ignoring checkpoint" in r.stderr and "checkpoint-4" in r.stderr
    assert "model.safetensors is truncated" in r.stderr
    assert "resumed from" in r.stderr and "checkpoint-2 (step 2)" in r.stderr
    assert (run_dir / "checkpoint-6/trainer_state.json").is_file()
    ckpt.validate(run_dir / "checkpoint-4")  # rewritten whole by the resumed run


def test_find_latest_checks_weights_and_optimizer_archives(tmp_path):
    import torch
    from safetensors.torch import save_file

    def make(step: int) -> Path:
        p = tmp_path / f"checkpoint-{step}"
        (p / "policy").mkdir(parents=True)
        save_file({"w": torch.ones(64)}, p / "policy/model.safetensors")
        (p / "policy/config.json").write_text("{}")
        torch.save({"state": {}, "param_groups": []}, p / "optimizer.pt")
        state = {"step": step, "micro_step": step, "world_size": 1, "scheduler": {}}
        (p / "trainer_state.json").write_text(json.dumps(state))
        return p

    make(2)
    p4, p6, p8 = make(4), make(6), make(8)
    opt = p8 / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:-40])  # truncated optimizer archive
    (p6 / "policy/model.safetensors").write_bytes(b"\xff" * 8 + b"{}")  # corrupt header
    extra = p4 / "train_weights.safetensors"
    save_file({"w": torch.ones(8)}, extra)
    extra.write_bytes(extra.read_bytes() + b"junk")  # padded: not what was written
    path, state = ckpt.find_latest(tmp_path)
    assert path.name == "checkpoint-2" and state["step"] == 2


def test_stale_checkpoint_temporaries_are_cleaned_at_start(tmp_path):
    run_dir = tmp_path / "run"
    dead, live, orphan = (run_dir / f".checkpoint-{s}.tmp" for s in (2, 4, 6))
    for p, pid in ((dead, _dead_pid()), (live, os.getpid())):
        p.mkdir(parents=True)
        (p / ckpt.OWNER).write_text(json.dumps({"host": fsutil._HOST, "pid": pid}))
    orphan.mkdir()  # killed before it recorded its owner
    (run_dir / "checkpoint-1").mkdir()  # a real checkpoint folder is never touched
    removed = ckpt.clean_stale(run_dir)
    assert sorted(p.name for p in removed) == [".checkpoint-2.tmp", ".checkpoint-6.tmp"]
    assert live.exists() and (run_dir / "checkpoint-1").exists()


def test_validation_errors_are_data_errors_with_every_line(tmp_path):
    from vlatune.data.validate import validate_dataset

    def edit(d):
        d["demo_0/actions"][0, 0] = np.nan
        d["demo_2/actions"][1, 1] = np.inf

    report = validate_dataset(open_dataset(_libero(tmp_path, edit)))
    assert report.bad_episodes == [0, 2]
    with pytest.raises(DataError) as e:
        report.raise_if_blocking("conversion", "pass --skip-bad-episodes")
    lines = str(e.value).splitlines()
    assert "2 problem(s)" in lines[0] and "[0, 2]" in lines[0]
    assert any("episode 0: key 'action'" in x for x in lines)
    assert any("episode 2: key 'action'" in x for x in lines)


def test_check_help_says_what_it_reads():
    r = run("data", "check", "--help")
    assert "every frame" in r.output and "first and last frame" in r.output


def test_lerobot_metadata_length_must_match_the_data(tmp_path):
    v21 = tmp_path / "v21"
    convert(open_dataset(make_libero_hdf5(tmp_path / "d")), v21, "lerobot")
    path = v21 / "meta/episodes.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    rows[4]["length"] += 3
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run("data", "check", v21)
    assert r.exit_code == 1 and "episode 4: key 'length'" in r.output, r.output
    assert "episode_000004.parquet" in r.output
    r = run("data", "convert", v21, tmp_path / "o", "--to", "hdf5")
    assert r.exit_code == 1 and not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "edit,key",
    [
        (lambda info: info["features"]["action"].pop("shape"), "features.action"),
        (lambda info: info.__setitem__("fps", "fast"), "fps"),
    ],
    ids=["feature-without-shape", "fps-not-a-number"],
)
def test_broken_lerobot_metadata_names_file_and_key(tmp_path, edit, key):
    v21 = tmp_path / "v21"
    convert(open_dataset(make_libero_hdf5(tmp_path / "d")), v21, "lerobot")
    info_path = v21 / "meta/info.json"
    info = json.loads(info_path.read_text())
    edit(info)
    info_path.write_text(json.dumps(info))
    for args in (("data", "inspect", v21), ("data", "check", v21)):
        r = run(*args)
        assert r.exit_code == 1 and "info.json" in r.output and f"key '{key}'" in r.output
        assert r.exception is None or isinstance(r.exception, SystemExit)


def test_atomic_file_renames_on_success_and_leaves_nothing_on_failure(tmp_path):
    from vlatune.fsutil import atomic_file, is_stale_temporary, write_text

    dest = tmp_path / "plot.png"
    with atomic_file(dest, keep_suffix=True) as tmp:
        assert tmp.suffix == ".png" and tmp.name.startswith(".vlatune-tmp.")
        tmp.write_bytes(b"png")
    assert dest.read_bytes() == b"png" and sorted(p.name for p in tmp_path.iterdir()) == [
        "plot.png"
    ]
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "x.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]
    write_text(tmp_path / "y.md", "done\n")
    assert (tmp_path / "y.md").read_text() == "done\n"
    # a suffixed temporary of a dead process is recognised as stale
    from vlatune.fsutil import _HOST

    dead = tmp_path / f".vlatune-tmp.v.mp4.{_HOST}.999999999.mp4"
    assert is_stale_temporary(dead)
