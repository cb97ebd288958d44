"""The `vlatune` command: thin sub-commands, grouped by area, each calling the library.

$ vlatune --help
$ vlatune version
$ vlatune config show configs/demo/tiny.yaml optim.lr=3e-4
$ vlatune sim check --suite libero_object --task 0 --resolution 128
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from vlatune import __version__
from vlatune.config import ConfigError, dump_config, load_config
from vlatune.data.episode import DataError
from vlatune.sim.setup import SimUnavailable

console = Console()
err_console = Console(stderr=True)

# Errors whose message is complete and actionable: printed as one line, exit status 1
# (VLATUNE_DEBUG=1 shows the traceback instead).
USER_ERRORS = (ConfigError, SimUnavailable, DataError, FileNotFoundError, ValueError)


class VlatuneGroup(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as e:
            if os.environ.get("VLATUNE_DEBUG"):
                raise
            raise click.ClickException(str(e)) from None
        except OSError as e:  # a full disk, a read-only folder: one sentence, no traceback
            if os.environ.get("VLATUNE_DEBUG"):
                raise
            from vlatune.fsutil import os_error_sentence

            raise click.ClickException(os_error_sentence(e)) from None


@click.group(cls=VlatuneGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(
    __version__,
    "--version",
    prog_name="vlatune",
    message="%(prog)s %(version)s (`vlatune version` lists the libraries' versions)",
)
def cli() -> None:
    """vlatune: fine-tune and evaluate Vision-Language-Action policies on LIBERO and your data."""


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def version(as_json: bool) -> None:
    """Print vlatune, Python and library versions (the block saved with results)."""
    from vlatune.versions import format_version_block, version_block

    block = version_block()
    click.echo(json.dumps(block) if as_json else format_version_block(block))


# ---------------------------------------------------------------------------------------- config
@cli.group()
def config() -> None:
    """Typed run configs: inspect and validate YAML recipes."""


@config.command("show")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("overrides", nargs=-1)
def config_show(file: Path, overrides: tuple[str, ...]) -> None:
    """Print FILE fully resolved (defaults, base files and key.path=value OVERRIDES applied)."""
    click.echo(dump_config(load_config(file, list(overrides))), nl=False)


# ------------------------------------------------------------------------------------------ data
FORMAT_CHOICE = click.Choice(["auto", "libero_hdf5", "hdf5", "lerobot_v21", "lerobot_v30", "rlds"])


def _open(path: Path, fmt: str, mapping: Path | None):
    from vlatune.data import open_dataset

    return open_dataset(path, format=fmt, mapping=mapping)


def _dataset_options(f):
    f = click.option(
        "--mapping",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Key mapping YAML for --format hdf5 or rlds.",
    )(f)
    f = click.option(
        "--format",
        "fmt",
        type=FORMAT_CHOICE,
        default="auto",
        show_default=True,
        help="Dataset format (auto-detected).",
    )(f)
    return click.argument("path", type=click.Path(exists=True, path_type=Path))(f)


def _progress(total: int, label: str):
    """(context manager, tick(i)): a bar with counts on a terminal, a timed line at least every
    few seconds in a log (`vlatune.progress`)."""
    from vlatune.progress import Progress

    bar = Progress(total, label)
    return bar, lambda i: bar.set(i + 1)


def _write_json_atomic(obj, out: Path) -> None:
    from vlatune.fsutil import write_json  # temporary removed on failure (a full disk)

    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, obj)


@cli.group()
def data() -> None:
    """Datasets: inspect, validate, statistics, splits, conversion (LIBERO HDF5, HDF5, LeRobot)."""


@data.command("inspect")
@_dataset_options
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object.")
def data_inspect(path: Path, fmt: str, mapping: Path | None, as_json: bool) -> None:
    """Format, episodes, frames, fps, tasks, features and declared conventions of PATH.

    Reads metadata only (not the episodes' contents): `vlatune data check` looks inside."""
    with _open(path, fmt, mapping) as ds:
        summary = ds.info.to_json(ds.tasks())
    summary["contents_checked"] = False  # metadata only: `data check` reads the episodes
    if as_json:
        click.echo(json.dumps(summary))
        return
    console.print(f"[bold]{summary['path']}[/]  format [bold]{summary['format']}[/]")
    console.print(
        f"episodes {summary['episodes']}, frames {summary['frames']}, fps {summary['fps']:g}"
    )
    console.print(
        f"image orientation: {summary['image_orientation']} ({summary['image_orientation_source']}), "
        f"gripper: {summary['gripper']}, action range: {summary['action_range']}"
    )
    for name, source in summary.get("conventions", {}).items():  # RLDS: where each came from
        console.print(f"  {name}: {source}", markup=False)
    tasks = Table("episodes", "instruction")
    for t in summary["tasks"]:
        tasks.add_row(str(t["episodes"]), t["instruction"])
    console.print(tasks)
    feats = Table("feature", "shape", "dtype")
    for name, spec in summary["features"].items():
        feats.add_row(name, str(tuple(spec["shape"])), spec["dtype"])
    console.print(feats)
    console.print(
        "metadata only: the episodes were not read; `vlatune data check PATH` looks inside them"
    )


@data.command("check")
@_dataset_options
def data_check(path: Path, fmt: str, mapping: Path | None) -> None:
    """Validate every episode; one line per problem; exit 1 when anything is wrong.

    Reads everything: each episode's actions, states and extras (NaN / inf, lengths, shapes
    against the other episodes, data not declared) and decodes every frame of every camera
    (uint8, 3 channels, frame counts). `train` and `convert` run the same checks, reading only
    the first and last frame of each camera.
    """
    from vlatune.data.check import check_dataset

    with _open(path, fmt, mapping) as ds:
        bar, tick = _progress(len(ds), "checking")
        with bar:
            problems = check_dataset(ds, progress=tick)
        n = len(ds)
    for p in problems:
        click.echo(str(p))
    if problems:
        click.echo(f"{len(problems)} problem(s) in {n} episode(s)", err=True)
        raise SystemExit(1)
    click.echo(f"ok: {n} episode(s), no problems")


@data.command("stats")
@_dataset_options
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the JSON here (else print it).",
)
@click.option("--images", is_flag=True, help="Also per-channel image statistics (sampled frames).")
def data_stats(path: Path, fmt: str, mapping: Path | None, out: Path | None, images: bool) -> None:
    """Per-feature mean, std, min, max, q01, q99 in one streaming pass (JSON). Refuses data
    with a blocking problem (NaN / inf, shapes, lengths: the validation `train` runs), so no
    statistics file ever holds NaN."""
    from vlatune.data.stats import dataset_stats
    from vlatune.data.validate import validate_dataset

    with _open(path, fmt, mapping) as ds:
        validate_dataset(ds, images="sample").raise_if_blocking(
            "statistics", "train with data.skip_bad_episodes=true"
        )
        bar, tick = _progress(len(ds), "statistics")
        with bar:
            stats = dataset_stats(ds, images=images, progress=tick)
    if out is None:
        click.echo(json.dumps(stats))
    else:
        _write_json_atomic(stats, out)
        click.echo(f"wrote {out}")


