"""`duda report`: figures and tables of checkpoints, evaluations and running trainings."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from duda_cli import options
from duda_cli.console import run_stage, single_process
from stages.artifacts.manifest import StageResult
from stages.figures.plots import require_matplotlib
from stages.runtime.progress import Reporter

Paths = Annotated[list[Path], typer.Argument(
    help="Checkpoint or evaluation artifacts, or the folder of a training run in progress.",
    metavar="ARTIFACT", show_default=False)]
Out = Annotated[Path, typer.Option("--out", "-o", help="Report artifact directory to write.",
                                   show_default=False)]


def register(app: typer.Typer) -> None:
    app.command("report")(report)


def report(paths: Paths, out: Out, force: options.Force = False, as_json: options.Json = False,
           quiet: options.Quiet = False) -> None:
    """Draw checkpoints, evaluations and running trainings into one self-contained page.

    OUT/index.html: training curves (runs overlaid), per-class heat maps, IoU, confusion matrices.

    OUT/comparison.md and OUT/comparison.csv: the evaluations compared class by class.

    Never runs a model: run it again to follow a live run. Needs pip install -e '.\\[report]'.
    """
    from stages import report as stage  # imported here: `duda --help` stays fast

    def run(reporter: Reporter) -> StageResult:
        single_process("duda report")
        require_matplotlib()
        return stage.run(paths, out, force=force, reporter=reporter)

    run_stage(run, what="report", table=lambda result: None, as_json=as_json, quiet=quiet)
