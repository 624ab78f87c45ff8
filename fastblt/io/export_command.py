"""``fastblt export``: an inference export (fastblt/io/export.py) from a training workdir's checkpoint."""

from __future__ import annotations

import argparse

from fastblt.cli_options import existing_dir, writable_dst
from fastblt.config import DTYPES


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``fastblt export`` to the ``fastblt`` parser."""
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
    src = existing_dir(args.workdir, "--workdir")
    writable_dst(args.dst, args.overwrite)
    from fastblt.io.export import param_count, save_export
    from fastblt.io.loading import load_model

    config, params = load_model(src, step=args.step)
    dst = save_export(args.dst, config, params, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {dst} ({param_count(params):,} parameters)")
