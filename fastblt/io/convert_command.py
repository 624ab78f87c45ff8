"""``fastblt convert``: model weights between Hugging Face checkpoints and fastblt exports
(fastblt/io/huggingface.py for the mapping, fastblt/io/export.py for the export format)."""

from __future__ import annotations

import argparse

from fastblt.cli_options import existing_dir, writable_dst
from fastblt.config import DTYPES


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``fastblt convert hf-to-orbax`` and ``fastblt convert orbax-to-hf`` to the parser."""
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
    src = existing_dir(args.src, "--src")
    writable_dst(args.dst, args.overwrite)
    from fastblt.io import huggingface
    from fastblt.io.export import param_count, save_export

    config, params = huggingface.from_hf(src)
    dst = save_export(args.dst, config, params, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {dst} ({param_count(params):,} parameters)")


def _run_orbax_to_hf(args: argparse.Namespace) -> None:
    src = existing_dir(args.src, "--src")
    dst = writable_dst(args.dst, args.overwrite)
    from fastblt.io import huggingface
    from fastblt.io.export import param_count
    from fastblt.io.loading import load_model

    config, params = load_model(src)
    huggingface.to_hf(config, params, dst)
    print(f"wrote {dst} ({param_count(params):,} parameters)")
