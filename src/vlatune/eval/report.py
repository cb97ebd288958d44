"""A self-contained report of one demo / experiment: `report.html` and `report.md`.

Sections: an optional `note` as the very first line (the demo: "trained 186 of 2,000 steps: not
the recipe's result; rerun to continue"), dataset summary, training (loss curve PNG, steps,
time), evaluation (success rate over all trials with its 95% Wilson interval, errors counted as
failures and the rate over finished episodes next to it, trials / successes / failures /
errors, fallbacks "k of n queries", per-trial table with the exception of a failed episode) and
the rollout videos, embedded with <video> tags
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

from vlatune.eval.results import fallback_text, headline, outcome
from vlatune.eval.runner import latest_episodes, read_episodes
from vlatune.fsutil import write_text


def _rel(path: Path, root: Path) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


def write_report(
    out: Path,
    dataset: dict[str, Any],
    training: dict[str, Any],
    eval_dir: Path,
    loss_png: Path | None,
    title: str = "vlatune demo",
    note: str | None = None,
    lr_png: Path | None = None,
) -> tuple[Path, Path]:
    out = Path(out)
    settings_items, settings_md = _eval_settings(out, eval_dir)
    results = json.loads((eval_dir / "results.json").read_text())
    overall = results["overall"]
    episodes = latest_episodes(read_episodes(eval_dir / "episodes.jsonl"))
    head = f"Success rate {headline(overall)}"
    counts = (
        f"{overall['trials']} trials: {overall['successes']} successes, "
        f"{overall['failures']} failures, {overall['errors']} errors (counted as failures); "
        f"{fallback_text(overall)}"
    )
    rows = []
    md_rows = []
    for e in sorted(episodes, key=lambda e: (e["task_id"], e["trial"])):
        what = outcome(e)
        exc = e.get("exception") or {}
        why = e.get("error") or (f"{exc['stage']}: {exc['message']}" if exc else "")
        video = e.get("video")
        link = f'<a href="{html.escape(_rel(eval_dir / video, out))}">video</a>' if video else ""
        fb = sum((e.get("fallbacks") or {}).values())
        rows.append(
            f"<tr><td>{e['trial']}</td><td>{e['init_index']}</td><td class='{what}'>"
            f"{what}</td><td>{e.get('steps') or '-'}</td><td>{fb} of {e.get('queries') or 0}"
            f"</td><td>{html.escape(why)}</td><td>{link}</td></tr>"
        )
        md_rows.append(
            f"| {e['trial']} | {e['init_index']} | {what} | {e.get('steps') or '-'} | "
            f"{fb} of {e.get('queries') or 0} | {why.replace('|', '/')} | "
            f"{_rel(eval_dir / video, out) if video else ''} |"
        )
    videos = pick_videos(episodes)
    players = "\n".join(
        f"<figure><video src='{html.escape(_rel(eval_dir / e['video'], out))}' controls muted "
        f"autoplay loop playsinline width='256'></video><figcaption>trial {e['trial']} (init "
        f"{e['init_index']}): {outcome(e)}</figcaption></figure>"
        for e in videos
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
    if lr_png:
        loss_img += f"<img src='{html.escape(_rel(lr_png, out))}' alt='learning rate' width='640'>"
    note_html = f"<p id='note' class='note'><b>{html.escape(note)}</b></p>\n" if note else ""
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; max-width: 1000px; margin: 2em auto; }}
td, th {{ padding: 2px 10px; border-bottom: 1px solid #ddd; }}
.success {{ color: #0a0; }} .failure {{ color: #b00; }} .error {{ color: #a60; }}
figure {{ display: inline-block; margin: 4px; }}
.note {{ background: #fff3cd; border: 1px solid #e0b000; padding: 6px 10px; }}
</style></head><body>
{note_html}<h1>{html.escape(title)}</h1>
<p id="success-rate"><b>{html.escape(head)}</b></p>
<p id="counts">{html.escape(counts)}</p>
<h2>Dataset</h2><ul>{ds_items}</ul>
<h2>Training</h2><ul>{tr_items}</ul>{loss_img}
<h2>Evaluation</h2>
<p>{html.escape(head)}. Init states used for evaluation were never seen in training.</p>
<ul id="eval-settings">{settings_items}</ul>
<div id="videos">{players}</div>
<table><tr><th>trial</th><th>init state</th><th>outcome</th><th>steps</th><th>fallbacks</th>
<th>exception / error</th><th>video</th></tr>
{"".join(rows)}</table>
</body></html>
"""
    md = "\n".join(
        [
            *([f"**{note}**", ""] if note else []),
            f"# {title}",
            "",
            f"**{head}**",
            "",
            counts,
            "",
            "## Dataset",
            *[f"- {k}: {v}" for k, v in dataset.items()],
            "",
            "## Training",
            *[f"- {k}: {v}" for k, v in training.items()],
            *([f"\n![loss]({_rel(loss_png, out)})"] if loss_png else []),
            *([f"\n![learning rate]({_rel(lr_png, out)})"] if lr_png else []),
            "",
            "## Evaluation",
            "",
            *settings_md,
            "",
            "| trial | init state | outcome | steps | fallbacks | exception / error | video |",
            "|---|---|---|---|---|---|---|",
            *md_rows,
            "",
        ]
    )
    html_path, md_path = out / "report.html", out / "report.md"
    for path, text in ((html_path, page), (md_path, md)):
        write_text(path, text)
    return html_path, md_path


