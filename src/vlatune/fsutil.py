"""Atomic writes, stale temporaries and OS errors told in one sentence.

Outputs appear complete under their final name, or not at all: they are written under a
temporary name `.vlatune-tmp.<name>.<host>.<pid>` next to the destination and renamed at the end
(removed on failure). A process killed mid-write leaves such a temporary behind;
`clean_stale_temporaries` removes, at the next start, only those that are provably ours and
stale: the vlatune prefix, this host, and a process id that no longer runs.

>>> with atomic_dir(Path("ckpt/checkpoint-100")) as tmp:
...     save_everything(tmp)          # renamed to checkpoint-100 only if this returns
>>> os_error_sentence(OSError(errno.ENOSPC, "No space left on device", "out/x.hdf5"))
'no space left on tmpfs (/out) while writing out/x.hdf5: free 0 MB'
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("vlatune")
TMP_PREFIX = ".vlatune-tmp."
_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"
_TMP_NAME = re.compile(
    r"^\.vlatune-tmp\.(?P<name>.+)\.(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)(?P<ext>\.\w+)?$"
)


def tmp_path(dest: str | Path) -> Path:
    """The temporary name of `dest` for this process (same folder, so the rename is atomic)."""
    dest = Path(dest)
    return dest.parent / f"{TMP_PREFIX}{dest.name}.{_HOST}.{os.getpid()}"


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def is_stale_temporary(path: Path) -> bool:
    """True for a vlatune temporary of this host whose process is gone."""
    m = _TMP_NAME.match(path.name)
    return bool(m) and m["host"] == _HOST and not pid_alive(int(m["pid"]))


def clean_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the stale vlatune temporaries directly inside `folder`; returns (and logs) them."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for p in folder.glob(f"{TMP_PREFIX}*"):
        if is_stale_temporary(p):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()
            if not p.exists():
                removed.append(p)
    if removed:
        log.warning(
            "removed %d temporary file(s) left by killed vlatune runs: %s",
            len(removed),
            ", ".join(str(p) for p in removed),
        )
    return removed


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


@contextlib.contextmanager
def atomic_dir(dest: str | Path, overwrite: bool = True) -> Iterator[Path]:
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(dest.parent)
    tmp = tmp_path(dest)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if dest.exists():
            if not overwrite:
                raise FileExistsError(f"{dest} exists")
            old = dest.parent / f"{TMP_PREFIX}{dest.name}-old.{_HOST}.{os.getpid()}"
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except OSError as e:
        raise with_final_name(e, tmp, dest) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(dest: str | Path, keep_suffix: bool = False) -> Iterator[Path]:
    """A temporary path to write `dest` to, renamed to `dest` when the block ends without
    error and removed otherwise. `keep_suffix` ends the temporary name with `dest`'s suffix,
    for writers that choose the format by it (matplotlib, FFmpeg)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(dest)
    if keep_suffix and dest.suffix:
        tmp = tmp.with_name(tmp.name + dest.suffix)
    try:
        yield tmp
        os.replace(tmp, dest)
    except OSError as e:
        remove_path(tmp)
        raise with_final_name(e, tmp, dest) from None
    except BaseException:
        remove_path(tmp)
        raise


def write_text(path: str | Path, text: str) -> None:
    """Text written to a temporary name and renamed (the temporary is removed on failure)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | Path, obj: Any) -> None:
    """JSON written to a temporary name and renamed (the temporary is removed on failure)."""
    path = Path(path)
    tmp = tmp_path(path)
    try:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        remove_path(tmp)
        raise with_final_name(e, tmp, path) from None


def with_final_name(e: OSError, tmp: Path, dest: Path) -> OSError:
    """`e` with its file named as the user knows it (the destination, not our temporary)."""
    name = e.filename
    if name is None:
        name = str(tmp)
    name = str(name).replace(str(tmp), str(dest))
    out = type(e)(e.errno, e.strerror or str(e), name) if e.errno else OSError(str(e))
    if not e.errno:
        out.filename = name
    return out


def disk_full_error(e: BaseException, path: str | Path) -> OSError | None:
    """An ENOSPC OSError naming `path` when `e` (possibly not an OSError: torch and
    safetensors report a full disk as RuntimeError) was caused by a full disk: errno 28, the
    message says so, or less than 1 MB is free where `path` lives. Call it before cleaning up."""
    text = str(e)
    full = (
        getattr(e, "errno", None) == errno.ENOSPC
        or "No space left" in text
        or "os error 28" in text
    )
    if not full:
        free = free_mb(path)
        full = free is not None and free < 1.0
    if not full:
        return None
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _mount_point(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def _device_name(mount: Path) -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[1] == str(mount):
                return f"{parts[0]} ({mount})"
    return str(mount)


def free_mb(path: str | Path) -> float | None:
    try:
        return shutil.disk_usage(_mount_point(Path(path))).free / 2**20
    except OSError:
        return None


def os_error_sentence(e: OSError, fallback_file: str | Path | None = None) -> str:
    """One sentence for an OS error: what happened, to which file, and what is left."""
    file = e.filename if e.filename is not None else fallback_file
    text = str(e)
    full = e.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in text
    if full:
        where = Path(file) if file is not None else Path.cwd()
        mount = _mount_point(where)
        free = free_mb(mount)
        kind = "disk quota exceeded" if e.errno == errno.EDQUOT else "no space left"
        left = ""
        if free is not None:
            left = f": free {free:.1f} MB" if free < 10 else f": free {free:.0f} MB"
        target = file if file is not None else "(file not reported)"
        return (
            f"{kind} on {_device_name(mount)} while writing {target}{left}; "
            "free some space and run the command again"
        )
    what = e.strerror or text
    if file is not None:
        return f"{what}: {file}"
    return what
