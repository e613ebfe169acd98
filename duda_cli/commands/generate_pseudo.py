"""`duda generate-pseudo`: offline pseudo labels for target-train, single- or multi-process."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from duda_cli import options
from duda_cli.console import default_path, load, run_stage
from stages.artifacts.manifest import StageResult
from stages.runtime.progress import Reporter

Checkpoints = Annotated[list[Path], typer.Option(
    "--checkpoint", help="Checkpoint artifact of the teacher; repeat it for an ensemble "
    "(probabilities averaged).", show_default=False)]


def register(app: typer.Typer) -> None:
    app.command("generate-pseudo")(generate_pseudo)


def generate_pseudo(config: options.Config, checkpoint: Checkpoints, data: options.Data = None,
                    set_: options.Set = None, out: options.Out = None,
                    force: options.Force = False, device: options.Device = "auto",
                    seed: options.Seed = None, data_root: options.DataRoot = None,
                    as_json: options.Json = False, quiet: options.Quiet = False) -> None:
    """Label every target-train image with the teacher (IAST, CBST or a fixed threshold).

    Runs on several processes with `torchrun --nproc_per_node N duda generate-pseudo …`.
    """
    from stages import generate_pseudo as stage  # imported here: `duda --help` stays fast

    def run(reporter: Reporter) -> StageResult:
        cfg = load(config, set_, seed, data_root)
        return stage.run(cfg, default_path(cfg, data, "prepare_data"), checkpoint,
                         default_path(cfg, out, "generate_pseudo"), force=force, device=device,
                         reporter=reporter)

    run_stage(run, what="pseudo-label store",
              table=lambda result: table(result.manifest.summary), as_json=as_json, quiet=quiet)


def table(summary: dict) -> Table:
    """Per-class thresholds and kept pixels; diagnostics columns where ground truth exists."""
    diagnostic = summary.get("diagnostics")
    title = (f"pseudo labels: {summary.get('images', 0)} images, "
             f"{100 * summary.get('labelled_fraction', 0.0):.1f}% labelled")
    table = Table(title=title, caption=("precision / recall / coverage are diagnostics: "
                                        "target-train ground truth, never used for training")
                  if diagnostic else None)
    for column in ("class", "threshold", "kept of predicted %", "share of pixels %"):
        table.add_column(column, justify="left" if column == "class" else "right")
    if diagnostic:
        for column in ("precision %", "recall %", "coverage %"):
            table.add_column(column, justify="right", style="dim")
    for name, row in summary.get("per_class", {}).items():
        cells = [name, _number(row.get("threshold"), 1, 3), _number(row.get("kept_fraction")),
                 _number(row.get("coverage"))]
        if diagnostic:
            quality = diagnostic["per_class"].get(name, {})
            cells += [_number(quality.get(key)) for key in ("precision", "recall", "coverage")]
        table.add_row(*cells)
    return table


def _number(value: float | None, scale: float = 100, digits: int = 1) -> str:
    return "–" if value is None else f"{scale * value:.{digits}f}"
