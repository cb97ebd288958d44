"""Reference harness: vlatune against fixtures the reference implementations produced.

Every folder under `$VLATUNE_REFERENCE_DIR` (default `<repo>/../shared/reference`; in CI a
copy of `shared/` sits beside the clone) is one test, `test_reference[<folder name>]`. The
folder's family is detected from its files (`detect_family`), never from its name: the FAST
tokenizer by `tokenizer/processor_config.json`; released checkpoints by `config.json`
(`type` pi0 / pi05 as LeRobot writes it, `model_type` gr00t_n1_5 or openvla, with OFT's
`action_head--*_checkpoint.pt` beside it for openvla_oft) and RDT by its init-kwargs
`config.json` (`rdt`, `pred_horizon`, ...) next to `pytorch_model.bin`. Then:
- a family in `CHECKERS` runs its checker, which loads the folder through vlatune's real
  loading code and compares with the recorded outputs at the tolerance of the fixtures' README;
  a load failure is a test failure;
- a family in `PENDING` is skipped, naming the issue that implements it;
- a folder no rule recognises fails, listing its files.
Every size (horizon, action dim, vocabulary, widths, ...) comes from the fixture's own files,
never from constants here: a second fixture set with other sizes runs against the same code.

Adding a family (e.g. when issue 22 lands pi0): write `check_pi0(folder: Path) -> None` that
loads `folder` through `vlatune.policies.load` (strict: no missing / unexpected keys), feeds
`inputs.safetensors` and asserts against `expected.safetensors`; add it to `CHECKERS` and
remove the family from `PENDING`. If the detection rule needs a new file signature, extend
`detect_family` (and its test below).

    $ VLATUNE_REFERENCE_DIR=/path/to/shared/reference .venv/bin/python -m pytest tests/test_reference.py
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(
    os.environ.get("VLATUNE_REFERENCE_DIR") or REPO.parent / "shared" / "reference"
).expanduser()

# family -> the issue that implements it (skipped until then)
PENDING: dict[str, int] = {}


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AssertionError(f"{path}: cannot read it as JSON ({e})") from None
    if not isinstance(data, dict):
        raise AssertionError(f"{path}: expected a JSON object")
    return data


def detect_family(folder: Path) -> str | None:
    """The family of a fixture folder, from its files; None if no rule matches."""
    proc = folder / "tokenizer" / "processor_config.json"
    if proc.is_file():
        cfg = _json(proc)
        if cfg.get("processor_class") == "UniversalActionProcessor" or {
            "scale",
            "min_token",
        } <= set(cfg):
            return "fast"
    config = folder / "config.json"
    if not config.is_file():
        return None
    cfg = _json(config)
    if cfg.get("type") in ("pi0", "pi05"):  # LeRobot's PreTrainedConfig choice name
        return cfg["type"]
    if cfg.get("model_type") == "gr00t_n1_5":
        return "groot_n15"
    if cfg.get("model_type") == "openvla":
        oft = any(folder.glob("action_head--*checkpoint.pt"))
        return "openvla_oft" if oft else "openvla"
    rdt_keys = {"rdt", "pred_horizon", "img_adaptor", "lang_adaptor", "state_adaptor"}
    if rdt_keys <= set(cfg) and (folder / "pytorch_model.bin").is_file():
        return "rdt"
    return None


# ---------------------------------------------------------------------- FAST
def check_fast(folder: Path) -> None:
    """FAST / FAST+ (`vlatune.policies.tokenizers.FastTokenizer`): the tokenizer folder loads
    through `from_pretrained`; held-out ids equal exactly; decoded chunks and the invalid
    sequences' results equal to 1e-12 (float64), with the reference's error verdict; `fit` on
    the fixture's training chunks reproduces the reference's vocabulary and merges."""
    from safetensors.numpy import load_file

    from vlatune.policies.tokenizers import FastTokenizer

    tok_dir = folder / "tokenizer"
    proc = _json(tok_dir / "processor_config.json")
    tok = FastTokenizer.from_pretrained(tok_dir)
    assert (tok.scale, tok.min_token, tok.vocab_size) == (
        proc["scale"],
        proc["min_token"],
        proc["vocab_size"],
    )
    assert (tok.time_horizon, tok.action_dim) == (proc.get("time_horizon"), proc.get("action_dim"))
    expected = _json(folder / "expected.json")
    assert expected["min_token"] == tok.min_token
    chunks = load_file(str(folder / "chunks.safetensors"))
    held_out = chunks["held_out_chunks"]
    # the sizes: the processor's, else (a folder fitted without them) the chunks' own
    H = proc.get("time_horizon") or held_out.shape[1]
    D = proc.get("action_dim") or held_out.shape[2]
    assert held_out.shape[1:] == (H, D), f"held_out_chunks {held_out.shape} vs ({H}, {D})"
    ref_ids = expected["held_out_ids"]
    assert len(ref_ids) == len(held_out)

    # encode: ids exactly
    ids = [tok.encode(c) for c in held_out]
    wrong = [i for i, (a, b) in enumerate(zip(ids, ref_ids, strict=True)) if a != b]
    assert not wrong, f"ids differ from the reference for held-out chunks {wrong}"

    # decode the reference's ids: float64, 1e-12
    tensors = load_file(str(folder / "expected.safetensors"))
    decoded = np.stack([tok.decode(i, H, D).actions for i in ref_ids])
    ref_decoded = tensors["decoded_chunks"]
    assert decoded.shape == ref_decoded.shape
    np.testing.assert_allclose(decoded, ref_decoded, rtol=0, atol=1e-12)

    # invalid sequences: same result, same verdict; vlatune never calls them ok
    for name, rec in expected["invalid"].items():
        res = tok.decode(rec["ids"], H, D)
        np.testing.assert_allclose(
            res.actions, tensors[f"invalid.{name}.decoded"], rtol=0, atol=1e-12, err_msg=name
        )
        assert res.reference_ok == (not rec["reference_logged_error"]), name
        assert (not res.actions.any()) == rec["decoded_is_all_zero"], name
        assert not res.ok and res.error, f"{name}: an invalid sequence must not be ok"

    # fit: the reference's recipe gives the reference's tokenizer
    if "train_chunks" in chunks:
        fitted = FastTokenizer.fit(
            list(chunks["train_chunks"]),
            scale=proc["scale"],
            vocab_size=proc["vocab_size"],
            time_horizon=H,
            action_dim=D,
        )
        assert fitted.min_token == tok.min_token
        ours = json.loads(fitted.bpe.to_str())["model"]
        ref = _json(tok_dir / "tokenizer.json")["model"]
        assert ours["vocab"] == ref["vocab"], "fit: vocabulary differs from the reference's"
        assert ours["merges"] == ref["merges"], "fit: merges differ from the reference's"


def _family_checker(module: str) -> Callable[[Path], None]:
    """A family's own `check_reference(folder)` (in `vlatune.policies.<family>.reference`),
    imported when its fixture runs."""

    def check(folder: Path) -> None:
        import importlib

        importlib.import_module(module).check_reference(folder)

    return check


CHECKERS: dict[str, Callable[[Path], None]] = {
    "fast": check_fast,
    "rdt": _family_checker("vlatune.policies.rdt.reference"),
    "pi0": _family_checker("vlatune.policies.pi0.reference"),
    "pi05": _family_checker("vlatune.policies.pi0.reference"),
    "openvla": _family_checker("vlatune.policies.openvla.reference"),
    "openvla_oft": _family_checker("vlatune.policies.openvla.reference"),
    "groot_n15": _family_checker("vlatune.policies.groot.reference"),
}


# ---------------------------------------------------------------------- the harness
def _folders() -> list[Path]:
    if not REFERENCE_DIR.is_dir():
        return []
    return sorted(
        p for p in REFERENCE_DIR.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))
    )


FOLDERS = _folders()


@pytest.mark.parametrize(
    "folder", FOLDERS or [None], ids=[p.name for p in FOLDERS] or ["no-reference-dir"]
)
def test_reference(folder: Path | None) -> None:
    if folder is None:
        pytest.skip(
            f"no reference fixtures at {REFERENCE_DIR}: set VLATUNE_REFERENCE_DIR to a copy "
            "of shared/reference"
        )
    family = detect_family(folder)
    if family is None:
        files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        pytest.fail(
            f"{folder}: no family recognised from its files {files}; extend detect_family "
            "in tests/test_reference.py"
        )
    if family in CHECKERS:
        CHECKERS[family](folder)
    elif family in PENDING:
        pytest.skip(f"family {family} not implemented yet (issue {PENDING[family]})")
    else:
        pytest.fail(f"{folder}: family {family} has neither a checker nor a pending issue")


# ---------------------------------------------------------------------- the harness itself
def test_detect_family_reads_files_not_names(tmp_path):
    def folder(name: str, files: dict[str, object]) -> Path:
        d = tmp_path / name
        for rel, content in files.items():
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            (d / rel).write_text(content if isinstance(content, str) else json.dumps(content))
        return d

    proc = {"processor_class": "UniversalActionProcessor", "scale": 10, "min_token": -3}
    assert detect_family(folder("pi0", {"tokenizer/processor_config.json": proc})) == "fast"
    assert detect_family(folder("a", {"config.json": {"type": "pi05"}})) == "pi05"
    assert detect_family(folder("b", {"config.json": {"type": "pi0"}})) == "pi0"
    assert detect_family(folder("c", {"config.json": {"model_type": "gr00t_n1_5"}})) == "groot_n15"
    vla = {"config.json": {"model_type": "openvla"}}
    assert detect_family(folder("d", vla)) == "openvla"
    oft = {**vla, "action_head--0_checkpoint.pt": ""}
    assert detect_family(folder("e", oft)) == "openvla_oft"
    rdt = {k: 1 for k in ("rdt", "pred_horizon", "img_adaptor", "lang_adaptor", "state_adaptor")}
    assert detect_family(folder("f", {"config.json": rdt, "pytorch_model.bin": ""})) == "rdt"
    assert detect_family(folder("fast", {"config.json": {"model_type": "bert"}})) is None
    assert detect_family(folder("fast2", {"README.md": "x"})) is None


def _fast_fixture(root: Path, H: int, D: int, vocab: int, seed: int) -> Path:
    """A FAST fixture in the reference's layout, with other sizes (written by vlatune: it
    checks the harness reads every size from the files, not the reference's numbers)."""
    from safetensors.numpy import save_file

    from vlatune.policies.tokenizers import FastTokenizer

    rng = np.random.default_rng(seed)
    walk = lambda n, s, c: np.clip(np.cumsum(rng.normal(0, s, (n, H, D)), axis=1), -c, c)  # noqa: E731
    train, held = walk(300, 0.3, 1.0), np.concatenate([walk(20, 0.3, 1.0), walk(3, 1.2, 3.0)])
    tok = FastTokenizer.fit(list(train), scale=10, vocab_size=vocab)
    tok.save(root / "tokenizer")
    ids = [tok.encode(c) for c in held]
    v = ids[0]
    invalid = {"truncated": v[:-2], "empty": [], "out_of_vocab_id": v[:1] + [10**6] + v[1:]}
    tensors = {"decoded_chunks": np.stack([tok.decode(i).actions for i in ids])}
    record = {}
    for name, seq in invalid.items():
        res = tok.decode(seq)
        tensors[f"invalid.{name}.decoded"] = res.actions
        record[name] = {
            "ids": seq,
            "reference_logged_error": not res.reference_ok,
            "decoded_is_all_zero": not res.actions.any(),
        }
    save_file({"train_chunks": train, "held_out_chunks": held}, str(root / "chunks.safetensors"))
    save_file(tensors, str(root / "expected.safetensors"))
    expected = {"min_token": tok.min_token, "held_out_ids": ids, "invalid": record}
    (root / "expected.json").write_text(json.dumps(expected))
    return root