@data.command("split")
@_dataset_options
@click.option(
    "--test-fraction",
    default=0.05,
    show_default=True,
    type=float,
    help="Fraction of each task's episodes held out.",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Shuffling seed.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the JSON here (else print it).",
)
def data_split(
    path: Path, fmt: str, mapping: Path | None, test_fraction: float, seed: int, out: Path | None
) -> None:
    """Split by episode, stratified by task, deterministic for a seed."""
    from vlatune.data.split import held_out_warning, split_episodes

    with _open(path, fmt, mapping) as ds:
        split = split_episodes(ds, test_fraction, seed)
    warning = held_out_warning(split, "--test-fraction 0")
    if warning:
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    if out is None:
        click.echo(json.dumps(split))
    else:
        _write_json_atomic(split, out)
        click.echo(f"wrote {out}: {len(split['train'])} train, {len(split['test'])} test episodes")


@data.command("convert")
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option(
    "--to",
    "target",
    required=True,
    type=click.Choice(["lerobot", "lerobot-v3", "hdf5", "rlds"]),
    help="lerobot = LeRobot v2.1; lerobot-v3 = v3.0; hdf5 = LIBERO-style HDF5; rlds = TFDS RLDS.",
)
@click.option(
    "--format",
    "fmt",
    type=FORMAT_CHOICE,
    default="auto",
    show_default=True,
    help="Source format (auto-detected).",
)
@click.option(
    "--mapping",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Key mapping YAML for a --format hdf5 source.",
)
@click.option(
    "--codec",
    type=click.Choice(["h264", "av1"]),
    default="h264",
    show_default=True,
    help="Video codec for LeRobot.",
)
@click.option(
    "--orientation",
    type=click.Choice(["raw", "upright"]),
    default=None,
    help="Frame orientation to write. Default: upright for LeRobot (as LeRobot's own LIBERO "
    "datasets are: LIBERO's raw renders are rotated 180 degrees), the source's otherwise.",
)
@click.option(
    "--skip-bad-episodes",
    is_flag=True,
    help="Leave out episodes that fail validation (listed) instead of refusing to convert.",
)
def data_convert(
    src: Path,
    dst: Path,
    target: str,
    fmt: str,
    mapping: Path | None,
    codec: str,
    orientation: str | None,
    skip_bad_episodes: bool,
) -> None:
    """Convert SRC to DST (validated first; written to a temporary folder, renamed at the end)."""
    from vlatune.data.convert import convert

    if orientation is None and target.startswith("lerobot"):
        orientation = "upright"  # what LeRobot, openpi and OFT users expect to load
    with _open(src, fmt, mapping) as ds:
        source_orientation = ds.info.image_orientation
        bar, tick = _progress(len(ds), "converting")
        check_bar, check_tick = _progress(len(ds), "validating")
        with check_bar, bar:
            report = convert(
                ds,
                dst,
                target,
                codec=codec,
                image_orientation=orientation,
                progress=tick,
                skip_bad_episodes=skip_bad_episodes,
                check_progress=check_tick,
            )
    for line in report.get("warnings", []):
        err_console.print(f"warning: {line}", highlight=False, markup=False)
    if report.get("skipped_episodes"):
        eps = report["skipped_episodes"]
        err_console.print(
            f"skipped {len(eps)} bad episode(s) (--skip-bad-episodes): {eps}", highlight=False
        )
    console.print(
        f"wrote {report['format']} to {report['path']}: {report['episodes']} episodes, {report['frames']} frames"
    )
    written = orientation or source_orientation
    if written == source_orientation:
        how = f"{written}, as in the source"
    else:
        how = f"{written}, rotated 180 degrees from the source's {source_orientation} frames"
    hint = "; --orientation raw keeps LIBERO's raw renders" if written == "upright" else ""
    console.print(f"frames: {how}{hint}", highlight=False)
    for cam, value in report["psnr_db"].items():
        text = (
            "lossless" if value == float("inf") else ("n/a" if value is None else f"{value:.2f} dB")
        )
        console.print(f"  {cam}: PSNR {text}")


