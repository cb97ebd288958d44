"""The versions block written into every checkpoint and evaluation result.

LIBERO success rates move with the MuJoCo version (98.1% vs about 91% reported for one policy),
so every number vlatune prints carries the versions it was made with.

    >>> from vlatune.versions import version_block
    >>> sorted(version_block())[:2]
    ['accelerate', 'libero']
"""

from __future__ import annotations

import platform
from importlib import metadata

import vlatune

# distribution names, in print order; the key is how the block names them
PACKAGES = {
    "torch": "torch",
    "transformers": "transformers",
    "peft": "peft",
    "accelerate": "accelerate",
    "mujoco": "mujoco",
    "robosuite": "robosuite",
    "libero": "hf-libero",
}


def _dist_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def version_block() -> dict[str, str | None]:
    """vlatune, Python and library versions; None for a package that is not installed.

    Read from package metadata, so nothing heavy is imported.
    """
    block: dict[str, str | None] = {
        "vlatune": vlatune.__version__,
        "python": platform.python_version(),
    }
    for key, dist in PACKAGES.items():
        block[key] = _dist_version(dist)
    return block


def format_version_block(block: dict[str, str | None] | None = None) -> str:
    block = version_block() if block is None else block
    width = max(len(k) for k in block)
    return "\n".join(
        f"{k:<{width}}  {v if v is not None else 'not installed'}" for k, v in block.items()
    )
