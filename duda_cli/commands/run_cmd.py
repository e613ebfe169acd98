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
    # source-only, + AdaBN (named by what it recomputes), DUDA (named by its teacher)
    summaries = {name: stage.manifest.summary for name, stage in result.comparison.items()}
    final = result.final.manifest.summary
    if as_json:
        print(json.dumps({
            "artifact": str(result.final.path), "summary": final,
            "stages": {name: str(r.path) for name, r in result.stages.items()},
            "warmup_miou": result.stages["evaluate_warmup"].manifest.summary["miou"],
            "adabn_miou": result.stages["evaluate_adabn"].manifest.summary["miou"],
            "protocol": final.get("primary_protocol"),
            "comparison": {name: {"miou_by_protocol": summary["miou_by_protocol"],
                                  "per_class": summary["per_class"]}
                           for name, summary in summaries.items()}}))
        return
    if not quiet:
        stderr.print(_table(summaries, _protocol_classes(result.final.path)))


def _protocol_classes(evaluation: Path) -> list[str]:
    """The classes of the evaluation's headline protocol, from its report."""
    from stages.evaluate import REPORT_FILE

    report = json.loads((evaluation / REPORT_FILE).read_text())
    return report["protocols"][str(report["primary_protocol"])]


def _table(summaries: dict[str, dict], classes: list[str]) -> Table:
    """Target-val IoU per class and mIoU per protocol, one column per model."""
    table = Table(title="target-val IoU (%)")
    table.add_column("class")
    for name in summaries:
        table.add_column(name, justify="right")
    for name in classes:
        table.add_row(name, *(f"{100 * s['per_class'][name]:.1f}" for s in summaries.values()))
    table.add_section()
    first = next(iter(summaries.values()))
    headline = str(first.get("primary_protocol", ""))
    for protocol in first["miou_by_protocol"]:
        marker = " (headline)" if str(protocol) == headline else ""
        table.add_row(f"[bold]mIoU-{protocol}{marker}[/]", *(
            f"[bold]{100 * s['miou_by_protocol'][protocol]:.2f}[/]" for s in summaries.values()))
    return table