@data.command("download")
@click.argument("name")
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Destination folder.",
)
def data_download(name: str, out_dir: Path) -> None:
    """Download NAME (libero_<suite>, libero_<suite>_raw, or a repo id) from the Hugging Face Hub."""
    from vlatune.data.download import download

    path = download(name, out_dir)
    console.print(f"downloaded to {path}")


# ------------------------------------------------------------------------------------------- sim
@cli.group()
def sim() -> None:
    """LIBERO simulation: set-up and checks."""


@sim.command("setup")
def sim_setup() -> None:
    """Write vlatune's LIBERO config, link the assets and check headless GL (idempotent)."""
    from vlatune.sim.setup import check_headless_gl, prepare_libero

    paths = prepare_libero()
    backend = check_headless_gl()
    click.echo(f"LIBERO config: {paths['config_file']}")
    click.echo(f"LIBERO assets: {paths['assets']}")
    click.echo(f"headless GL:   MUJOCO_GL={backend} (context created)")


@sim.command("check")
@click.option("--suite", default="libero_object", show_default=True, help="LIBERO suite.")
@click.option(
    "--task", "task_id", default=0, show_default=True, type=int, help="Task index in the suite."
)
@click.option(
    "--resolution", default=128, show_default=True, type=int, help="Camera resolution (pixels)."
)
@click.option(
    "--out",
    "out_dir",
    default=Path("outputs/sim_check"),
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the camera PNGs.",
)
def sim_check(suite: str, task_id: int, resolution: int, out_dir: Path) -> None:
    """Create a LIBERO task, apply init state 0, settle, save both cameras upright as PNG."""
    from vlatune.progress import Progress
    from vlatune.sim.check import run_sim_check

    # creating the environment takes 8-16 s on a CPU: a bar, or a line every few seconds
    with Progress(1, f"sim check {suite} task {task_id} at {resolution} px", unit="task") as bar:
        result = run_sim_check(suite, task_id, resolution, out_dir)
        bar.set(1)
    console.print(f"[bold]{result.suite}[/] task {result.task_id}: {result.instruction}")
    table = Table("stage", "seconds")
    t = result.timings
    table.add_row("environment creation", f"{t['env_creation_s']:.2f}")
    table.add_row("reset + init state 0", f"{t['reset_and_init_state_s']:.2f}")
    table.add_row(
        f"one env step ({len(result.pngs)} cameras, mean of {int(t['settle_steps'])})",
        f"{t['step_mean_s']:.3f}  ({t['steps_per_s']:.1f} steps/s)",
    )
    console.print(table)
    for cam, path in result.pngs.items():
        console.print(f"{cam:>10}: {path}  (upright)")


@sim.command("synth")
@click.option("--suite", default="libero_object", show_default=True, help="LIBERO suite.")
@click.option("--tasks", default="0", show_default=True, help="Comma-separated task indices.")
@click.option(
    "--episodes", default=10, show_default=True, type=int, help="Successful episodes per task."
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Output folder: LIBERO HDF5 files, one per task, and synth_report.json.",
)
@click.option(
    "--resolution", default=128, show_default=True, type=int, help="Camera resolution (pixels)."
)
@click.option(
    "--first-init",
    default=0,
    show_default=True,
    type=int,
    help="First init state to try (then the next ones).",
)
@click.option(
    "--init",
    "init_source",
    type=click.Choice(["fixed", "sampled"]),
    default="fixed",
    show_default=True,
    help="LIBERO's 50 fixed init states, or new sampled ones (keeps the fixed ones held out).",
)
@click.option("--workers", default=2, show_default=True, type=int, help="For --init sampled.")
@click.option("--cameras", default="agentview,wrist", show_default=True, help="For --init sampled.")
@click.option(
    "--noise",
    default=0.0,
    show_default=True,
    type=float,
    help="For --init sampled: DART noise std on the executed x, y, z actions (labels stay clean).",
)
@click.option(
    "--descend-radius",
    default=0.0,
    show_default=True,
    type=click.FloatRange(min=0.0),
    help="Carry and lower as one funnel: the hand descends within this distance (m) of the spot "
    "above the target and releases within a third of it (the demo records with 0.06); 0: carry "
    "at height, then lower.",
)
@click.option(
    "--grasp-noise-scale",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0.0),
    help="For --noise: the multiple of it applied while the expert descends to the grasp and "
    "closes (the demo records with 1; 0 and 0.5 made worse policies, see docs/demo.md).",
)
@click.option(
    "--msaa",
    default=None,
    type=click.IntRange(min=0),
    help="For --init sampled: the renderer's anti-aliasing samples (default: LIBERO's 4; the demo "
    "records with 0, about 40% less render time on a CPU).",
)
def sim_synth(
    suite: str,
    tasks: str,
    episodes: int,
    out_dir: Path,
    resolution: int,
    first_init: int,
    init_source: str,
    workers: int,
    cameras: str,
    noise: float,
    descend_radius: float,
    grasp_noise_scale: float,
    msaa: int | None,
) -> None:
    """Record scripted-expert demonstrations as LIBERO HDF5 (raw orientation, env gripper)."""
    from vlatune.progress import Progress
    from vlatune.sim.expert import ExpertParams
    from vlatune.sim.synth import synthesize, synthesize_sampled

    task_ids = _parse_ints(tasks)
    with Progress(episodes * len(task_ids), "synth", unit="kept") as bar:
        if init_source == "sampled":
            report = synthesize_sampled(
                suite,
                task_ids,
                episodes,
                out_dir,
                resolution,
                cameras=tuple(c.strip() for c in cameras.split(",")),
                workers=workers,
                params=ExpertParams(
                    noise=noise, descend_radius=descend_radius, grasp_noise_scale=grasp_noise_scale
                ),
                progress=lambda k, n: bar.set(k, tried=n),
                msaa=msaa,
            )
        else:
            if msaa is not None:
                raise click.UsageError("--msaa applies to --init sampled")
            report = synthesize(
                suite,
                task_ids,
                episodes,
                out_dir,
                resolution,
                first_init,
                params=ExpertParams(
                    descend_radius=descend_radius, grasp_noise_scale=grasp_noise_scale
                ),
                progress=lambda k, n: bar.set(k, tried=n),
            )
    table = Table("task", "kept", "tried", "expert success", "mean steps")
    for t in report["tasks"].values():
        table.add_row(
            f"{t['task_id']}: {t['instruction']}",
            str(t["kept"]),
            str(t["tried"]),
            f"{t['expert_success_rate']:.0%}",
            f"{t['mean_steps'] or 0:.0f}",
        )
    console.print(table)
    console.print(f"wrote {report['episodes']} episodes to {out_dir} in {report['seconds']:.0f} s")


