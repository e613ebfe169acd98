"""Progress and status reporting, decoupled from the console.

Stages never print. They report through a `Reporter`: `task()` for a counted loop (the CLI
draws a progress bar with ETA; elsewhere plain log lines every `log_every` steps) and `info()`
for one-off messages. The default reporter writes to the `duda` logger.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Self

logger = logging.getLogger("duda")


class Task:
    """One counted loop. `advance` takes the step count and named figures to show."""

    def __init__(self, description: str, total: int | None, completed: int = 0,
                 log_every: int = 0) -> None:
        self.description = description
        self.total = total
        self.completed = completed
        self.log_every = log_every
        self.fields: dict[str, Any] = {}
        self._start = time.monotonic()
        self._start_completed = completed

    def advance(self, steps: int = 1, **fields: Any) -> None:
        self.completed += steps
        self.fields.update(fields)
        if self.log_every and (self.completed % self.log_every == 0
                               or self.completed == self.total):
            logger.info("%s", self.status_line())

    def rate(self) -> float:
        elapsed = time.monotonic() - self._start
        done = self.completed - self._start_completed
        return done / elapsed if elapsed > 0 else 0.0

    def status_line(self) -> str:
        total = f"/{self.total}" if self.total else ""
        rate = self.rate()
        eta = ""
        if self.total and rate > 0:
            eta = f" eta {format_seconds((self.total - self.completed) / rate)}"
        figures = " ".join(f"{k}={_fmt(v)}" for k, v in self.fields.items())
        return f"{self.description} {self.completed}{total} ({rate:.2f} it/s{eta}) {figures}"

    def close(self) -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Reporter:
    """Reports to the `duda` logger; the CLI substitutes a console implementation."""

    def task(self, description: str, total: int | None, completed: int = 0,
             log_every: int = 0) -> Task:
        return Task(description, total, completed, log_every)

    def info(self, message: str) -> None:
        logger.info("%s", message)


def format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
