"""`vlatune data download`: public LIBERO sets by short name, or any dataset repo id, through
huggingface_hub (resumable: an interrupted download continues where it stopped).

Short names (suite = spatial, object, goal, 10/long; 90 for the raw files only):
- `libero_<suite>`: LeRobot-format, no-op-filtered 256 px demos
  (IPEC-COMMUNITY/libero_<suite>_no_noops_lerobot);
- `libero_<suite>_raw`: the original LIBERO HDF5 files (yifengzhu-hf/LIBERO-datasets, folder
  <suite>), 128 px, raw orientation, to regenerate or train on.

    >>> download("libero_object_raw", "datasets/libero_object")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlatune.conventions import resolve_suite
from vlatune.data.episode import DataError

RAW_REPO = "yifengzhu-hf/LIBERO-datasets"
LEROBOT_REPO = "IPEC-COMMUNITY/{suite}_no_noops_lerobot"


def resolve_name(name: str) -> dict[str, Any]:
    """Short name or repo id -> {repo_id, allow_patterns, description}."""
    if "/" in name:
        return {"repo_id": name, "allow_patterns": None, "description": f"dataset repo {name}"}
    raw = name.endswith("_raw")
    base = name[: -len("_raw")] if raw else name
    if not base.startswith("libero_"):
        raise DataError(
            f"unknown dataset name '{name}': use libero_<suite>, libero_<suite>_raw or an owner/name repo id"
        )
    suite = resolve_suite(base[len("libero_") :])
    if raw:
        return {
            "repo_id": RAW_REPO,
            "allow_patterns": [f"{suite}/*"],
            "description": f"raw LIBERO HDF5 of {suite}",
        }
    if suite == "libero_90":
        raise DataError("libero_90 has no LeRobot-format short name; use libero_90_raw")
    return {
        "repo_id": LEROBOT_REPO.format(suite=suite),
        "allow_patterns": None,
        "description": f"LeRobot-format {suite} (no no-ops)",
    }


def download(name: str, out: str | Path) -> Path:
    spec = resolve_name(name)
    from huggingface_hub import snapshot_download

    out = Path(out)
    try:
        path = snapshot_download(
            repo_id=spec["repo_id"],
            repo_type="dataset",
            local_dir=str(out),
            allow_patterns=spec["allow_patterns"],
        )
    except Exception as e:  # connection, HTTP, offline-mode and auth errors have many types
        raise DataError(
            f"could not download {spec['description']} from the Hugging Face Hub ({type(e).__name__}): "
            "check network access, HF_ENDPOINT and, for gated sets, HF_TOKEN; re-running resumes",
            file=out,
        ) from None
    return Path(path)