@sim.command("regenerate")
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.argument("dst", type=click.Path(file_okay=False, path_type=Path))
@click.option("--suite", required=True, help="The suite the demos belong to (libero_object, ...).")
@click.option(
    "--resolution", default=256, show_default=True, type=int, help="Camera resolution (pixels)."
)
@click.option(
    "--workers", default=1, show_default=True, type=int, help="Files processed in parallel."
)
def sim_regenerate(src: Path, dst: Path, suite: str, resolution: int, workers: int) -> None:
    """Replay raw LIBERO demos at a new resolution, drop no-ops and failed replays (resumable)."""
    from vlatune.progress import Progress
    from vlatune.sim.regenerate import regenerate

    with Progress(None, "regenerate", unit="files") as bar:

        def tick(done: int, total: int, task: str) -> None:
            bar.total = total
            bar.set(done, last=task)

        summary = regenerate(src, dst, suite, resolution, workers, progress=tick)
    table = Table("task", "demos", "kept", "no-ops dropped")
    for task, row in summary.items():
        table.add_row(task, str(row["demos"]), str(row["kept"]), str(row["dropped_noops"]))
    console.print(table)
    for task, row in summary.items():
        if row["warning"]:
            err_console.print(f"[yellow]warning[/]: {task}: {row['warning']}")
    console.print(f"wrote {dst}")


def _parse_ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(
            f"expected comma-separated integers like 0,3,7, got '{text}'"
        ) from None


# ------------------------------------------------------------------------------------------ eval
def _parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise click.BadParameter(f"expected i/n such as 0/4, got '{text}'") from None
    return i, n


@cli.group(invoke_without_command=True)
@click.option(
    "--policy",
    help="A checkpoint folder (runs/x/checkpoint-<step>) or saved policy folder, scripted, "
    "replay:DATASET, or package.module:factory.",
)
@click.option("--suite", default="libero_object", show_default=True, help="LIBERO suite.")
@click.option("--tasks", default=None, help="Comma-separated task indices (default: all).")
@click.option(
    "--trials",
    default=50,
    show_default=True,
    type=int,
    help="Trials per task; trial k uses init state k % 50.",
)
@click.option(
    "--seed",
    default=7,
    show_default=True,
    type=int,
    help="Base seed: each episode seeds numpy and torch from (seed, trial), so results do not "
    "depend on --workers or on resuming.",
)
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=int,
    help="Worker processes (1: in this process).",
)
@click.option(
    "--video",
    type=click.Choice(["failures", "all", "none"]),
    default="failures",
    show_default=True,
    help="Which episodes to film.",
)
@click.option(
    "--video-trials",
    default=None,
    type=int,
    help="Record videos of the first N trials of each task only; the other episodes render just "
    "the frames the policy sees (about 5x faster with --replan 8). Default: every trial.",
)
@click.option(
    "--out",
    "out_dir",
    default=Path("outputs/eval"),
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Results folder; re-running the same command there resumes.",
)
@click.option(
    "--max-steps",
    default=None,
    type=int,
    help="Policy steps per episode (default: the suite's standard).",
)
@click.option(
    "--replan",
    default=None,
    type=int,
    help="Actions executed from each chunk before re-querying (default: the checkpoint's "
    "training setting, else 8).",
)
@click.option(
    "--resolution",
    default=None,
    type=int,
    help="Camera resolution (default: the checkpoint's training setting, else 256).",
)
@click.option(
    "--shard",
    default="0/1",
    show_default=True,
    help="Run shard i of n (combine with `vlatune eval merge`).",
)
@click.option(
    "--first-init",
    default=0,
    show_default=True,
    type=int,
    help="Trial k uses init state (first-init + k) % 50.",
)
@click.pass_context
def eval(
    ctx: click.Context,
    policy,
    suite,
    tasks,
    trials,
    seed,
    workers,
    video,
    video_trials,
    out_dir,
    max_steps,
    replan,
    resolution,
    shard,
    first_init,
) -> None:  # noqa: A001
    """Evaluate a policy on LIBERO: success rates with 95% intervals, videos, CSV (resumable)."""
    if ctx.invoked_subcommand is not None:
        return
    if not policy:
        raise click.UsageError(
            "--policy is required (scripted, replay:DATASET or package.module:factory)"
        )
    from vlatune.eval.runner import EvalSpec, evaluate

    spec = EvalSpec(
        policy=policy,
        suite=suite,
        out=out_dir,
        tasks=_parse_ints(tasks) if tasks else None,
        trials=trials,
        seed=seed,
        workers=workers,
        video=video,
        video_trials=video_trials,
        max_steps=max_steps,
        replan=replan,
        resolution=resolution,
        shard=_parse_shard(shard),
        first_init=first_init,
    )

    from vlatune.eval.results import outcome
    from vlatune.eval.runner import plan
    from vlatune.progress import Progress

    try:
        planned = {e["id"] for e in plan(spec)}
    except (KeyError, ValueError):  # an unknown suite: evaluate() says so in its own words
        planned = None
    prior = _finished_episodes(out_dir / "episodes.jsonl", planned)
    if prior:
        of = f" of {len(planned)}" if planned else ""
        console.print(
            f"resuming: {prior}{of} episodes done in {out_dir}/episodes.jsonl; running the rest",
            highlight=False,
        )

    def show(result, done, total) -> None:
        what = outcome(result)
        if result.get("exception") and what == "failure":
            exc = result["exception"]
            message = exc["message"] if len(exc["message"]) <= 100 else exc["message"][:97] + "..."
            what += f" ({exc['stage']} raised {message})"
        where = f"{result['id']} (init state {result['init_index']})"
        bar.total = prior + total
        bar.note(f"[{prior + done}/{prior + total}] {where}: {what} ({result['steps']} steps)")
        bar.set(prior + done)

    # a heartbeat line every few seconds while an episode runs (plain output), a bar on a terminal
    with Progress(None, "eval", start=prior, unit="episodes") as bar:
        summary = evaluate(spec, progress=show, warn=_warn)  # warns about errors, fallbacks
    _print_summary(summary, out_dir, warn=False)


