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

from vlatune.config import ConfigError, dump_config, load_config
from vlatune.sim.setup import SimUnavailable

console = Console()
err_console = Console(stderr=True)

# Errors whose message is complete and actionable: printed as one line, exit status 1
# (VLATUNE_DEBUG=1 shows the traceback instead).
USER_ERRORS = (ConfigError, SimUnavailable, FileNotFoundError, ValueError)


class VlatuneGroup(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as e:
            if os.environ.get("VLATUNE_DEBUG"):
                raise
            raise click.ClickException(str(e)) from None


@click.group(cls=VlatuneGroup, context_settings={"help_option_names": ["-h", "--help"]})
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
    from vlatune.sim.check import run_sim_check

    with console.status(f"creating {suite} task {task_id} at {resolution} px (8-16 s on CPU)..."):
        result = run_sim_check(suite, task_id, resolution, out_dir)
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


def main() -> None:
    cli(prog_name="vlatune")


if __name__ == "__main__":
    main()
