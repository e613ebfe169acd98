"""`duda self-train`: DUDA mean-teacher self-training with online and offline pseudo labels."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from duda_cli import options
from duda_cli.console import default_path, load, run_stage
from stages.artifacts.manifest import StageResult
from stages.runtime.progress import Reporter


def register(app: typer.Typer) -> None:
    app.command("self-train")(self_train)


def self_train(config: options.Config, checkpoint: options.Checkpoint, pseudo: options.Pseudo,
               data: options.Data = None, out: options.Out = None,
               resume: options.Resume = False, force: options.Force = False,
               set_: options.Set = None, device: options.Device = "auto",
               seed: options.Seed = None, data_root: options.DataRoot = None,
               as_json: options.Json = False, quiet: options.Quiet = False) -> None:
    """Self-train from a checkpoint on a pseudo-label store; writes RUN and RUN/pseudo.

    Trains data-parallel on several processes with
    `torchrun --nproc_per_node N -m duda_cli self-train …`.
    """
    from stages import self_train as stage  # imported here: `duda --help` stays fast

    def run(reporter: Reporter) -> StageResult:
        cfg = load(config, set_, seed, data_root)
        return stage.run(cfg, default_path(cfg, data, "prepare_data"), checkpoint, pseudo,
                         default_path(cfg, out, "self_train"), resume=resume, force=force,
                         device=device, reporter=reporter)

    run_stage(run, what="self-train run (offline store in RUN/pseudo)",
              table=lambda result: _table(result.path, result.manifest.summary),
              as_json=as_json, quiet=quiet)


def _table(path: Path, summary: dict) -> Table:
    from stages.method.offline import complete_changes  # the stage has imported it already

    table = Table(title=f"self-train {path}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("iterations", str(summary.get("iteration")))
    table.add_row("teacher", str(summary.get("teacher")))
    if summary.get("offline_changes") is not None:  # every category; 0: not counted yet
        changes = complete_changes(summary["offline_changes"], 0, f"self-train run {path}")
        for key, value in changes.items():
            table.add_row(f"offline update: pixels {key}", f"{value:,}")
    if summary.get("miou_last") is not None:
        table.add_row("teacher target-val mIoU (last)", f"{100 * summary['miou_last']:.2f}")
        table.add_row(f"teacher target-val mIoU (best, iteration {summary['best_iteration']})",
                      f"{100 * summary['miou_best']:.2f}")
    return table