def _finished_episodes(log: Path, planned: set[str] | None = None) -> int:
    """Episodes already recorded in an eval folder's episodes.jsonl (what a re-run skips),
    among the `planned` episode ids when given."""
    if not log.is_file():
        return 0
    from vlatune.eval.runner import latest_episodes, read_episodes

    return sum(
        1
        for e in latest_episodes(read_episodes(log))
        if e.get("error") is None and (planned is None or e["id"] in planned)
    )


def _warn(text: str) -> None:
    err_console.print(f"[yellow]warning:[/] {text}", highlight=False, markup=True)


def _print_summary(summary, out_dir: Path, warn: bool = True) -> None:
    from vlatune.eval.results import headline, warnings_for

    cols = ("task", "trials", "successes", "failures", "errors", "success", "95% CI")
    table = Table(*cols, "fallbacks/queries")
    for r in [*summary["tasks"], summary["overall"]]:
        rate = "-" if r["success_rate"] is None else f"{100 * r['success_rate']:.1f}%"
        table.add_row(
            r["name"],
            str(r["trials"]),
            str(r["successes"]),
            str(r["failures"]),
            str(r["errors"]),
            rate,
            f"[{100 * r['ci95_low']:.1f}, {100 * r['ci95_high']:.1f}]",
            f"{r['fallback_queries']}/{r['queries']}",
        )
    console.print(table)
    for line in warnings_for(summary) if warn else []:
        _warn(line)
    console.print(f"success {headline(summary['overall'])} (errors count as failures)")
    console.print(
        f"results: {out_dir / 'results.json'}, {out_dir / 'results.csv'}, {out_dir / 'success_rates.png'}"
    )


@eval.command("merge")
@click.argument(
    "dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path)
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the merged results.",
)
def eval_merge(dirs: tuple[Path, ...], out_dir: Path) -> None:
    """Combine the output folders of `--shard i/n` runs into one."""
    from vlatune.eval.runner import merge

    _print_summary(merge(list(dirs), out_dir), out_dir)


@cli.command()
@click.argument("policy")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Interface to listen on; the default is this machine only (0.0.0.0: every interface).",
)
@click.option("--port", default=8000, show_default=True, type=int, help="0: any free port.")
@click.option(
    "--max-batch", default=8, show_default=True, type=int, help="Requests per forward pass."
)
@click.option(
    "--max-wait-ms",
    default=5.0,
    show_default=True,
    type=float,
    help="How long the first request of a batch waits for others.",
)
@click.option("--stop-on-stdin-eof", is_flag=True, hidden=True)
def serve(policy, host, port, max_batch, max_wait_ms, stop_on_stdin_eof) -> None:
    """Serve POLICY (a checkpoint folder, replay:DATASET or package.module:factory) over a
    websocket to eval workers and robots (`vlatune eval --policy ws://HOST:PORT`,
    `vlatune.serving.PolicyClient`); see docs/serving.md."""
    from vlatune.serving.server import run

    run(policy, host, port, max_batch, max_wait_ms, stop_on_stdin_eof=stop_on_stdin_eof)


@cli.group()
def policy() -> None:
    """Policy folders of every family (vlatune.policies; docs/policies.md)."""


