"""`duda run`: the whole pipeline in one command, skipping what is already current."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from duda_cli import options
from duda_cli.console import (
    ConsoleReporter,
    load,
    setup_logging,
    single_process,
    stderr,
    user_errors,
)

Root = Annotated[Path | None, typer.Option(
    "--out", "-o", help="Directory for every stage's artifact (default: runs/<experiment>).",
    show_default=False)]
Init = Annotated[Path | None, typer.Option(
    "--init", help="Initial weights for warmup (see `duda warmup --help`).", show_default=False)]


def register(app: typer.Typer) -> None:
    app.command("run")(run)


def run(config: options.Config, out: Root = None, init: Init = None, set_: options.Set = None,
        force: options.Force = False, device: options.Device = "auto",
        seed: options.Seed = None, data_root: options.DataRoot = None,
        as_json: options.Json = False, quiet: options.Quiet = False) -> None:
    """Run the whole pipeline; rerunning continues where an interrupted run stopped.

    prepare-data → warmup → generate-pseudo → (self-train → update-offline) × rounds →
    evaluate, every stage writing its artifact under --out; current stages are skipped.
    """
    from stages import pipeline  # imported here: `duda --help` stays fast

    setup_logging(quiet)
    with user_errors():
        single_process("duda run")
        cfg = load(config, set_, seed, data_root)
        root = out if out is not None else Path("runs") / cfg.experiment
        result = pipeline.run(cfg, root, init=init, force=force, device=device,
                              reporter=ConsoleReporter(quiet))
    final = result.final.manifest.summary
    warm = result.stages["evaluate_warmup"].manifest.summary
    if as_json:
        print(json.dumps({"artifact": str(result.final.path), "summary": final,
                          "stages": {name: str(r.path) for name, r in result.stages.items()},
                          "warmup_miou": warm["miou"]}))
        return
    if not quiet:
        stderr.print(_table(cfg.data.protocols, warm, final, result.final.path))


def _table(protocols: list[int], warm: dict, final: dict, path: Path) -> Table:
    table = Table(title=f"target-val mIoU ({path})")
    table.add_column("model")
    for name in warm["miou_by_protocol"]:
        table.add_column(f"mIoU-{name}", justify="right")
    table.add_row("warmup (source only)",
                  *(f"{100 * v:.2f}" for v in warm["miou_by_protocol"].values()))
    table.add_row("DUDA (mean teacher)",
                  *(f"{100 * v:.2f}" for v in final["miou_by_protocol"].values()))
    return table
