"""Trainer: schedules, the step sampler, exact resume after SIGKILL, checkpoints, errors."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.data_fixtures import make_libero_hdf5
from vlatune.train import checkpoint as ckpt
from vlatune.train.sampler import StepBatchSampler
from vlatune.train.schedules import lr_multiplier

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo" / "tiny.yaml"


def test_schedules():
    f = lr_multiplier("cosine", max_steps=1000, warmup_steps=100)
    assert f(0) == pytest.approx(0.01) and f(99) == pytest.approx(1.0)
    assert f(550) == pytest.approx(0.5) and f(1000) == pytest.approx(0.0)
    m = lr_multiplier("multistep", 10, decay_steps=[5, 8], decay_factor=0.1)
    assert [m(4), m(5), m(8)] == [1.0, pytest.approx(0.1), pytest.approx(0.01)]
    lin = lr_multiplier("linear", 10)
    assert lin(5) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_multiplier("exp", 10)


def test_multistep_decay_beyond_the_run_is_said():
    from vlatune.config.loader import load_config
    from vlatune.config.schema import config_warnings

    ok = load_config(
        CONFIG, ["optim.schedule=multistep", "optim.decay_steps=[50]", "train.max_steps=100"]
    )
    assert not [w for w in config_warnings(ok) if "decay_steps" in w]
    short = load_config(
        CONFIG, ["optim.schedule=multistep", "optim.decay_steps=[50, 120]", "train.max_steps=100"]
    )
    (w,) = [w for w in config_warnings(short) if "decay_steps" in w]
    assert "[120] at or beyond train.max_steps (100)" in w


def test_replan_longer_than_the_chunk_is_said():
    from vlatune.config.loader import load_config
    from vlatune.config.schema import config_warnings

    assert not [w for w in config_warnings(load_config(CONFIG)) if "eval.replan" in w]
    cfg = load_config(CONFIG, ["data.action_horizon=8", "eval.replan=16"])
    (w,) = [w for w in config_warnings(cfg) if "eval.replan" in w]
    assert "eval.replan (16) is longer than data.action_horizon (8)" in w


def test_step_sampler_shards_and_resumes():
    a = StepBatchSampler(10, 3, seed=1, rank=0, world=2, stop=5)
    b = StepBatchSampler(10, 3, seed=1, rank=1, world=2, stop=5)
    ba, bb = list(a), list(b)
    # the first 10 positions of the stream (epoch 0) are a permutation shared out between ranks
    epoch0 = sorted(i for batch in (ba[0], bb[0], ba[1]) for i in batch if i < 10)
    assert len(set(epoch0)) == len(epoch0)
    assert not set(ba[0]) & set(bb[0])
    # epochs are numbered into the index (so augmentation differs per epoch)
    assert max(i for batch in ba + bb for i in batch) >= 10
    resumed = StepBatchSampler(10, 3, seed=1, rank=0, world=2, start=2, stop=5)
    assert list(resumed) == ba[2:]


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory) -> Path:
    from hf_fixtures import tiny_qwen2_5_vl

    return tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny-qwen"))


@pytest.fixture(scope="module")
def rdt_encoders(tmp_path_factory) -> tuple[Path, Path]:
    from hf_fixtures import tiny_siglip_vision, tiny_t5_encoder

    root = tmp_path_factory.mktemp("rdt")
    return tiny_siglip_vision(root / "siglip"), tiny_t5_encoder(root / "t5")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_libero_hdf5(tmp_path_factory.mktemp("train") / "data", demos=4, T=16, res=64)


def _train(run: Path, data: Path, *extra: str, fault: str | None = None):
    env = dict(os.environ)
    env.pop("VLATUNE_FAULT", None)
    if fault:
        env["VLATUNE_FAULT"] = fault
    args = [
        sys.executable, "-m", "vlatune", "train", str(CONFIG), "--no-progress",
        f"data.path={data}", "data.format=auto", "data.image_size=64", "data.batch_size=4", "data.camera_dropout=0.3",
        "policy.tiny.dropout=0.1", "policy.tiny.dim=32", "policy.energy.enabled=true",
        "policy.heads.mlp_dim=32", f"train.output_dir={run}", "train.max_steps=8",
        "train.save_every=4", "train.log_every=2", "train.keep_last=5", *extra,
    ]  # fmt: skip
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "policy" / "model.safetensors")


@pytest.mark.parametrize("ema", [False, True])
def test_exact_resume_after_sigkill(tmp_path, dataset, ema):
    extra = ["train.ema_decay=0.9" if ema else "train.ema_decay=0"]  # the demo recipe averages
    straight = _train(tmp_path / "straight", dataset, *extra)
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = _train(tmp_path / "resumed", dataset, *extra, fault="after_checkpoint:4")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (tmp_path / "resumed" / "checkpoint-4").is_dir()
    assert not (tmp_path / "resumed" / "checkpoint-8").exists()
    resumed = _train(tmp_path / "resumed", dataset, *extra)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr
    a = _weights(tmp_path / "straight" / "checkpoint-8")
    b = _weights(tmp_path / "resumed" / "checkpoint-8")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    raw = tmp_path / "straight/checkpoint-8/train_weights.safetensors"
    assert raw.is_file() == ema
    if ema:  # policy/ holds the average, beside the raw parameters the optimiser continues
        ra, rb = (
            load_file(raw),
            load_file(tmp_path / "resumed/checkpoint-8/train_weights.safetensors"),
        )
        assert all(torch.equal(ra[k], rb[k]) for k in ra)
        assert sum(not torch.equal(ra[k], a[k]) for k in ra) > len(ra) // 2
    # the optimizer moments too, and the metrics log has no duplicated steps
    oa = torch.load(tmp_path / "straight/checkpoint-8/optimizer.pt", weights_only=True)
    ob = torch.load(tmp_path / "resumed/checkpoint-8/optimizer.pt", weights_only=True)
    for k, st in oa["state"].items():
        assert torch.equal(st["exp_avg"], ob["state"][k]["exp_avg"])
    steps = [
        json.loads(x)["step"] for x in (tmp_path / "resumed/metrics.jsonl").read_text().splitlines()
    ]
    train_steps = [
        json.loads(x) for x in (tmp_path / "resumed/metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in train_steps if "loss" in r] == [2, 4, 6, 8], steps
    # two parameter groups with their own lr: the energy model's is logged
    assert "lr_energy" in train_steps[-1] and "energy_pos" in train_steps[-1]


def test_ema_is_the_warmed_up_moving_average_and_swaps_back():
    from vlatune.train.ema import EMA

    lin = torch.nn.Linear(2, 1, bias=False)
    frozen = torch.nn.Parameter(torch.ones(1), requires_grad=False)
    lin.register_parameter("frozen", frozen)
    values = [torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 4.0]])]
    with torch.no_grad():
        lin.weight.copy_(torch.zeros(1, 2))
    ema = EMA(lin, decay=0.5)
    assert set(ema.shadow) == {"weight"}  # frozen parameters are not averaged
    expect = torch.zeros(1, 2)
    for step, v in enumerate(values):
        with torch.no_grad():
            lin.weight.copy_(v)
        ema.update(lin, step)
        d = min(0.5, (1 + step) / (10 + step))  # 0.1, 0.18..., 0.25
        expect = d * expect + (1 - d) * v
    torch.testing.assert_close(ema.shadow["weight"], expect)
    with ema.averaged(lin):
        torch.testing.assert_close(lin.weight.detach(), expect)
    assert torch.equal(lin.weight.detach(), values[-1])
    with pytest.raises(ValueError, match="ema_decay"):
        EMA(lin, decay=1.0)


def test_checkpoint_killed_mid_write_is_never_used(tmp_path, dataset, caplog):
    run = tmp_path / "run"
    killed = _train(
        run, dataset, "train.max_steps=4", "train.save_every=2", fault="during_checkpoint:4"
    )
    assert killed.returncode == -9
    assert (run / ".checkpoint-4.tmp").is_dir() and not (run / "checkpoint-4").exists()
    # a corrupt later checkpoint is skipped with a warning
    bad = run / "checkpoint-6"
    (bad / "policy").mkdir(parents=True)
    (bad / "trainer_state.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="vlatune.train"):
        path, state = ckpt.find_latest(run)
    assert path.name == "checkpoint-2" and state["step"] == 2
    assert "ignoring checkpoint" in caplog.text and "checkpoint-6" in caplog.text
    import shutil

    shutil.rmtree(bad)
    resumed = _train(run, dataset, "train.max_steps=4", "train.save_every=2")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr and "checkpoint-2" in resumed.stderr
    assert (run / "checkpoint-4" / "trainer_state.json").is_file()
    assert not (run / ".checkpoint-4.tmp").exists()


def test_train_errors_are_clear(tmp_path):
    from tests.conftest import run_cli

    r = run_cli("train", str(CONFIG), f"train.output_dir={tmp_path}/r")
    assert r.returncode == 1 and "data.path is not set" in r.stderr
    r = run_cli(
        "train", str(CONFIG), f"data.path={tmp_path}/nope", f"train.output_dir={tmp_path}/r"
    )
    assert r.returncode == 1 and "does not exist" in r.stderr
    r = run_cli("train", str(CONFIG), "optim.lrr=1")
    assert r.returncode == 1 and "optim.lr" in r.stderr


def test_runs_plot(tmp_path, dataset):
    from tests.conftest import run_cli

    r = _train(tmp_path / "run", dataset, "train.max_steps=4", "train.val_every=2")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in row for row in rows)
    out = run_cli("runs", "plot", str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr
    for name in ("loss.png", "lr.png"):
        png = tmp_path / "run" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tmp_path, dataset):
    """Two CPU processes through accelerate: different data per rank, averaged gradients
    (identical parameters), only the main process writes. On CPU, `accelerate launch --cpu`
    starts one process unless MPI is set up; `--multi_gpu` uses torchrun underneath and the
    processes join with gloo (the Accelerator finds no GPU and runs on CPU)."""
    import shutil

    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert accelerate, "accelerate's launcher is installed with the package"
    run = tmp_path / "ddp"
    args = [
        accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "vlatune", "train", str(CONFIG),
        "--no-progress", f"data.path={dataset}", "data.format=auto", "data.image_size=64",
        "data.batch_size=4", "policy.tiny.dim=32", "policy.heads.mlp_dim=32",
        f"train.output_dir={run}", "train.max_steps=4", "train.save_every=2", "train.log_every=1",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "VLATUNE_FAULT"}
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["processes"] == 2
    a, b = summary["first_batch_per_process"]
    assert not set(a) & set(b)  # each rank its own samples
    c0, c1 = summary["param_checksum_per_process"]
    assert c0 == c1  # gradients averaged: the ranks stay identical
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert sorted(p.name for p in (run / "checkpoint-4").glob("rng_rank*.json")) == [
        "rng_rank0.json",
        "rng_rank1.json",
    ]
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in rows] == [1, 2, 3, 4]  # one writer, no duplicates


ALL_RECIPES = sorted(
    p.relative_to(ROOT / "configs")
    for p in (ROOT / "configs").rglob("*.yaml")
    if p.parent.name != "accelerate"  # accelerate's own launcher configs
)


def _family(config) -> str:
    from vlatune.config import load_config

    return load_config(ROOT / "configs" / config).policy.type


RECIPES = [c for c in ALL_RECIPES if _family(c) == "composed"]


def test_family_recipes_train_in_their_family_tests():
    """A released family's recipe (policy.type other than composed) needs that family's tiny
    checkpoint: tests/test_<family>_recipes.py trains it two steps; each one must be there."""
    missing = []
    for config in ALL_RECIPES:
        family = _family(config)
        if family == "composed":
            continue
        test_file = ROOT / "tests" / f"test_{family}_recipes.py"
        if not test_file.is_file() or config.name not in test_file.read_text():
            missing.append(f"{config} (expected in {test_file.name})")
    assert not missing, f"family recipes no test trains: {missing}"


@pytest.mark.parametrize("config", RECIPES)
def test_every_config_runs_two_steps(config, tmp_path, dataset, tiny_qwen, rdt_encoders):
    """Each recipe in configs/ loads, validates and trains 2 steps with tiny overrides."""
    from vlatune.config import load_config
    from vlatune.train.trainer import train

    tiny = [
        f"data.path={dataset}",
        "data.format=auto",
        "data.image_size=64",
        "data.batch_size=2",
        "data.num_workers=0",
        "data.annotations=null",
        f"train.output_dir={tmp_path / 'run'}",
        "train.max_steps=2",
        "train.max_minutes=null",
        "train.val_every=null",
        "train.mixed_precision=no",
        "train.gradient_checkpointing=false",
    ]
    recipe = load_config(ROOT / "configs" / config)
    if not set(recipe.data.cameras) <= {"agentview", "wrist"}:  # custom layouts
        tiny.append("data.cameras=[agentview,wrist]")
    if recipe.policy.backbone == "hf-vlm":  # the same architecture, tiny and random
        tiny += [
            f"policy.model_id={tiny_qwen}",
            "policy.dtype=float32",
            "policy.action_tokenizer_path=null",
            "policy.fast_vocab=64",
            "policy.heads.expert_dim=32",
            "policy.heads.mlp_dim=32",
            "policy.energy.hidden=32",
        ]
    if recipe.policy.backbone == "rdt":
        tiny += [
            f"policy.model_id={rdt_encoders[0]}",
            f"policy.rdt.text_model_id={rdt_encoders[1]}",
            f"policy.rdt.language_cache={tmp_path / 'lang'}",
            "policy.rdt.dim=32",
            "policy.heads.expert_dim=32",
            "policy.heads.expert_layers=1",
        ]
    cfg = load_config(ROOT / "configs" / config, tiny)
    summary = train(cfg, progress=False)
    assert summary["steps"] == 2
    assert (tmp_path / "run" / "checkpoint-2" / "policy" / "model.safetensors").is_file()


def test_sampler_batches_are_pure_functions_of_the_step():
    s = StepBatchSampler(7, 3, seed=2)
    late = s.batch(40)
    assert s.batch(0) == StepBatchSampler(7, 3, seed=2).batch(0)  # after later epochs too
    assert s.batch(40) == late


def test_accelerate_launcher_configs_load():
    """The DeepSpeed ZeRO-2 and FSDP files are accelerate's own config format."""
    from accelerate.commands.config.config_args import ClusterConfig

    ds = ClusterConfig.from_yaml_file(str(ROOT / "configs/accelerate/deepspeed_zero2.yaml"))
    assert ds.distributed_type == "DEEPSPEED" and ds.deepspeed_config["zero_stage"] == 2
    fsdp = ClusterConfig.from_yaml_file(str(ROOT / "configs/accelerate/fsdp.yaml"))
    assert fsdp.distributed_type == "FSDP"
