"""``fastblt preprocess``: write a config's corpus as a tensorstore corpus (fastblt/data/preprocess.py)."""

from __future__ import annotations

import argparse

from fastblt.cli_options import add_config_arguments, existing_dir, load_config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``fastblt preprocess`` to the ``fastblt`` parser."""
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
        from fastblt.train.loop import entropy_function

        entropy_fn = entropy_function(config, str(existing_dir(args.entropy_workdir, "--entropy-workdir")))
    preprocess(config.data, args.dst, entropy_fn=entropy_fn, overwrite=args.overwrite)
