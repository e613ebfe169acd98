"""Console output for the commands: errors, progress bars, tables, `--json`.

Human output goes to stderr; `--json` prints one object to stdout. `DudaError` becomes one
message and exit code 2, and so does a write that the disk or folder refuses (full, over quota,
read-only) wherever it happens; anything else is a bug and keeps its traceback (exit 1).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from stages.artifacts.manifest import StageResult, default_name
from stages.artifacts.writer import NO_SPACE, write_failure
from stages.config import Config, load_config
from stages.runtime.errors import DudaError
from stages.runtime.progress import Reporter, Task

stderr = Console(stderr=True)


def rank() -> int:
    """This process's rank under torchrun (0 otherwise)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """The number of processes torchrun started (1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def single_process(command: str) -> None:
    """Refuse a launch by torchrun of a command that runs in one process."""
    if world_size() > 1:
        raise DudaError(f"`{command}` runs in one process; torchrun started {world_size()}",
                        "launch it without torchrun (warmup, self-train, generate-pseudo, "
                        "update-offline and evaluate are the commands that run on several "
                        "processes)")


@contextlib.contextmanager
def distributed_exit() -> Iterator[None]:
    """Under torchrun, end every worker with os._exit once the stage has ended its process
    group: a plain interpreter exit after gloo sometimes aborts with SIGABRT, which makes
    torchrun report a failure. Single-process runs are left alone."""
    if world_size() <= 1:
        yield
        return
    code = 0
    try:
        yield
    except typer.Exit as exit_:
        code = exit_.exit_code
    except BaseException:  # noqa: BLE001 - a bug: print the traceback, exit 1
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn a `DudaError` into one message on stderr and exit code 2."""
    try:
        yield
    except DudaError as error:
        _print_error(error)
        raise typer.Exit(2) from None
    except OSError as error:
        # A full disk or a read-only mount is the user's to fix wherever a write meets it
        # (docs/design.md#errors-and-exit-codes); writers inside an artifact already say so.
        failure = write_failure(error, Path(error.filename or ".").parent) if error.errno in (
            *NO_SPACE, errno.EROFS) else None
        if failure is None:
            raise
        _print_error(failure)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        if rank():  # Ctrl-C reaches every rank; rank 0 says it once
            raise typer.Exit(130) from None
        stderr.print("\ninterrupted: an output without its manifest.json is unfinished and never "
                     "used as input; warmup and self-train continue from their last checkpoint "
                     "with --resume", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None


def _print_error(error: DudaError) -> None:
    where = f"[rank {rank()}] " if rank() else ""  # torchrun: every rank reports
    stderr.print(f"{where}[bold red]error:[/] {escape(error.message)}", highlight=False,
                 markup=True, soft_wrap=True)
    if error.fix:
        stderr.print(f"[bold]fix:[/] {escape(error.fix)}", highlight=False, soft_wrap=True)


def setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("duda")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


def load(config: Path, overrides: list[str] | None, seed: int | None,
         data_root: Path | None) -> Config:
    overrides = list(overrides or [])
    if seed is not None:
        overrides.append(f"seed={seed}")
    return load_config(config, overrides, data_root)


def default_path(config: Config, given: Path | None, stage: str) -> Path:
    """`given`, or runs/<experiment>/<the stage's artifact name> (as `duda run` names it)."""
    return given if given is not None else Path("runs") / config.experiment / default_name(stage)


class _RichTask(Task):
    def __init__(self, progress: Progress, description: str, total: int | None,
                 completed: int) -> None:
        super().__init__(description, total, completed)
        self._progress = progress
        self._id = progress.add_task(description, total=total, completed=completed, info="")

    def advance(self, steps: int = 1, **fields: Any) -> None:
        super().advance(steps, **fields)
        info = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in self.fields.items())
        self._progress.update(self._id, advance=steps, info=info)

    def close(self) -> None:
        self._progress.stop()


class ConsoleReporter(Reporter):
    """A rich progress bar on a terminal; plain periodic log lines otherwise."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def task(self, description: str, total: int | None, completed: int = 0,
             log_every: int = 0) -> Task:
        if self.quiet or not stderr.is_terminal:
            return Task(description, total, completed,
                        log_every=0 if self.quiet else (log_every or _default_every(total)))
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TimeRemainingColumn(),
                            TextColumn("{task.fields[info]}"), console=stderr, transient=False)
        progress.start()
        return _RichTask(progress, description, total, completed)

    def info(self, message: str) -> None:
        if not self.quiet:
            stderr.print(message, highlight=False, markup=False)


def _default_every(total: int | None) -> int:
    return max(1, (total or 100) // 10)


def run_stage(run: Callable[[Reporter], StageResult], *, what: str,
              table: Callable[[StageResult], Table | None], as_json: bool,
              quiet: bool) -> None:
    """The body of every stage command, in one process or under torchrun: logging and progress
    on rank 0 only, a `DudaError` as one message and exit 2, a torchrun-safe exit, and the
    result (`what`, its `table`) printed by rank 0. `run(reporter)` loads the config and runs
    the stage."""
    main = rank() == 0
    setup_logging(quiet or not main)
    with distributed_exit():
        with user_errors():
            result = run(ConsoleReporter(quiet or not main))
        if main:
            with user_errors():  # a table reads the summary: an unreadable one is exit 2 too
                finish(result, as_json, quiet, what, table(result))


def finish(result: StageResult, as_json: bool, quiet: bool, what: str,
           table: Table | None = None) -> None:
    """Print the artifact path (and its headline table), or the JSON object."""
    summary = result.manifest.summary
    if as_json:
        print(json.dumps({"artifact": str(result.path), "up_to_date": result.up_to_date,
                          "summary": summary}))
        return
    if quiet:
        return
    if table is not None:
        stderr.print(table)
    if result.up_to_date:
        stderr.print(f"{what} is up to date (same config and inputs): {result.path}",
                     highlight=False, soft_wrap=True)
    else:
        stderr.print(f"wrote {what}: {result.path}", highlight=False, soft_wrap=True)
