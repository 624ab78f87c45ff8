"""``fastblt compile``: compile the sharded train step ahead of time for a topology (fastblt/train/aot.py)."""

from __future__ import annotations

import argparse
import json
import re

from fastblt.cli_options import add_config_arguments, load_config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``fastblt compile`` to the ``fastblt`` parser."""
    parser = subparsers.add_parser(
        "compile",
        help="compile the sharded train step for a TPU topology (no TPU needed) and report memory per "
        "chip and the roofline step time",
        description="Builds the train step of `fastblt train` over the topology's devices, compiles it "
        "ahead of time and prints XLA's memory analysis per device, its cost analysis (FLOPs, bytes "
        "accessed) and the roofline step time, MFU and bytes/s these imply at the chip's published "
        "peak FLOP/s and HBM bandwidth (a bound, not a measurement). TPU topologies (v5p-128, v4-32, "
        "v5litepod-16, v6e-256, v5p:4x4x8) need the libtpu package; cpu:N compiles for local CPU devices "
        "(no published peak: give --peak-flops and --hbm-bandwidth for a roofline).",
    )
    add_config_arguments(parser)
    parser.add_argument("--topology", required=True, help="e.g. v5p-128 or cpu:8")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--peak-flops",
        type=float,
        help="peak FLOP/s per chip for the roofline, e.g. 459e12 (with --hbm-bandwidth)",
    )
    parser.add_argument(
        "--hbm-bandwidth",
        type=float,
        help="HBM bytes/s per chip for the roofline, e.g. 2765e9 (with --peak-flops)",
    )
    parser.add_argument(
        "--avg-patch-len",
        type=float,
        help="mean patch length in bytes for the model-FLOPs count (default: patch_size for static "
        "patching, 4.5 for entropy patching)",
    )
    parser.set_defaults(run=_run_compile)


def _run_compile(args: argparse.Namespace) -> None:
    config = load_config_from_args(args)
    cpu = re.fullmatch(r"cpu:(\d+)", args.topology.strip().lower())
    if cpu:
        import jax

        try:  # give this process the CPU devices asked for (only possible before JAX starts)
            jax.config.update("jax_num_cpu_devices", int(cpu.group(1)))
        except RuntimeError:
            pass
    from fastblt.train.aot import compile_train_step

    report = compile_train_step(
        config, args.topology, args.peak_flops, args.hbm_bandwidth, args.avg_patch_len
    )
    if args.json:
        print(json.dumps(report.as_dict()))
    else:
        print("\n".join(report.lines()))
