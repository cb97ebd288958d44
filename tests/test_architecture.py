"""Layering: `vlatune.policies` never imports `train/`, `eval/` or `sim/` (read with `ast`).

A policy family is a model with its config, processor and checkpoint conversion; the trainer,
the evaluator and the simulator use it, never the other way round (../shared/POLICY_FAMILIES.md).
Imports inside functions count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "vlatune"
FORBIDDEN = ("vlatune.train", "vlatune.eval", "vlatune.sim")


def imported_modules(path: Path, text: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `path` (or in `text`, as if it were
    that file's), relative ones resolved."""
    package = ".".join(path.relative_to(SRC.parent).with_suffix("").parts[:-1])
    if path.name == "__init__.py":
        package = ".".join(path.relative_to(SRC.parent).parts[:-1])
    out = []
    for node in ast.walk(
        ast.parse(text if text is not None else path.read_text(), filename=str(path))
    ):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((node.lineno, name))
            out += [(node.lineno, f"{name}.{alias.name}") for alias in node.names]
    return out


def forbidden_imports(root: Path) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        for line, name in imported_modules(path):
            if name in FORBIDDEN or name.startswith(tuple(f + "." for f in FORBIDDEN)):
                bad.append(f"{path.relative_to(SRC.parent)}:{line} imports {name}")
    return bad


def test_policies_do_not_import_train_eval_or_sim():
    assert forbidden_imports(SRC / "policies") == []


def test_the_walker_finds_imports():
    """The check can fail: absolute, relative and function-level imports are all seen."""
    at = SRC / "policies" / "composed" / "x.py"
    text = (
        "import vlatune.eval.runner\n"
        "def f():\n    from vlatune.train import trainer\n"
        "from ...sim import env\n"
        "from vlatune.simulation import y\n"
    )
    names = [n for _, n in imported_modules(at, text)]
    assert {"vlatune.eval.runner", "vlatune.train.trainer", "vlatune.sim.env"} <= set(names)
    bad = [n for n in names if n in FORBIDDEN or n.startswith(tuple(f + "." for f in FORBIDDEN))]
    assert "vlatune.simulation" not in bad and "vlatune.simulation.y" not in bad
    assert "vlatune.sim.env" in bad