@policy.command("inspect")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def policy_inspect(path: Path, as_json: bool) -> None:
    """Family (detected from the files), parameters, dtype, conventions, processor chain and
    normalisation statistics of the policy in PATH (a vlatune checkpoint or a released folder)."""
    from vlatune.policies.io import format_inspect, inspect

    info = inspect(path)
    click.echo(json.dumps(info, default=str) if as_json else format_inspect(info))


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("config_file", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("overrides", nargs=-1)
@click.option("--no-progress", is_flag=True, help="No progress bar (logs only).")
def train(config_file: Path, overrides: tuple[str, ...], no_progress: bool) -> None:
    """Train a policy: CONFIG (a YAML file or a shipped recipe name such as demo/tiny) plus
    dotted overrides (data.path=DIR train.max_steps=100).

    Multi-GPU: `accelerate launch -m vlatune train CONFIG ...`. `train.resume=auto` (default)
    continues from the latest complete checkpoint in train.output_dir.
    """
    import logging

    from vlatune.train.trainer import train as run_training

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = load_config(config_file, list(overrides))
    summary = run_training(cfg, progress=not no_progress)
    if os.environ.get("RANK", "0") != "0":  # one line per run, not per process
        return
    console.print(
        f"trained {summary['steps']} steps in {summary['wall_s']:.0f} s"
        f"{' (stopped by train.max_minutes)' if summary['stopped_by_time'] else ''}; "
        f"checkpoint: {summary['checkpoint']}"
    )


@cli.command()
@click.option("--suite", default="libero_object", show_default=True, help="LIBERO suite.")
@click.option(
    "--task",
    "--tasks",
    "task_id",
    default="0",
    show_default=True,
    help="Task index in the suite, or several comma-separated (0,1,2): one language-conditioned "
    "policy for all of them, each task's rate reported.",
)
@click.option(
    "--episodes", default=60, show_default=True, type=int, help="Demonstrations per task."
)
@click.option(
    "--minutes",
    default=None,
    type=float,
    help="Opt-in training time cap (default: none; the recipe's train.max_steps, 2,400, "
    "decide). A cap that stops training early is stated first in every output; rerun to "
    "continue from the checkpoint.",
)
@click.option("--trials", default=20, show_default=True, type=int, help="Evaluation trials.")
@click.option("--workers", default=2, show_default=True, type=int, help="Simulator processes.")
@click.option(
    "--noise",
    default=0.2,
    show_default=True,
    type=float,
    help="DART noise on the expert's executed actions while recording (labels stay clean).",
)
@click.option(
    "--msaa",
    default=None,
    type=click.IntRange(min=0),
    help="Anti-aliasing samples when recording (default: LIBERO's 4; 0: none, about 40% less "
    "render time on a CPU, but a lower rate on recording seed 1, see docs/demo.md). The "
    "evaluation always renders as LIBERO does.",
)
@click.option(
    "--seed",
    "record_seed",
    default=0,
    show_default=True,
    type=int,
    help="Recording seed: the sampled initial states and noise of the demonstrations.",
)
@click.option(
    "--out",
    "out_dir",
    default=Path("outputs/demo"),
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Output folder: data, run, evaluation, report.html.",
)
@click.option(
    "--config",
    "config_file",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Training recipe (a YAML file or a recipe name; default: demo/tiny).",
)
@click.argument("overrides", nargs=-1)
def demo(
    suite,
    task_id,
    episodes,
    minutes,
    trials,
    workers,
    noise,
    msaa,
    record_seed,
    out_dir,
    config_file,
    overrides,
):
    """Record demos, convert to LeRobot, train a tiny policy, evaluate it on held-out init
    states and write OUT/report.html: the whole pipeline on a CPU."""
    import logging

    from vlatune.demo import run_demo

    tasks = _parse_ints(task_id)
    if not tasks or len(set(tasks)) != len(tasks):
        raise click.BadParameter(f"distinct task indices, got '{task_id}'", param_hint="--tasks")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_demo(
        out_dir,
        suite=suite,
        task=tasks[0] if len(tasks) == 1 else tasks,
        episodes=episodes,
        minutes=minutes,
        trials=trials,
        workers=workers,
        noise=noise,
        msaa=msaa,
        seed=record_seed,
        config=config_file,
        overrides=list(overrides),
        say=console.print,
    )


@cli.command()
@click.argument("config_file", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("overrides", nargs=-1)
@click.option(
    "--phases",
    default=None,
    help="Recipes beside CONFIG, comma-separated (default: CONFIG itself).",
)
@click.option(
    "--subsets",
    default="spatial,object,goal,long",
    show_default=True,
    help="LIBERO subsets (data.subset), comma-separated: the columns of the grid.",
)
@click.option(
    "--eval-trials",
    default=50,
    show_default=True,
    type=int,
    help="Trials per task (0: no evaluation).",
)
@click.option("--workers", default=1, show_default=True, type=int, help="Simulator processes.")
@click.option(
    "--out",
    "out_dir",
    default=Path("runs/experiment"),
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Grid folder: one run and evaluation per cell, results.md / .csv / .json.",
)
@click.option("--dry-run", is_flag=True, help="List what would run, run nothing.")
@click.option("--no-progress", is_flag=True, help="No progress bars (log lines only).")
def experiment(
    config_file, overrides, phases, subsets, eval_trials, workers, out_dir, dry_run, no_progress
):
    """Train and evaluate every (phase, subset) cell, skipping cells already done; write
    OUT/results.md and OUT/results.csv (rows = phases, columns = subsets)."""
    from vlatune.config import resolve_config_path
    from vlatune.experiment import run_experiment

    try:
        run_experiment(
            resolve_config_path(config_file),
            [p.strip() for p in phases.split(",") if p.strip()] if phases else None,
            [s.strip() for s in subsets.split(",") if s.strip()],
            out_dir,
            eval_trials=eval_trials,
            workers=workers,
            overrides=list(overrides),
            dry_run=dry_run,
            say=console.print,
            progress=not no_progress,
        )
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from None


@cli.group()
def annotate() -> None:
    """Reasoning annotations for the NORA phases: ECoT text, optical flow and flow VQ tokens."""


@annotate.command("ecot")
@_dataset_options
@click.option(
    "--out",
    "out_file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Annotation file to write (JSON, joined to training samples by episode and frame).",
)
@click.option(
    "--llm",
    type=click.Choice(["rules", "openai"]),
    default="rules",
    show_default=True,
    help="rules: gripper-event phases, no language model; openai: an OpenAI-compatible API "
    "(VLATUNE_LLM_BASE_URL, VLATUNE_LLM_API_KEY from the environment).",
)
@click.option("--model", default=None, help="--llm openai: model name (or VLATUNE_LLM_MODEL).")
@click.option(
    "--cache",
    "cache_dir",
    default=None,
    type=click.Path(file_okay=False, path_type=Path),
    help="--llm openai: reply cache (default: OUT.cache/); re-running asks only what is missing.",
)
@click.option(
    "--geometry",
    type=click.Choice(["auto", "on", "off"]),
    default="auto",
    show_default=True,
    help="GRIPPER POSITION and VISIBLE OBJECTS through the LIBERO simulator's camera (LIBERO "
    "HDF5 with per-frame MuJoCo states; auto: when the data and the simulator allow it).",
)
@click.option(
    "--camera-matrix",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help='Other datasets: JSON {"matrix": 3x4 world-to-pixel projection} for GRIPPER '
    "POSITION from state[:3] (pixels u right, v down, of the frames as stored upright).",
)
@click.option("--window", default=4, show_default=True, type=int, help="MOVE: frames per window.")
@click.option("--threshold", default=0.03, show_default=True, type=float, help="MOVE: threshold.")
def annotate_ecot(
    path, fmt, mapping, out_file, llm, model, cache_dir, geometry, camera_matrix, window, threshold
):
    """Per-frame TASK, PLAN, SUBTASK (+ reasons), MOVE for every episode of PATH, written as one
    JSON file keyed by episode and frame (data.annotations of the NORA text_cot recipe)."""
    from vlatune.data.annotations import write_annotations
    from vlatune.reasoning.ecot import RULES_VERSION, annotate_dataset_rules, rules_prompt_hash
    from vlatune.reasoning.primitives import PrimitiveParams

    params = PrimitiveParams(window=window, threshold=threshold)
    annotator = None
    if llm == "openai":
        from vlatune.reasoning.llm import LLMAnnotator

        cache = cache_dir or out_file.with_name(out_file.name + ".cache")
        try:
            annotator = LLMAnnotator(model, cache, params=params)
        except (ImportError, RuntimeError) as e:
            raise click.ClickException(str(e)) from None
    geo = None
    try:
        with _open(path, fmt, mapping) as ds:
            geo = (
                _matrix_geometry(camera_matrix) if camera_matrix else _libero_geometry(ds, geometry)
            )
            bar, tick = _progress(len(ds), "annotating")
            with bar:
                frames = annotate_dataset_rules(
                    ds,
                    params=params,
                    progress=lambda k, n: tick(k - 1),
                    annotator=annotator,
                    geometry=geo,
                )
    except Exception as e:
        if annotator is None:
            raise
        import openai

        from vlatune.reasoning.llm import MalformedReply

        if isinstance(e, MalformedReply | openai.OpenAIError):
            raise click.ClickException(
                f"{type(e).__name__}: {e} (episodes done so far are cached; re-run to resume)"
            ) from None
        raise
    if annotator is not None:
        console.print(
            f"{annotator.requests} request(s) to {annotator.model}; the rest from the cache"
        )
    failed = getattr(geo, "failed", None)
    if failed:  # auto mode gave up on the first episode: nothing was added
        geo.close()
        geo = None
    write_annotations(
        out_file,
        frames,
        annotator=llm,
        model=annotator.model if annotator else None,
        prompt_sha256=annotator.prompt_hash if annotator else rules_prompt_hash(),
        rules=RULES_VERSION if annotator is None else None,
        params={"window": window, "threshold": threshold},
        dataset=str(path),
        geometry=(
            f"camera matrix {camera_matrix}"
            if camera_matrix
            else "LIBERO simulator camera (agentview, upright pixels)"
        )
        if geo
        else None,
        omitted={"VISIBLE OBJECTS": "needs object poses (LIBERO only)"}
        if camera_matrix
        else {}
        if geo
        else {"VISIBLE OBJECTS": failed, "GRIPPER POSITION": failed}
        if failed
        else {
            "VISIBLE OBJECTS": "needs object poses and a camera model: LIBERO HDF5 with per-frame "
            "MuJoCo states and the simulator (--geometry on)",
            "GRIPPER POSITION": "needs a camera model (as above)",
        },
    )
    if geo is not None:
        geo.close()

    console.print(f"{len(frames)} frames annotated -> {out_file}")


def _matrix_geometry(path: Path):
    """GRIPPER POSITION from a user's 3x4 projection matrix and the states' first 3 values."""
    import numpy as np

    try:
        m = np.asarray(json.loads(path.read_text())["matrix"], dtype=np.float64)
    except (KeyError, ValueError, TypeError) as e:
        raise click.ClickException(f'{path}: expected {{"matrix": 3x4 numbers}} ({e})') from None
    if m.shape != (3, 4):
        raise click.ClickException(f"{path}: 'matrix' must be 3x4, got {m.shape}")

    def geometry(episode):
        if episode.states is None:
            return None
        pts = np.asarray(episode.states, dtype=np.float64)[:, :3]
        hom = np.concatenate([pts, np.ones((len(pts), 1))], 1) @ m.T
        uv = np.rint(hom[:, :2] / hom[:, 2:3]).astype(int)
        return [{"gripper": uv[t : t + 5].tolist()} for t in range(len(pts))]

    geometry.close = lambda: None
    return geometry


class _Tolerant:
    """--geometry auto: the first failure (e.g. states that are not this scene's) switches the
    geometry off for the whole file, said once."""

    def __init__(self, geo):
        self.geo, self.failed = geo, None

    def __call__(self, episode):
        if self.failed:
            return None
        try:
            return self.geo(episode)
        except Exception as e:
            self.failed = f"{type(e).__name__}: {e}"
            err_console.print(f"GRIPPER POSITION / VISIBLE OBJECTS omitted: {self.failed}")
            return None

    def close(self):
        self.geo.close()


def _libero_geometry(ds, mode: str):
    """The LIBERO camera geometry for `annotate ecot`, or None (said once when auto skips it)."""
    if mode == "off":
        return None
    reason = None
    if ds.info.format != "libero_hdf5" or "states" not in ds.info.features:
        reason = "the dataset is not LIBERO HDF5 with per-frame MuJoCo states"
    else:
        try:
            from vlatune.sim.camera import dataset_geometry
            from vlatune.sim.setup import import_libero

            import_libero()
            geo = dataset_geometry(ds)
            return geo if mode == "on" else _Tolerant(geo)
        except Exception as e:  # LIBERO missing or not set up
            reason = f"the LIBERO simulator is unavailable ({type(e).__name__}: {e})"
    if mode == "on":
        raise click.ClickException(f"--geometry on: {reason}")
    err_console.print(f"GRIPPER POSITION / VISIBLE OBJECTS omitted: {reason}")
    return None


@annotate.command("flow")
@_dataset_options
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Output folder (flows.h5).",
)
@click.option(
    "--backend",
    type=click.Choice(["dis", "farneback", "raft"]),
    default="dis",
    show_default=True,
    help="Optical-flow method (OpenCV DIS or Farneback; RAFT needs torchvision).",
)
@click.option("--camera", default=None, help="Main camera (default: the first).")
@click.option(
    "--k", "k", default=4, show_default=True, type=int, help="Flow from frame t to t + k."
)
@click.option("--size", default=64, show_default=True, type=int, help="Stored flow resolution.")
def annotate_flow(path, fmt, mapping, out_dir, backend, camera, k, size):
    """Dense optical flow of every frame of the main camera -> OUT/flows.h5."""
    from vlatune.reasoning.flow import dataset_flows

    try:
        with _open(path, fmt, mapping) as ds:
            bar, tick = _progress(len(ds), "flow")
            with bar:
                f = dataset_flows(
                    ds, out_dir, camera=camera, k=k, size=size, backend=backend,
                    progress=lambda i, n: tick(i - 1),
                )  # fmt: skip
    except ImportError as e:
        raise click.ClickException(str(e)) from None
    console.print(str(f))


@annotate.command("flow-vq")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Output folder: flow_tokens.json, vq/, report.json, flow_vq.png.",
)
@click.option("--codebook", default=512, show_default=True, type=int, help="Codebook size.")
@click.option("--steps", default=2000, show_default=True, type=int, help="VQ-VAE training steps.")
@click.option("--batch", default=64, show_default=True, type=int, help="Batch size (frames).")
@click.option("--seed", default=0, show_default=True, type=int, help="Training seed.")
def annotate_flow_vq(source, out_dir, codebook, steps, batch, seed):
    """Train the flow VQ-VAE on SOURCE (a `vlatune annotate flow` folder or flows.h5, or a
    dataset, whose flows are computed first with the defaults into OUT/flows), report
    reconstruction end-point error and codebook usage, and write every frame's codes as
    OUT/flow_tokens.json (an annotation file), OUT/vq/ (the model), OUT/report.json and
    OUT/flow_vq.png."""
    from vlatune.reasoning.flow_tokens import run_flow_vq

    report = run_flow_vq(
        source, out_dir, codebook=codebook, steps=steps, batch=batch, seed=seed,
        progress_factory=lambda n: _progress(n, "VQ-VAE"),
    )  # fmt: skip
    a = report["after"]
    console.print(
        f"EPE {report['before']['epe_px']} -> {a['epe_px']} px (zero flow: "
        f"{report['zero_flow_epe_px']}), codebook usage {a['codebook_usage']:.0%}, perplexity "
        f"{a['perplexity']}; tokens: {out_dir / 'flow_tokens.json'}"
    )


