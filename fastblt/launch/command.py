"""``fastblt launch tpu|xpk|slurm``: run ``fastblt train`` on every host through the cluster's own tools.

The targets' options are defined in options.py (``fastblt sweep`` reuses them); the launchers are
tpu.py, xpk.py and slurm.py. Those load when the parser is built or the command runs, never when
``fastblt.cli`` is imported.
"""

from __future__ import annotations

import argparse

from fastblt.cli_options import add_config_arguments
from fastblt.errors import UsageError

_LAUNCH_TARGETS = {
    "tpu": "a Cloud TPU VM slice through gcloud (queued resources, install, preemption restarts)",
    "xpk": "a GKE TPU cluster through xpk (xpk workload create)",
    "slurm": "a SLURM GPU cluster: render launch/slurm.sbatch (one task per GPU) and sbatch it",
}


def launch_failed(e: Exception) -> SystemExit:
    """A launch that ran and failed: its report on stderr, exit status 1."""
    return SystemExit(f"fastblt: error: {e}")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``fastblt launch`` and its targets to the ``fastblt`` parser."""
    from fastblt.launch import options

    parser = subparsers.add_parser(
        "launch",
        help="run `fastblt train` on every host of a TPU slice (gcloud), GKE (xpk) or SLURM",
        description="Starts the same `fastblt train` on every host through the cluster's own tools; "
        "jax.distributed connects them. --dry-run prints the exact commands instead.",
    )
    targets = parser.add_subparsers(dest="target", required=True, metavar="TARGET")
    adders = {
        "tpu": options.add_tpu_arguments,
        "xpk": options.add_xpk_arguments,
        "slurm": options.add_slurm_arguments,
    }
    for name, help_text in _LAUNCH_TARGETS.items():
        p = targets.add_parser(name, help=help_text, description=f"Trains on {help_text}.")
        add_config_arguments(p)
        p.add_argument("--workdir", required=True, help="shared by every host and kept across restarts")
        p.add_argument("--dry-run", action="store_true", help="print the commands; run and write nothing")
        adders[name](p)
        if name == "slurm":
            p.add_argument("--script", help="where to write the batch script (default: ./<job-name>.sbatch)")
        p.set_defaults(run=_run_launch)


def _run_launch(args: argparse.Namespace) -> None:
    from fastblt.launch import options
    from fastblt.launch.common import LaunchError, Runner, TrainJob, repo_root

    job = TrainJob(args.config, args.workdir, tuple(args.overrides))
    runner = Runner(args.dry_run)
    try:
        root = repo_root()
        if args.target == "tpu":
            from fastblt.launch.tpu import launch_tpu

            launch_tpu(job, options.tpu_options(args), runner, root)
        elif args.target == "xpk":
            from fastblt.launch.xpk import launch_xpk

            launch_xpk(job, options.xpk_options(args), runner, root)
        else:
            from fastblt.launch.slurm import launch_slurm

            script = args.script or f"{args.job_name}.sbatch"
            launch_slurm(job, options.slurm_options(args), runner, root, script)
    except ValueError as e:
        raise UsageError(str(e)) from None
    except LaunchError as e:
        raise launch_failed(e) from None
