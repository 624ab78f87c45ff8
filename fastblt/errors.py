"""Exceptions that mean "the input or the files on disk are wrong", importable without JAX (the
CLI prints them as one line: ``fastblt: error: ...``)."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint cannot be saved or restored; the message names the step and the remedy."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """The stored tree differs from the abstract state (missing/extra leaves or other shapes)."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint's files are missing or unreadable."""


class ConfigMismatchError(CheckpointError, ValueError):
    """The checkpoint was written with another model config."""


class NonFiniteLossError(FloatingPointError):
    """A train step's loss or gradient norm is not finite; the message names the last good checkpoint."""


class DataError(ValueError):
    """A corpus file is unreadable or malformed; the message names the file (and line) to fix."""


class UsageError(Exception):
    """Bad command-line input found by a ``fastblt`` subcommand's handler (a flag's value, a missing
    prompt); printed as ``fastblt: error: ...`` with exit status 2, like argparse's own errors."""
