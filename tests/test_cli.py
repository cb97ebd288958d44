"""The `vlatune` command: help, version, config show, and clear failures without a simulator."""

from __future__ import annotations

import importlib.util
import json

import yaml
from click.testing import CliRunner

from tests.conftest import run_cli
from vlatune.cli import cli
from vlatune.versions import PACKAGES


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_top_level_help_lists_groups():
    r = invoke("--help")
    assert r.exit_code == 0
    for group in ("version", "config", "sim"):
        assert group in r.output


def test_group_help():
    for group in ("config", "sim"):
        r = invoke(group, "--help")
        assert r.exit_code == 0 and "Usage: cli " + group in r.output.replace("vlatune", "cli")
    r = invoke("sim", "check", "--help")
    for opt in ("--suite", "--task", "--resolution", "--out"):
        assert opt in r.output


def test_console_script_entry_point_runs():
    r = run_cli("--help", timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Usage: vlatune" in r.stdout


def test_version_block_lists_every_package():
    r = invoke("version")
    assert r.exit_code == 0
    names = [line.split()[0] for line in r.output.strip().splitlines()]
    assert names == ["vlatune", "python", *PACKAGES]
    data = json.loads(invoke("version", "--json").output)
    assert data["vlatune"] == "0.1.0"
    import torch

    assert data["torch"] == torch.__version__


def test_config_show_resolves(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 0.1\n")
    r = invoke("config", "show", str(p), "optim.lr=0.5", "data.batch_size=7")
    assert r.exit_code == 0
    shown = yaml.safe_load(r.output)
    assert shown["optim"]["lr"] == 0.5 and shown["data"]["batch_size"] == 7
    assert shown["eval"]["suite"] == "libero_object"  # defaults are printed too


def test_config_show_bad_key_is_one_clear_error(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  camras: [agentview]\n")
    r = CliRunner().invoke(cli, ["config", "show", str(p)])
    assert r.exit_code == 1
    assert "unknown key 'data.camras'" in r.output and "Did you mean 'data.cameras'?" in r.output
    assert "Traceback" not in r.output


def test_sim_check_without_libero_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "libero" else real(name, *a)
    )
    r = CliRunner().invoke(cli, ["sim", "check"])
    assert r.exit_code == 1
    assert "LIBERO (hf-libero) is not installed" in r.output and "make setup" in r.output


def test_sim_check_with_broken_gl_says_what_to_install(monkeypatch, tmp_path):
    import ctypes

    monkeypatch.setenv("VLATUNE_HOME", str(tmp_path))
    monkeypatch.setenv("MUJOCO_GL", "egl")

    def no_lib(name, *a, **k):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_lib)
    r = CliRunner().invoke(cli, ["sim", "check"])
    assert r.exit_code == 1
    assert (
        "needs libEGL.so.1, which is missing" in r.output and "apt-get install libegl1" in r.output
    )
