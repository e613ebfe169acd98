"""The Typer application: `duda <command>`. Each command lives in `duda_cli/commands/`."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from duda_cli.commands import (
    config_cmd,
    evaluate,
    generate_pseudo,
    import_checkpoint,
    predict,
    prepare_data,
    pseudo,
    report,
    run_cmd,
    self_train,
    update_offline,
    warmup,
)
from stages import __version__
from stages.artifacts.writer import command_line

app = typer.Typer(
    name="duda",
    help="Online-offline dual domain adaptation (DUDA) for semantic segmentation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        print(f"duda {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Online-offline dual domain adaptation (DUDA) for semantic segmentation."""


run_cmd.register(app)
prepare_data.register(app)
warmup.register(app)
generate_pseudo.register(app)
self_train.register(app)
update_offline.register(app)
evaluate.register(app)
import_checkpoint.register(app)
predict.register(app)
pseudo.register(app)
report.register(app)
app.add_typer(config_cmd.app, name="config")


def main() -> None:
    # Recorded in the marker of every output the command creates, so that an unfinished one
    # can print the command that continues it (docs/design.md#writing-an-artifact-safely).
    command_line.set(["duda", *sys.argv[1:]])
    app()
