"""`duda evaluate`: mIoU of a checkpoint on a labelled split, with a per-class table."""

from __future__ import annotations

import typer
from rich.table import Table

from duda_cli import options
from duda_cli.console import default_path, load, run_stage
from stages.artifacts.manifest import StageResult
from stages.runtime.progress import Reporter


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate)


def evaluate(config: options.Config, checkpoint: options.Checkpoint, data: options.Data = None,
             set_: options.Set = None, out: options.Out = None, force: options.Force = False,
             device: options.Device = "auto", seed: options.Seed = None,
             data_root: options.DataRoot = None, as_json: options.Json = False,
             quiet: options.Quiet = False) -> None:
    """Evaluate a checkpoint (teacher or student) on target-val: mIoU per protocol, IoU per class.

    Runs on several processes with `torchrun --nproc_per_node N -m duda_cli evaluate …`.
    """
    from stages import evaluate as stage  # imported here: `duda --help` stays fast

    def run(reporter: Reporter) -> StageResult:
        cfg = load(config, set_, seed, data_root)
        return stage.run(cfg, default_path(cfg, data, "prepare_data"), checkpoint,
                         default_path(cfg, out, "evaluate"), force=force, device=device,
                         reporter=reporter)

    run_stage(run, what="evaluation", table=lambda result: _table(result.manifest.summary),
              as_json=as_json, quiet=quiet)


def _table(summary: dict) -> Table:
    table = Table(title=f"{summary.get('model', '')} on {summary.get('domain', '')}/"
                        f"{summary.get('split', '')} ({summary.get('images', 0)} images)")
    table.add_column("class")
    table.add_column("IoU %", justify="right")
    for name, iou in summary.get("per_class", {}).items():
        table.add_row(name, f"{100 * iou:.1f}")
    table.add_section()
    headline = str(summary.get("primary_protocol", ""))
    for protocol, miou in summary.get("miou_by_protocol", {}).items():
        name = f"mIoU-{protocol}" + (" (headline)" if str(protocol) == headline else "")
        table.add_row(name, f"{100 * miou:.1f}", style="bold")
    return table
