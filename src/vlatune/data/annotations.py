"""Per-frame annotations joined to training samples by (episode, frame).

A file written by `vlatune annotate` (or by hand):

    {"format": "vlatune-annotations/1", "annotator": "rules", "model": null,
     "prompt_sha256": null,
     "frames": [{"episode": 0, "frame": 0,
                 "reasoning": {"TASK": "...", "PLAN": "...", "MOVE": "move forward"},
                 "flow_tokens": [12, 7, ...]}, ...]}

`reasoning` (a {tag: text} mapping, ECoT tags) and `flow_tokens` (VQ codes of the frame's
optical flow) are both optional per frame; the `tokens` head turns them into targets.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlatune.data.episode import DataError

FORMAT = "vlatune-annotations/1"


def load_annotations(
    path: str | Path | list[str | Path],
) -> dict[tuple[int, int], dict[str, Any]]:
    """One file, or several merged per (episode, frame) (e.g. ECoT text + flow tokens)."""
    if isinstance(path, list | tuple):
        merged: dict[tuple[int, int], dict[str, Any]] = {}
        for p in path:
            for key, entry in load_annotations(p).items():
                merged.setdefault(key, {}).update(entry)
        return merged
    path = Path(path)
    if not path.is_file():
        raise DataError("annotation file not found (data.annotations)", file=path)
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON ({e})", file=path) from None
    if doc.get("format") != FORMAT:
        raise DataError(f"format {doc.get('format')!r}, expected {FORMAT!r}", file=path)
    out: dict[tuple[int, int], dict[str, Any]] = {}
    for i, row in enumerate(doc.get("frames", [])):
        if "episode" not in row or "frame" not in row:
            raise DataError(f"frames[{i}] lacks 'episode' or 'frame'", file=path)
        entry: dict[str, Any] = {}
        if row.get("reasoning") is not None:
            if not isinstance(row["reasoning"], dict):
                raise DataError(f"frames[{i}].reasoning must be a {{tag: text}} mapping", file=path)
            entry["reasoning"] = {str(k): str(v) for k, v in row["reasoning"].items()}
        if row.get("flow_tokens") is not None:
            entry["flow_tokens"] = [int(c) for c in row["flow_tokens"]]
        out[(int(row["episode"]), int(row["frame"]))] = entry
    return out


def write_annotations(path: str | Path, frames: list[dict[str, Any]], **meta: Any) -> Path:
    """Atomic write of an annotation file (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from vlatune.fsutil import write_text

    write_text(path, json.dumps({"format": FORMAT, **meta, "frames": frames}) + "\n")
    return path
