"""``fastblt config``: print an experiment config (fastblt/config/) after overrides and validation."""

from __future__ import annotations

import argparse

from fastblt.cli_options import add_config_arguments, load_config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``fastblt config`` to the ``fastblt`` parser."""
    parser = subparsers.add_parser(
        "config",
        help="print an experiment config after overrides and validation",
        description="Loads --config with its --set overrides, validates it and prints it.",
    )
    add_config_arguments(parser)
    parser.set_defaults(run=_run_config)


def _run_config(args: argparse.Namespace) -> None:
    print(load_config_from_args(args))
