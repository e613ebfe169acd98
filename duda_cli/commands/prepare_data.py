"""`duda prepare-data`: build the dataset index artifact."""

from __future__ import annotations

import typer
from rich.console import Group
from rich.table import Table

from duda_cli import options
from duda_cli.console import (
    ConsoleReporter,
    default_path,
    finish,
    load,
    setup_logging,
    single_process,
    user_errors,
)


def register(app: typer.Typer) -> None:
    app.command("prepare-data")(prepare_data)


def prepare_data(config: options.Config, set_: options.Set = None, out: options.Out = None,
                 force: options.Force = False, seed: options.Seed = None,
                 data_root: options.DataRoot = None, as_json: options.Json = False,
                 quiet: options.Quiet = False) -> None:
    """Index the source and target datasets (or generate the synthetic benchmark)."""
    from stages import prepare_data as stage  # imported here: `duda --help` stays fast

    setup_logging(quiet)
    with user_errors():
        single_process("duda prepare-data")
        cfg = load(config, set_, seed, data_root)
        result = stage.run(cfg, default_path(cfg, out, "data"), force=force,
                           reporter=ConsoleReporter(quiet))
    finish(result, as_json, quiet, "dataset index", _table(result.manifest.summary))


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
