"""``fastblt train``: train a config's model (fastblt/train/loop.py), on one process or many."""

from __future__ import annotations

import argparse
from pathlib import Path

from fastblt.cli_options import add_config_arguments, load_config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``fastblt train`` to the ``fastblt`` parser."""
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
    from fastblt.io.checkpoint import PREEMPTED_EXIT
    from fastblt.train.loop import run

    result = run(config, str(Path(args.workdir).expanduser()))
    if "preempted_at_step" in result:
        raise SystemExit(PREEMPTED_EXIT)  # saved and unfinished: a scheduler requeues, not fails
