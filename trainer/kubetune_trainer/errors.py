"""Errors that end a run with a one-line reason a user can act on.

Each carries only a message (so it pickles across Ray processes unchanged), and the message names the
field or the s3:// URI at fault. Anything else escaping the trainer is a bug and is shown with its type.
"""

from __future__ import annotations


def first_line(error: BaseException, limit: int = 300) -> str:
    """`Type: message` of an error that is not ours (a library's, possibly many lines), as one bounded line."""
    lines = f"{type(error).__name__}: {error}".strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:limit]


class TrainerError(Exception):
    """A run cannot continue; str(error) is the one-line reason."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[type[TrainerError], tuple[str]]:
        return (type(self), (self.message,))


class ConfigError(TrainerError):
    """The configuration cannot work (unknown architecture, class count mismatch…)."""


class StorageError(TrainerError):
    """An S3 object or bucket is missing or not accessible."""


class CheckpointError(TrainerError):
    """The base weights cannot be loaded safely into the architecture."""


class DataError(TrainerError):
    """The dataset is empty, malformed or has too many unreadable images."""


class UnsafeNameError(TrainerError):
    """A remote name (an S3 key, a COCO file_name) that would not stay inside its local folder."""


class PreemptedError(TrainerError):
    """The driver was told to go (SIGTERM): the run stops, to be resumed from the checkpoint it saved."""

    exit_code = 143  # 128 + SIGTERM, as a process ended by the signal would report


# Ray Train's header line above a failure's cause; the cause is the line worth showing.
RAY_FAILURE_HEADER = "Training failed due to"


def error_line(error: BaseException, *, with_type: bool = False) -> str:
    """One line for an unexpected error, at most 300 characters: its last non-blank line (Ray puts the cause
    last), prefixed with its type when `with_type`; its type alone when it has no text."""
    lines = [line for line in str(error).splitlines() if line.strip() and not line.startswith(RAY_FAILURE_HEADER)]
    last = lines[-1].strip() if lines else ""
    if with_type:
        return f"{type(error).__name__}: {last}"[:300]
    return (last or type(error).__name__)[:300]