@annotate.command("show")
@click.argument("annotations", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--dataset",
    required=True,
    type=click.Path(exists=True, path_type=Path),
    help="The dataset the annotations belong to.",
)
@click.option("--episode", required=True, type=int, help="Episode index.")
@click.option("--frame", required=True, type=int, help="Frame index within the episode.")
@click.option("--camera", default=None, help="Camera to show (default: the first).")
@click.option(
    "--out",
    "out_file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="PNG file to write.",
)
def annotate_show(annotations, dataset, episode, frame, camera, out_file):
    """Render one annotated frame (upright) with its reasoning text beside it, as a PNG."""
    from vlatune.reasoning.show import render_annotation

    render_annotation(annotations, dataset, episode, frame, camera, out_file)
    console.print(str(out_file))


@cli.group()
def runs() -> None:
    """Look at training runs."""


@runs.command("plot")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--out",
    "out_dir",
    default=None,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for loss.png and lr.png (default: RUN_DIR).",
)
def runs_plot(run_dir: Path, out_dir: Path | None) -> None:
    """Write loss and learning-rate curves (PNG) from RUN_DIR/metrics.jsonl."""
    import logging

    from vlatune.train.plots import plot_run

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for path in plot_run(run_dir, out_dir or run_dir):
        console.print(str(path))


def main() -> None:
    cli(prog_name="vlatune")


if __name__ == "__main__":
    main()