def test_fast_checker_takes_its_sizes_from_the_fixture(tmp_path):
    folder = _fast_fixture(tmp_path / "variant_b", H=5, D=3, vocab=300, seed=1)
    assert detect_family(folder) == "fast"
    check_fast(folder)


def test_fast_checker_fails_on_a_wrong_id(tmp_path):
    folder = _fast_fixture(tmp_path / "variant_c", H=4, D=2, vocab=200, seed=2)
    expected = json.loads((folder / "expected.json").read_text())
    expected["held_out_ids"][3] = expected["held_out_ids"][3] + [0]
    (folder / "expected.json").write_text(json.dumps(expected))
    with pytest.raises(AssertionError, match=r"held-out chunks \[3\]"):
        check_fast(folder)


def test_shared_comparison_helpers_fail_on_a_difference_past_the_tolerance(tmp_path):
    import torch

    from vlatune.policies.reference_check import assert_close, read_keys_txt

    want = torch.zeros(2, 3)
    assert_close("x", want + 5e-5, want)  # within atol = rtol = 1e-4
    got = want.clone()
    got[1, 2] = 2e-4
    with pytest.raises(AssertionError, match=r"x: max abs diff 2.000e-04 .*\(at index \(1, 2\)\)"):
        assert_close("x", got, want)
    with pytest.raises(AssertionError, match=r"x: shape \(3,\) != expected \(2, 3\)"):
        assert_close("x", torch.zeros(3), want)
    keys = tmp_path / "keys.txt"
    keys.write_text("# key\tshape\tdtype\na.weight\t(4, 2)\tfloat32\nb\t()\tfloat32\n")
    assert read_keys_txt(keys) == {"a.weight": (4, 2), "b": ()}
