"""The ``fastblt`` command: the top-level parser built from :data:`COMMANDS`, and :func:`main`.

Each subcommand lives beside the code it runs, in a module with ``register(subparsers)``, which adds
its parser and sets ``run`` (the handler, called with the parsed arguments):

    config_command.py              fastblt config       (fastblt/config/)
    io/convert_command.py          fastblt convert      (io/huggingface.py, io/export.py)
    train/command.py               fastblt train        (train/)
    data/preprocess_command.py     fastblt preprocess   (data/preprocess.py)
    io/export_command.py           fastblt export       (io/export.py)
    sampler/command.py             fastblt sample       (sampler/)
    evaluation/command.py          fastblt eval         (evaluation/)
    launch/command.py              fastblt launch       (launch/)
    launch/sweep_command.py        fastblt sweep        (launch/sweep.py)
    train/compile_command.py       fastblt compile      (train/aot.py)

Options and checks that several subcommands share (``--config``/``--set``, directory flags) are in
cli_options.py. A new command is a ``register`` function in such a module, added to :data:`COMMANDS`::

    def register(subparsers):
        parser = subparsers.add_parser("train", help="...")
        add_config_arguments(parser)
        parser.set_defaults(run=_run_train)

Command modules import only argparse-level code at module level, and handlers import what they need
(JAX, the model) inside, so that ``fastblt --help`` starts instantly.

Errors in user input (a missing path, a bad config key, a malformed corpus file) print
``fastblt: error: ...`` and exit with status 2 (``--debug`` or ``FASTBLT_DEBUG=1``: with the
traceback); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from fastblt import __version__, config_command
from fastblt.compile_cache import empty_jax_dir_is_off
from fastblt.config import ConfigError
from fastblt.data import preprocess_command
from fastblt.errors import CheckpointError, DataError, NonFiniteLossError, UsageError
from fastblt.evaluation import command as eval_command
from fastblt.io import convert_command, export_command
from fastblt.launch import command as launch_command
from fastblt.launch import sweep_command
from fastblt.sampler import command as sample_command
from fastblt.train import command as train_command
from fastblt.train import compile_command

DEBUG_ENV = "FASTBLT_DEBUG"
Register = Callable[[argparse._SubParsersAction], None]

# Every subcommand, in the order `fastblt --help` lists them.
COMMANDS: tuple[Register, ...] = (
    config_command.register,
    convert_command.register,
    train_command.register,
    preprocess_command.register,
    export_command.register,
    sample_command.register,
    eval_command.register,
    launch_command.register,
    sweep_command.register,
    compile_command.register,
)

# Exceptions that mean "the input is wrong", reported in one line without a traceback. ConfigError
# covers fastblt.io.export.ExportError, which subclasses it; CheckpointError a workdir whose
# checkpoints do not fit the config or cannot be read.
_USER_ERRORS = (
    ConfigError,
    CheckpointError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    NonFiniteLossError,  # the run diverged; the message names the step and the last good checkpoint
    DataError,  # a corpus file's content (also when a grain worker reads it: grain re-raises it)
)


def build_parser() -> argparse.ArgumentParser:
    """The ``fastblt`` parser with every subcommand of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(prog="fastblt", description="Train and serve Byte Latent Transformers.")
    parser.add_argument("--version", action="version", version=f"fastblt {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"show the traceback of input errors too (or set {DEBUG_ENV}=1)",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in COMMANDS:
        register(subparsers)
    return parser


def config_flag_overrides(argv: Sequence[str]) -> list[str]:
    """Rewrites ml-collections style ``--config.a.b=v`` / ``--config.a.b v`` into ``--set a.b=v``."""
    out: list[str] = []
    items = list(argv)
    i = 0
    while i < len(items):
        item = items[i]
        if item.startswith("--config.") and len(item) > len("--config."):
            key, eq, value = item[len("--config.") :].partition("=")
            if not eq:
                if i + 1 >= len(items):
                    raise SystemExit(f"fastblt: error: {item} needs a value (--config.{key}=VALUE)")
                i += 1
                value = items[i]
            out += ["--set", f"{key}={value}"]
        else:
            out.append(item)
        i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command in ``argv`` (default: ``sys.argv[1:]``); returns 0, or exits 2 on bad input."""
    parser = build_parser()
    args = parser.parse_args(config_flag_overrides(sys.argv[1:] if argv is None else argv))
    empty_jax_dir_is_off()  # before a command imports JAX
    try:
        args.run(args)
    except (UsageError, *_USER_ERRORS) as e:
        if args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        parser.exit(2, f"fastblt: error: {e}\n")
    return 0


# `python -m fastblt.cli` is how sweeps and the benchmark scripts start `fastblt train`.
if __name__ == "__main__":
    sys.exit(main())
