"""`duda prepare-data`: build the dataset index artifact."""

from __future__ import annotations

import typer
from rich.console import Group
from rich.table import Table

from duda_cli import options
from duda_cli.console import default_path, load, run_stage, single_process
from stages.artifacts.manifest import StageResult
from stages.runtime.progress import Reporter


def register(app: typer.Typer) -> None:
    app.command("prepare-data")(prepare_data)


def prepare_data(config: options.Config, set_: options.Set = None, out: options.Out = None,
                 force: options.Force = False, seed: options.Seed = None,
                 data_root: options.DataRoot = None, as_json: options.Json = False,
                 quiet: options.Quiet = False) -> None:
    """Index the source and target datasets (or generate the synthetic benchmark)."""
    from stages import prepare_data as stage  # imported here: `duda --help` stays fast

    def run(reporter: Reporter) -> StageResult:
        single_process("duda prepare-data")
        cfg = load(config, set_, seed, data_root)
        return stage.run(cfg, default_path(cfg, out, "prepare_data"), force=force,
                         reporter=reporter)

    run_stage(run, what="dataset index", table=lambda result: _table(result.manifest.summary),
              as_json=as_json, quiet=quiet)


def _table(summary: dict) -> Group:
    return Group(_pairs_table(summary), _shares_table(summary))


def _pairs_table(summary: dict) -> Table:
    table = Table(title="dataset index")
    for column in ("domain", "split", "layout", "pairs", "images without labels",
                   "labels without images", "left out"):
        table.add_column(column, justify="right" if column[0] in "pil" else "left")
    for row in summary.get("splits", []):
        table.add_row(row["domain"], row["split"], row["layout"], str(row["pairs"]),
                      str(row["images_without_labels"]), str(row["labels_without_images"]),
                      str(row.get("excluded", 0) + row.get("size_mismatches", 0)))
    return table


def _shares_table(summary: dict) -> Table:
    """Class pixel shares (%) per split: one row per class, one column per split."""
    table = Table(title="class pixel share (%)")
    table.add_column("class")
    rows = [row for row in summary.get("splits", []) if row.get("pixel_shares")]
    for row in rows:
        table.add_column(f"{row['domain']}/{row['split']}", justify="right")
    for name in summary.get("classes", []):
        table.add_row(name, *(f"{100 * row['pixel_shares'].get(name, 0.0):.2f}" for row in rows))
    return table
