"""The project's error type for problems a user can fix (exit code 2 at the command line).

A `DudaError` carries one message naming the thing that is wrong and, separately, the fix.
Anything else that escapes a stage is a bug and keeps its traceback.
"""

from __future__ import annotations


class DudaError(Exception):
    """A user error: bad config, missing or incompatible artifact, malformed dataset."""

    def __init__(self, message: str, fix: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __reduce__(self) -> tuple:
        # Keep the fix when the error is sent to another process (torchrun ranks).
        return (DudaError, (self.message, self.fix))

    def __str__(self) -> str:
        return self.message if not self.fix else f"{self.message}\n  fix: {self.fix}"
