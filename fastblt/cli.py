"""The ``fastblt`` command.

Each subcommand is one function decorated with :func:`subcommand` that adds its parser to the
subparsers and sets ``run`` (the handler, called with the parsed arguments). Handlers import what they
need (JAX, the model) inside, so that ``fastblt --help`` starts instantly. A new command is::

    @subcommand
    def _train(subparsers):
        parser = subparsers.add_parser("train", help="...")
        add_config_arguments(parser)
        parser.set_defaults(run=_run_train)

Errors in user input (a missing path, a bad config key) print ``fastblt: error: ...`` and exit with
status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fastblt import __version__
from fastblt.config import DTYPES, ConfigError

if TYPE_CHECKING:
    import ml_collections

Register = Callable[[argparse._SubParsersAction], None]
_COMMANDS: list[Register] = []

# Exceptions that mean "the input is wrong", reported in one line without a traceback. ConfigError
# covers fastblt.export.ExportError, which subclasses it.
_USER_ERRORS = (ConfigError, FileNotFoundError, FileExistsError, NotADirectoryError)


class UsageError(Exception):
    """Raised by handlers for bad command-line input; printed as ``fastblt: error: ...``."""


def subcommand(register: Register) -> Register:
    """Registers a function that adds one subcommand's parser (see the module docstring)."""
    _COMMANDS.append(register)
    return register


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
    from fastblt.configs import load_config

    return load_config(args.config, args.overrides)


