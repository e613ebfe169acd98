"""`duda import-checkpoint`: an external state dict as a checkpoint artifact, with its mapping
table."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from duda_cli import options
from duda_cli.console import default_path, load, run_stage, single_process
from stages.artifacts.manifest import StageResult
from stages.runtime.errors import DudaError
from stages.runtime.progress import Reporter

Source = Annotated[Path, typer.Argument(
    help="Weights file (torch.save state dict) or duda checkpoint artifact.", show_default=False)]
ZeroBranches = Annotated[str | None, typer.Option(
    "--zero-aspp-branches", metavar="I,J",
    help="DeepLabV2 classifier branches to zero after loading; 2,3 reproduces AdaptSegNet's "
         "single-level model (its ASPP returns after branches 0 and 1).", show_default=False)]
Format = Annotated[str | None, typer.Option(
    "--format", help="Weights format, instead of detecting it from the key names: for "
                     "model.name deeplabv2 torchvision, deeplab_init, adaptsegnet, "
                     "adaptsegnet_multi, duda_reference, iast; for model.name segformer mit "
                     "(NVlabs' ImageNet mit_b0.pth … mit_b5.pth), daformer (a DAFormer "
                     "checkpoint); for either duda.",
    show_default=False)]
Weights = Annotated[str | None, typer.Option(
    "--weights", metavar="teacher|student",
    help="Which model to import from a file holding two: teacher (a DAFormer checkpoint's EMA "
         "teacher ema_model.*, a duda self-train checkpoint's mean teacher) or student (DAFormer's "
         "model.*, the model DAFormer evaluates; a duda student). Default: the config's "
         "model.init_weights (teacher unless set; a DeepLabV2 config: teacher).",
    show_default=False)]
ClassesFrom = Annotated[Path | None, typer.Option(
    "--data", help="Dataset index whose class table names the classes (default: the config's "
                   "data section: the 19 Cityscapes classes, or a folder layout's own).",
    show_default=False)]


def register(app: typer.Typer) -> None:
    app.command("import-checkpoint")(import_checkpoint)


def import_checkpoint(source: Source, config: options.Config, out: options.Out = None,
                      data: ClassesFrom = None, zero_aspp_branches: ZeroBranches = None,
                      format_: Format = None, weights: Weights = None,
                      set_: options.Set = None,
                      force: options.Force = False, seed: options.Seed = None,
                      data_root: options.DataRoot = None, as_json: options.Json = False,
                      quiet: options.Quiet = False) -> None:
    """Turn external weights into a checkpoint artifact, without training.

    The model is built from the config's model section (model.name deeplabv2: backbone, style,
    normalization; segformer: backbone, head, embedding_dim) and every tensor is mapped by name
    with a shape check; the table lists what was mapped, left unused (and why) or left as
    initialised. Of a DAFormer or duda self-train checkpoint, --weights picks the teacher or
    the student. Student and teacher of the artifact both hold the imported weights, so it is a
    --checkpoint for self-train, generate-pseudo, evaluate and predict.
    """
    from stages import import_checkpoint as stage  # imported here: `duda --help` stays fast

    def run(reporter: Reporter) -> StageResult:
        single_process("duda import-checkpoint")
        cfg = load(config, set_, seed, data_root)
        return stage.run(cfg, source, default_path(cfg, out, "import_checkpoint"), data=data,
                         zero_aspp_branches=parse_branches(zero_aspp_branches), format=format_,
                         weights=weights, force=force, reporter=reporter)

    run_stage(run, what="checkpoint", table=lambda result: _table(result.manifest.summary),
              as_json=as_json, quiet=quiet)


def parse_branches(text: str | None) -> tuple[int, ...]:
    """'2,3' -> (2, 3)."""
    if not text:
        return ()
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise DudaError(f"--zero-aspp-branches {text!r} is not a list of branch numbers",
                        "write the numbers separated by commas, e.g. --zero-aspp-branches 2,3"
                        ) from None


def _table(summary: dict) -> Table:
    which = f"the {summary['weights']} of " if summary.get("weights") else ""
    table = Table(title=f"imported {which}{summary.get('description', '')} "
                        f"({summary.get('format', '')}, {summary.get('lineage', '')} lineage)")
    table.add_column("tensors")
    table.add_column("count", justify="right")
    table.add_column("detail")
    table.add_row("mapped", str(summary.get("mapped", 0)), "copied into the model")
    unused = summary.get("unused", [])
    table.add_row("unused", str(len(unused)), "" if unused else "none")
    reasons = Counter(entry["reason"] for entry in unused)
    for reason, count in reasons.items():
        first = next(entry["key"] for entry in unused if entry["reason"] == reason)
        table.add_row("", str(count), f"{reason} (e.g. {first})")
    missing = summary.get("missing", [])
    table.add_row("missing", str(len(missing)),
                  "keep their initialisation: " + ", ".join(_groups(missing)) if missing
                  else "none")
    table.add_section()
    for line in summary.get("assumptions", []):
        table.add_row("assumption", "", line)
    return table


def _groups(keys: list[str]) -> list[str]:
    """Model keys grouped by their first two name parts: 'classifier.branches.*' (8),
    'decode_head.embed_layers.*' (8)."""
    counts = Counter(".".join(key.split(".")[:2]) for key in keys)
    return [f"{group}.* ({count})" for group, count in counts.items()]
