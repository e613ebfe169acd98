"""`duda warmup`: train the source-only (optionally adversarial) warmup checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from duda_cli import options
from duda_cli.console import default_path, load, run_stage
from stages.artifacts.manifest import StageResult
from stages.runtime.progress import Reporter

Init = Annotated[Path | None, typer.Option(
    "--init", help="Initial weights (model.init): for model.name deeplabv2 a torchvision "
    "ImageNet ResNet state dict or an external DeepLabV2 checkpoint; for segformer NVlabs' "
    "ImageNet mit_b0.pth … mit_b5.pth or a DAFormer checkpoint (its model.init_weights: teacher "
    "or student); for either a duda checkpoint artifact.", show_default=False)]


def register(app: typer.Typer) -> None:
    app.command("warmup")(warmup)


def warmup(config: options.Config, data: options.Data = None, init: Init = None,
           out: options.Out = None, resume: options.Resume = False,
           force: options.Force = False, set_: options.Set = None,
           device: options.Device = "auto", seed: options.Seed = None,
           data_root: options.DataRoot = None, as_json: options.Json = False,
           quiet: options.Quiet = False) -> None:
    """Source-only supervised training (optionally with the adversarial warmup).

    Trains data-parallel on several processes with
    `torchrun --nproc_per_node N -m duda_cli warmup …`.
    """
    from stages import warmup as stage  # imported here: `duda --help` stays fast

    def run(reporter: Reporter) -> StageResult:
        cfg = load(config, set_, seed, data_root)
        return stage.run(cfg, default_path(cfg, data, "prepare_data"),
                         default_path(cfg, out, "warmup"),
                         init=init, resume=resume, force=force, device=device,
                         reporter=reporter)

    run_stage(run, what="warmup checkpoint", table=lambda result: _table(result.manifest.summary),
              as_json=as_json, quiet=quiet)


def _table(summary: dict) -> Table:
    table = Table(title="warmup")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("iterations", str(summary.get("iteration")))
    for name, value in (summary.get("final_loss") or {}).items():
        table.add_row(f"final {name}", f"{value:.4f}")
    if summary.get("miou_last") is not None:
        table.add_row("target-val mIoU (last)", f"{100 * summary['miou_last']:.2f}")
        table.add_row(f"target-val mIoU (best, iteration {summary['best_iteration']})",
                      f"{100 * summary['miou_best']:.2f}")
    return table
