"""Option declarations shared by every command (docs/design.md#the-command-line-contract)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Config = Annotated[Path, typer.Option("--config", "-c", help="Experiment YAML (see configs/).",
                                      show_default=False)]
Set = Annotated[list[str] | None, typer.Option(
    "--set", help="Override a config value: section.key=value (repeatable).",
    show_default=False)]
Out = Annotated[Path | None, typer.Option(
    "--out", "-o",
    help="Artifact directory to write (default: under runs/<experiment>/, as `duda run` names it). "
         "A folder, not a symbolic link. While a command writes it, .NAME.lock (the one-writer "
         "lock) and, under --force, .NAME.partial sit beside it; the lock file goes when the "
         "command ends.",
    show_default=False)]
Data = Annotated[Path | None, typer.Option(
    "--data", help="Dataset index artifact (from prepare-data) (default: runs/<experiment>/data).",
    show_default=False)]
Checkpoint = Annotated[Path, typer.Option("--checkpoint", help="Checkpoint artifact to read.",
                                          show_default=False)]
Pseudo = Annotated[Path, typer.Option("--pseudo", help="Pseudo-label store artifact to read.",
                                      show_default=False)]
Force = Annotated[bool, typer.Option(
    "--force", help="Rebuild even if the output is up to date. The old artifact in --out is "
    "replaced once the new one is finished, with everything in it, files you put there "
    "included (they are named when the rebuild starts).")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run in --out.")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
Seed = Annotated[int | None, typer.Option("--seed", help="Override the config's seed.",
                                             show_default=False)]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object to stdout.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Only errors on stderr.")]
DataRoot = Annotated[Path | None, typer.Option(
    "--data-root", envvar="DUDA_DATA_ROOT",
    help="Directory that relative dataset roots in the config are resolved against.",
    show_default=False)]