def pick_videos(episodes: list[dict[str, Any]], limit: int = 6) -> list[dict[str, Any]]:
    """Filmed episodes to show: successes and failures alternating (so both appear whenever
    both were filmed), by trial, at most `limit`."""
    filmed = sorted((e for e in episodes if e.get("video")), key=lambda e: e["trial"])
    wins = [e for e in filmed if e.get("success")]
    losses = [e for e in filmed if not e.get("success")]
    picked: list[dict[str, Any]] = []
    while len(picked) < limit and (wins or losses):
        for group in (wins, losses):
            if group and len(picked) < limit:
                picked.append(group.pop(0))
    return picked


def stage_times(timings: dict[str, float], reused: set[str] | frozenset[str] = frozenset()) -> str:
    """`{"demonstrations_s": 0.0, "train_s": 560.2}` -> "demonstrations reused, train 9.3 min":
    a stage skipped because its output was already there says "reused", not 0.0 s."""
    parts = []
    for key, seconds in timings.items():
        stage = key.removesuffix("_s")
        if stage in reused:
            parts.append(f"{stage} reused (already in the output folder)")
        elif seconds >= 60:
            parts.append(f"{stage} {seconds / 60:.1f} min")
        else:
            parts.append(f"{stage} {seconds:.1f} s")
    return ", ".join(parts)


def _eval_settings(out: Path, eval_dir: Path) -> tuple[str, list[str]]:
    """Evaluation settings and versions from run.json, links to the result files, and which
    evaluation folder is current when earlier ones sit beside it (HTML items, Markdown lines)."""
    facts: list[tuple[str, str, str | None]] = []  # (label, text, link)
    run_file = eval_dir / "run.json"
    if run_file.is_file():
        run = json.loads(run_file.read_text())
        st = {
            **(run.get("settings") or {}),
            **{k: v for k, v in run.items() if k in ("replan", "resolution", "max_steps")},
        }
        keys = (
            "suite",
            "tasks",
            "trials",
            "first_init",
            "seed",
            "replan",
            "resolution",
            "max_steps",
            "video",
        )
        shown = ", ".join(f"{k} {st[k]}" for k in keys if st.get(k) is not None)
        facts.append(("settings", shown, None))
        ver = run.get("versions") or {}
        names = ("vlatune", "python", "torch", "mujoco", "robosuite", "libero")
        facts.append(("versions", ", ".join(f"{k} {ver[k]}" for k in names if ver.get(k)), None))
    for name in ("results.json", "run.json", "episodes.jsonl"):
        if (eval_dir / name).is_file():
            facts.append(("file", name, _rel(eval_dir / name, out)))
    others = (
        sorted(
            p.name
            for p in eval_dir.parent.iterdir()
            if p.is_dir() and p != eval_dir and (p / "episodes.jsonl").is_file()
        )
        if eval_dir.parent.is_dir()
        else []
    )
    current = f"{_rel(eval_dir, out)} (this report)"
    if others:
        current += (
            f"; also in {_rel(eval_dir.parent, out)}/, from earlier runs: {', '.join(others)}"
        )
    facts.append(("evaluation folder", current, None))
    items = "".join(
        f"<li><b>{html.escape(label)}</b>: "
        + (f"<a href='{html.escape(link)}'>{html.escape(text)}</a>" if link else html.escape(text))
        + "</li>"
        for label, text, link in facts
    )
    md = [f"- {label}: " + (f"[{text}]({link})" if link else text) for label, text, link in facts]
    return items, md