def _existing_dir(path: str, flag: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise UsageError(f"{flag} {path}: no such directory")
    return p


def _writable_dst(path: str, overwrite: bool) -> Path:
    # Checked before converting, which can take minutes, rather than only when writing.
    p = Path(path).expanduser()
    if p.exists() and (not p.is_dir() or any(p.iterdir())) and not overwrite:
        raise UsageError(f"--dst {path} exists and is not empty; pass --overwrite to replace it")
    return p


# ---------------------------------------------------------------------------------------------------------
# fastblt config
# ---------------------------------------------------------------------------------------------------------


@subcommand
def _config(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "config",
        help="print an experiment config after overrides and validation",
        description="Loads --config with its --set overrides, validates it and prints it.",
    )
    add_config_arguments(parser)
    parser.set_defaults(run=_run_config)


def _run_config(args: argparse.Namespace) -> None:
    print(load_config_from_args(args))


# ---------------------------------------------------------------------------------------------------------
# fastblt convert
# ---------------------------------------------------------------------------------------------------------


@subcommand
def _convert(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert between Hugging Face checkpoints and fastblt exports",
        description="Converts model weights between Hugging Face (BltForCausalLM) and fastblt exports.",
    )
    directions = parser.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    to_orbax = directions.add_parser(
        "hf-to-orbax",
        help="Hugging Face checkpoint directory -> fastblt export",
        description="Reads a Hugging Face BLT checkpoint (config.json + safetensors) and writes a fastblt export.",
    )
    to_orbax.add_argument("--src", required=True, metavar="DIR", help="Hugging Face checkpoint directory")
    to_orbax.add_argument("--dst", required=True, metavar="DIR", help="export directory to write")
    to_orbax.add_argument("--dtype", choices=DTYPES, help="cast floating-point weights (default: keep)")
    to_orbax.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
    to_orbax.set_defaults(run=_run_hf_to_orbax)

    to_hf = directions.add_parser(
        "orbax-to-hf",
        help="fastblt export -> Hugging Face checkpoint directory",
        description="Reads a fastblt export and writes a Hugging Face BLT checkpoint directory.",
    )
    to_hf.add_argument("--src", required=True, metavar="DIR", help="fastblt export directory")
    to_hf.add_argument("--dst", required=True, metavar="DIR", help="Hugging Face directory to write")
    to_hf.add_argument("--overwrite", action="store_true", help="write into a non-empty --dst")
    to_hf.set_defaults(run=_run_orbax_to_hf)


def _run_hf_to_orbax(args: argparse.Namespace) -> None:
    src = _existing_dir(args.src, "--src")
    _writable_dst(args.dst, args.overwrite)
    from fastblt import convert
    from fastblt.export import param_count, save_export

    config, params = convert.from_hf(src)
    dst = save_export(args.dst, config, params, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {dst} ({param_count(params):,} parameters)")


def _run_orbax_to_hf(args: argparse.Namespace) -> None:
    src = _existing_dir(args.src, "--src")
    dst = _writable_dst(args.dst, args.overwrite)
    from fastblt import convert
    from fastblt.export import param_count
    from fastblt.loading import load_model

    config, params = load_model(src)
    convert.to_hf(config, params, dst)
    print(f"wrote {dst} ({param_count(params):,} parameters)")


@subcommand
def _train(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train from an experiment config; resumes from the latest checkpoint in --workdir",
        description="Trains the config's model. An entropy-patched BLT trains its entropy model first "
        "(stage 1, in WORKDIR/entropy) unless entropy_stage.checkpoint names one, then BLT (WORKDIR/blt).",
    )
    add_config_arguments(parser)
    parser.add_argument("--workdir", required=True, help="checkpoints, TensorBoard events and logs go here")
    parser.add_argument(
        "--coordinator", help="multi-process: HOST:PORT of process 0 (or FASTBLT_COORDINATOR)"
    )
    parser.add_argument("--num-processes", type=int, help="multi-process: number of processes")
    parser.add_argument("--process-id", type=int, help="multi-process: this process's id")
    parser.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> None:
    config = load_config_from_args(args)
    from fastblt import distributed

    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    from fastblt.train import run

    run(config, str(Path(args.workdir).expanduser()))


@subcommand
def _preprocess(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "preprocess",
        help="write a config's corpus as a tensorstore (zarr) corpus for random access at scale",
    )
    add_config_arguments(parser)
    parser.add_argument("--dst", required=True, help="output directory (must not exist unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing corpus at --dst")
    parser.add_argument(
        "--entropy-workdir",
        help="also store next-byte entropies from the entropy model trained in this workdir",
    )
    parser.set_defaults(run=_run_preprocess)


def _run_preprocess(args: argparse.Namespace) -> None:
    config = load_config_from_args(args)
    from fastblt.data.preprocess import preprocess

    entropy_fn = None
    if args.entropy_workdir:
        from fastblt.train import entropy_function

        entropy_fn = entropy_function(config, str(_existing_dir(args.entropy_workdir, "--entropy-workdir")))
    preprocess(config.data, args.dst, entropy_fn=entropy_fn, overwrite=args.overwrite)


@subcommand
def _export(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write an inference export (params + config.json, Orbax) from a training workdir",
    )
    parser.add_argument("--workdir", required=True, help="a BLT training workdir (or a two-stage run's root)")
    parser.add_argument("--step", type=int, help="the checkpoint step (default: the latest)")
    parser.add_argument("--dst", required=True, help="the export directory to write")
    parser.add_argument("--dtype", choices=DTYPES, help="cast floating-point parameters (e.g. bfloat16)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --dst")
    parser.set_defaults(run=_run_export)


def _run_export(args: argparse.Namespace) -> None:
    src = _existing_dir(args.workdir, "--workdir")
    _writable_dst(args.dst, args.overwrite)
    from fastblt.export import param_count, save_export
    from fastblt.loading import load_model

    config, params = load_model(src, step=args.step)
    dst = save_export(args.dst, config, params, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {dst} ({param_count(params):,} parameters)")


@subcommand
def _sample(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sample",
        help="generate bytes from a checkpoint (a training workdir or an export)",
        description="Generates from --prompt with the chosen method; prints the text, or one JSON "
        "object with the text and the work counters (--json).",
    )
    parser.add_argument("--checkpoint", required=True, help="a training workdir (latest step) or an export")
    parser.add_argument(
        "--method", default="ar", help="ar (cached autoregressive) or blt_s (self-speculation)"
    )
    parser.add_argument("--prompt", required=True, action="append", help="repeat for a batch of prompts")
    parser.add_argument("--max-bytes", type=int, default=256, help="bytes to generate per prompt")
    parser.add_argument("--draft", type=int, default=8, help="blt_s: bytes drafted per verification")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=_run_sample)


def _run_sample(args: argparse.Namespace) -> None:
    import json

    from fastblt.loading import load_model
    from fastblt.sampler import METHODS, generate

    if args.method not in METHODS:
        raise UsageError(f"--method {args.method!r} is not available; choose one of {', '.join(METHODS)}")
    config, params = load_model(args.checkpoint)
    try:
        result = generate(
            params,
            config,
            list(args.prompt),
            method=args.method,
            max_bytes=args.max_bytes,
            draft=args.draft,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    texts = [t.decode("utf-8", errors="replace") for t in result.texts]
    if args.json:
        print(
            json.dumps(
                {
                    "method": result.method,
                    "prompts": list(args.prompt),
                    "texts": texts,
                    "bytes_per_second": result.bytes_per_second,
                    "seconds": result.seconds,
                    "counters": result.counters.summary(),
                }
            )
        )
    else:
        for prompt, text in zip(args.prompt, texts, strict=True):
            print(prompt + text)


# ---------------------------------------------------------------------------------------------------------
# Entry point.
# ---------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``fastblt`` parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="fastblt", description="Train and serve Byte Latent Transformers.")
    parser.add_argument("--version", action="version", version=f"fastblt {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in _COMMANDS:
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
    try:
        args.run(args)
    except (UsageError, *_USER_ERRORS) as e:
        parser.exit(2, f"fastblt: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
