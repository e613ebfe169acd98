"""`duda update-offline`: a whole-set offline update, written as a new store version."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from duda_cli import options
from duda_cli.console import default_path, load, run_stage
from stages.artifacts.manifest import StageResult
from stages.runtime.progress import Reporter


def register(app: typer.Typer) -> None:
    app.command("update-offline")(update_offline)


def update_offline(config: options.Config, checkpoint: options.Checkpoint,
                   pseudo: options.Pseudo, data: options.Data = None, out: options.Out = None,
                   force: options.Force = False, set_: options.Set = None,
                   device: options.Device = "auto", seed: options.Seed = None,
                   data_root: options.DataRoot = None, as_json: options.Json = False,
                   quiet: options.Quiet = False) -> None:
    """Merge a teacher's predictions into a pseudo-label store (docs/method.md#the-offline-update).

    Runs on several processes with `torchrun --nproc_per_node N duda update-offline …`.
    """
    from stages import update_offline as stage  # imported here: `duda --help` stays fast

    def run(reporter: Reporter) -> StageResult:
        cfg = load(config, set_, seed, data_root)
        return stage.run(cfg, default_path(cfg, data, "prepare_data"), checkpoint, pseudo,
                         default_path(cfg, out, "update_offline"), force=force, device=device,
                         reporter=reporter)

    run_stage(run, what="pseudo-label store",
              table=lambda result: _table(result.path, result.manifest.summary),
              as_json=as_json, quiet=quiet)


def _table(path: Path, summary: dict) -> Table:
    """One column per category of the offline update (`CHANGES`); a category the store's
    version of duda did not count shows 0."""
    from stages.method.offline import CHANGES, complete_changes  # imported by the stage already

    where = f"pseudo-label store {path}"
    table = Table(title="offline update per class (pixels)")
    table.add_column("class")
    for key in CHANGES:
        table.add_column(key, justify="right")
    for name, row in summary.get("per_class", {}).items():
        row = complete_changes(row, 0, f"{where} (class {name})")
        if any(row.values()):
            table.add_row(name, *(f"{row[key]:,}" for key in CHANGES))
    totals = complete_changes(summary.get("changes", {}), 0, where)
    table.add_row("all", *(f"{totals[key]:,}" for key in CHANGES))
    return table
