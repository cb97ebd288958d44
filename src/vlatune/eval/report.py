"""A self-contained report of one demo / experiment: `report.html` and `report.md`.

Sections: dataset summary, training (loss curve PNG, steps, time), evaluation (success rate with
its 95% Wilson interval, per-trial table) and the rollout videos, embedded with <video> tags
whose paths are relative to the report (open the folder in a browser; nothing is fetched from
the network).

    >>> write_report(Path("outputs/demo"), dataset=..., training=..., eval_dir=Path("outputs/demo/eval"))
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

from vlatune.eval.runner import read_episodes


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _rel(path: Path, root: Path) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


def write_report(
    out: Path,
    dataset: dict[str, Any],
    training: dict[str, Any],
    eval_dir: Path,
    loss_png: Path | None,
    title: str = "vlatune demo",
) -> tuple[Path, Path]:
    out = Path(out)
    results = json.loads((eval_dir / "results.json").read_text())
    overall = results["overall"]
    episodes = read_episodes(eval_dir / "episodes.jsonl")
    rate = _pct(overall["success_rate"])
    ci = f"[{_pct(overall['ci95_low'])}, {_pct(overall['ci95_high'])}]"
    headline = (
        f"Success rate {rate} ({overall['successes']}/{overall['trials']} trials), 95% CI {ci}"
    )
    rows = []
    md_rows = []
    for e in sorted(episodes, key=lambda e: (e["task_id"], e["trial"])):
        outcome = "error" if e.get("error") else ("success" if e["success"] else "failure")
        video = e.get("video")
        link = f'<a href="{html.escape(_rel(eval_dir / video, out))}">video</a>' if video else ""
        rows.append(
            f"<tr><td>{e['trial']}</td><td>{e['init_index']}</td><td class='{outcome}'>"
            f"{outcome}</td><td>{e.get('steps') or '-'}</td><td>{link}</td></tr>"
        )
        md_rows.append(
            f"| {e['trial']} | {e['init_index']} | {outcome} | {e.get('steps') or '-'} | "
            f"{_rel(eval_dir / video, out) if video else ''} |"
        )
    videos = [e for e in episodes if e.get("video")]
    # successes first, then failures: at most 6 players
    videos.sort(key=lambda e: (not e["success"], e["trial"]))
    players = "\n".join(
        f"<figure><video src='{html.escape(_rel(eval_dir / e['video'], out))}' controls muted "
        f"autoplay loop playsinline width='256'></video><figcaption>trial {e['trial']} (init "
        f"{e['init_index']}): {'success' if e['success'] else 'failure'}</figcaption></figure>"
        for e in videos[:6]
    )
    ds_items = "".join(
        f"<li><b>{html.escape(str(k))}</b>: {html.escape(str(v))}</li>" for k, v in dataset.items()
    )
    tr_items = "".join(
        f"<li><b>{html.escape(str(k))}</b>: {html.escape(str(v))}</li>" for k, v in training.items()
    )
    loss_img = (
        f"<img src='{html.escape(_rel(loss_png, out))}' alt='training loss' width='640'>"
        if loss_png
        else ""
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; max-width: 1000px; margin: 2em auto; }}
td, th {{ padding: 2px 10px; border-bottom: 1px solid #ddd; }}
.success {{ color: #0a0; }} .failure {{ color: #b00; }} .error {{ color: #a60; }}
figure {{ display: inline-block; margin: 4px; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p id="success-rate"><b>{html.escape(headline)}</b></p>
<h2>Dataset</h2><ul>{ds_items}</ul>
<h2>Training</h2><ul>{tr_items}</ul>{loss_img}
<h2>Evaluation</h2>
<p>{html.escape(headline)}. Init states used for evaluation were never seen in training.</p>
<div id="videos">{players}</div>
<table><tr><th>trial</th><th>init state</th><th>outcome</th><th>steps</th><th>video</th></tr>
{"".join(rows)}</table>
</body></html>
"""
    md = "\n".join(
        [
            f"# {title}",
            "",
            f"**{headline}**",
            "",
            "## Dataset",
            *[f"- {k}: {v}" for k, v in dataset.items()],
            "",
            "## Training",
            *[f"- {k}: {v}" for k, v in training.items()],
            *([f"\n![loss]({_rel(loss_png, out)})"] if loss_png else []),
            "",
            "## Evaluation",
            "",
            "| trial | init state | outcome | steps | video |",
            "|---|---|---|---|---|",
            *md_rows,
            "",
        ]
    )
    html_path, md_path = out / "report.html", out / "report.md"
    for path, text in ((html_path, page), (md_path, md)):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return html_path, md_path
