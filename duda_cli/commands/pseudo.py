"""`duda pseudo export|import|show`: pseudo-label stores to and from PNG folders, and inspection."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from duda_cli import options
from duda_cli.console import (
    ConsoleReporter,
    default_path,
    finish,
    load,
    setup_logging,
    stderr,
    user_errors,
)

app = typer.Typer(help="Export, import and inspect pseudo-label stores.", no_args_is_help=True)

Store = Annotated[Path, typer.Argument(help="Pseudo-label store artifact.", show_default=False)]


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="pseudo")


@app.command("export")
def export(store: Store,
           directory: Annotated[Path, typer.Argument(help="Folder to write <id>.png into.",
                                                     show_default=False)],
           colour: Annotated[bool, typer.Option(
               "--colour", help="Palette PNGs (the pixel values stay trainIds).")] = False,
           quiet: options.Quiet = False) -> None:
    """Write one label PNG per image: trainIds, 255 = ignore."""
    from stages.pseudo import export
    from stages.store.pseudo_store import open_store

    setup_logging(quiet)
    with user_errors():
        count = export(open_store(store), directory, colour, ConsoleReporter(quiet))
    if not quiet:
        stderr.print(f"wrote {count} label PNGs to {directory}", highlight=False)


@app.command("import")
def import_(directory: Annotated[Path, typer.Argument(
                help="Folder of label PNGs named like the target-train images.",
                show_default=False)],
            data: options.Data = None, out: options.Out = None,
            config: Annotated[Path | None, typer.Option(
                "--config", "-c", help="Experiment YAML (for the default --data and --out).",
                show_default=False)] = None,
            force: options.Force = False, data_root: options.DataRoot = None,
            as_json: options.Json = False, quiet: options.Quiet = False) -> None:
    """Build a pseudo-label store from label PNGs (e.g. published initial labels)."""
    from stages import pseudo
    from stages.runtime.errors import DudaError

    setup_logging(quiet)
    with user_errors():
        cfg = load(config, None, None, data_root) if config is not None else None
        if cfg is None and (data is None or out is None):
            raise DudaError("--data and --out are needed without --config",
                            "pass --data DATA --out STORE, or -c CONFIG for the defaults")
        data_path = data if cfg is None else default_path(cfg, data, "prepare_data")
        out_path = out if cfg is None else default_path(cfg, out, "pseudo_import")
        result = pseudo.run(directory, data_path, out_path, force=force,
                               reporter=ConsoleReporter(quiet))
    finish(result, as_json, quiet, "pseudo-label store")


@app.command("show")
def show(store: Store, data: Annotated[Path | None, typer.Option(
             "--data", help="Dataset index: check the store against it and, where target-train "
             "has ground truth, report the labels' quality.", show_default=False)] = None,
         images: Annotated[int, typer.Option(
             "--images", min=1, help="With --data and --out: draw the first N images.")] = 8,
         out: Annotated[Path | None, typer.Option(
             "--out", "-o", help="With --data: write image | labels | confidence | ground "
             "truth panels of the first --images images here (a new or empty folder).",
             show_default=False)] = None,
         as_json: options.Json = False, quiet: options.Quiet = False) -> None:
    """Print a store's lineage, thresholds, per-class coverage and (with --data) quality;
    with --out, draw its labels and confidence over the first images."""
    from dataclasses import asdict

    from stages.artifacts.manifest import PSEUDO_LABELS, lineage
    from stages.data.index import load_dataset_index
    from stages.engine.metrics import quality
    from stages.pseudo import overlays
    from stages.runtime.errors import DudaError
    from stages.store.pseudo_store import open_store

    setup_logging(quiet)
    with user_errors():
        if out is not None and data is None:
            raise DudaError("--out draws the images, which needs the dataset index",
                            "add --data DATA (the prepare-data artifact)")
        index = load_dataset_index(data) if data is not None else None
        opened = open_store(store, index)
        drawn = (overlays(opened, index, out, images, ConsoleReporter(quiet))
                 if out is not None and index is not None else [])
        chain = [asdict(entry) for entry in lineage(store, PSEUDO_LABELS)]
        report = {
            "store": str(store), "images": len(opened), "label_size": [opened.height,
                                                                       opened.width],
            "index_id": opened.index_id, "selector": opened.selector,
            "thresholds": opened.thresholds, "statistics": opened.statistics,
            "lineage": chain,
            "quality": quality(opened, index, ConsoleReporter(True)) if index else None,
            "overlays": [str(path) for path in drawn],
        }
    if as_json:
        print(json.dumps(report))
        return
    _print_report(report, opened.class_names)


def _print_report(report: dict, names: list[str]) -> None:
    stderr.print(f"[bold]{report['store']}[/]: {report['images']} images at "
                 f"{report['label_size'][0]}×{report['label_size'][1]}, dataset index "
                 f"{report['index_id']}, selector {report['selector']}", highlight=False)
    stderr.print("[bold]lineage[/] (newest first):")
    for entry in report["lineage"]:
        if not entry.get("found"):
            stderr.print(f"  (not found) {entry['path']}", highlight=False, soft_wrap=True)
            continue
        made_from = ", ".join(entry["checkpoints"]) or "its parent"
        stderr.print(f"  {entry['id']}  {entry['stage']} (round {entry['round']}, "
                     f"{entry['created']}) from {made_from}: {entry['path']}",
                     highlight=False, soft_wrap=True)
    statistics = report["statistics"] or {}
    quality = report["quality"]
    table = Table(title=f"per class ({100 * statistics.get('labelled_fraction', 0):.1f}% of "
                        "pixels labelled)",
                  caption=("precision / recall / coverage: diagnostics against target-train "
                           f"ground truth ({quality['images']} images), never used for "
                           "training") if quality else None)
    for column in ("class", "threshold", "share of pixels %"):
        table.add_column(column, justify="left" if column == "class" else "right")
    if quality:
        for column in ("precision %", "recall %", "coverage %"):
            table.add_column(column, justify="right", style="dim")
    thresholds = report["thresholds"]
    coverage = statistics.get("coverage")
    for c, name in enumerate(names):
        cells = [name, f"{thresholds[c]:.3f}" if thresholds else "–",
                 f"{100 * coverage[c]:.2f}" if coverage else "–"]
        if quality:
            row = quality["per_class"][name]
            cells += ["–" if row[key] is None else f"{100 * row[key]:.1f}"
                      for key in ("precision", "recall", "coverage")]
        table.add_row(*cells)
    stderr.print(table)
    if report["overlays"]:
        folder = Path(report["overlays"][0]).parent
        stderr.print(f"{len(report['overlays'])} overlays (image | labels | confidence | ground "
                     f"truth) in {folder}", highlight=False, soft_wrap=True)
