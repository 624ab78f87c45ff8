"""Options and flag checks shared by several ``fastblt`` subcommands.

Light on purpose: every subcommand module imports this while ``fastblt --help`` builds its parser, so it
imports no JAX (the config loader is imported inside :func:`load_config_from_args`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from fastblt.errors import UsageError

if TYPE_CHECKING:
    import ml_collections


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config SPEC`` and repeatable ``--set KEY=VALUE``, shared by every command that reads a config."""
    parser.add_argument(
        "--config",
        required=True,
        metavar="SPEC",
        help="experiment: a name in experiments/ (tiny, blt_1b) or a .py path, optionally NAME:ARG",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set model.encoder.n_heads=4; the ml-collections "
        "spelling --config.optimizer.lr=3e-4 works too",
    )


def load_config_from_args(args: argparse.Namespace) -> ml_collections.ConfigDict:
    """The config named by ``--config`` with the ``--set`` overrides applied and validated."""
    from fastblt.config import load_config

    return load_config(args.config, args.overrides)


def existing_dir(path: str, flag: str) -> Path:
    """``path`` (``~`` expanded) if it is a directory, else a :class:`UsageError` naming ``flag``."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise UsageError(f"{flag} {path}: no such directory")
    return p


def writable_dst(path: str, overwrite: bool) -> Path:
    """``--dst path`` (``~`` expanded) if it is absent or an empty directory, or ``overwrite`` is set."""
    # Checked before converting, which can take minutes, rather than only when writing.
    p = Path(path).expanduser()
    if p.exists() and (not p.is_dir() or any(p.iterdir())) and not overwrite:
        raise UsageError(f"--dst {path} exists and is not empty; pass --overwrite to replace it")
    return p
