"""`duda predict`: segment a folder of images or a dataset split into prediction PNGs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from duda_cli import options
from duda_cli.console import default_path, load, run_stage, single_process
from stages.artifacts.manifest import StageResult
from stages.runtime.progress import Reporter

Images = Annotated[Path | None, typer.Option(
    "--images", help="Folder of images to segment (searched recursively; outputs are named by "
                     "each image's file stem).", show_default=False)]
Split = Annotated[str | None, typer.Option(
    "--split", help="Segment this split of the dataset index (--data) instead of a folder.",
    show_default=False)]
Domain = Annotated[str, typer.Option(
    "--domain", help="Domain of --split (source or target); its base size is the inference size "
                     "unless evaluate.size is set.")]
Data = Annotated[Path | None, typer.Option(
    "--data", help="Dataset index: the one --split reads (default: runs/<experiment>/data); with "
                   "--images only needed for evaluate.recalibrate_bn.", show_default=False)]
Formats = Annotated[str, typer.Option(
    "--format", help="Comma-separated outputs, each a subfolder of --out: trainid (class "
                     "indices), labelid (Cityscapes label ids, for the 19-class table only), "
                     "color (palette RGB), confidence (255 × max probability).")]


def register(app: typer.Typer) -> None:
    app.command("predict")(predict)


def predict(config: options.Config, checkpoint: options.Checkpoint, images: Images = None,
            split: Split = None, data: Data = None, domain: Domain = "target",
            formats: Formats = "trainid,color", set_: options.Set = None,
            out: options.Out = None, force: options.Force = False,
            device: options.Device = "auto", seed: options.Seed = None,
            data_root: options.DataRoot = None, as_json: options.Json = False,
            quiet: options.Quiet = False) -> None:
    """Segment images with a checkpoint, as evaluate does, into one PNG per image and format.

    Inference follows the config's evaluate section (size, sliding window, flip, teacher or
    student, BN recalibration); each PNG has its input image's size and file stem, so a
    Cityscapes split gives names the Cityscapes evaluator matches.
    """
    from stages import predict as stage  # imported here: `duda --help` stays fast

    def run(reporter: Reporter) -> StageResult:
        single_process("duda predict")
        stage.parse_formats(formats)  # an unknown word is refused before the config is read
        cfg = load(config, set_, seed, data_root)
        index = default_path(cfg, data, "prepare_data") if split is not None else data
        return stage.run(cfg, checkpoint, default_path(cfg, out, "predict"), images=images,
                         data=index, split=split, domain=domain,  # type: ignore[arg-type]
                         formats=formats, force=force, device=device, reporter=reporter)

    run_stage(run, what="predictions", table=lambda result: _table(result.manifest.summary),
              as_json=as_json, quiet=quiet)


def _table(summary: dict) -> Table:
    table = Table(title=f"{summary.get('images', 0)} images segmented by the "
                        f"{summary.get('model', '')}")
    table.add_column("setting")
    table.add_column("value")
    table.add_row("formats", ", ".join(summary.get("formats", [])))
    table.add_row("from", str(summary.get("source", "")))
    table.add_row("inference size", " × ".join(map(str, summary.get("size", []))))
    table.add_row("flip", "yes" if summary.get("flip") else "no")
    window = summary.get("sliding_window")
    table.add_row("sliding window", " × ".join(map(str, window["window"])) if window else "no")
    table.add_row("BN recalibrated", "yes" if summary.get("bn_recalibration") else "no")
    return table
