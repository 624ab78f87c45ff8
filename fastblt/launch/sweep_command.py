"""``fastblt sweep``: train every run of an experiment's ``get_sweep()`` (fastblt/launch/sweep.py) locally or
through a launcher (fastblt/launch/), then tabulate the results."""

from __future__ import annotations

import argparse
import os
import re

from fastblt.cli_options import add_config_arguments
from fastblt.errors import UsageError
from fastblt.launch.command import launch_failed


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``fastblt sweep`` to the ``fastblt`` parser."""
    parser = subparsers.add_parser(
        "sweep",
        help="train every run of an experiment's get_sweep() and tabulate the results",
        description="Expands the experiment's get_sweep() (fastblt/launch/sweep.py), trains each run in "
        "WORKDIR/<run name> (finished runs are skipped, unfinished ones resume) and prints a table of "
        "overrides and final metrics. Launcher options (tpu, slurm) follow `--`, as for `fastblt launch`.",
    )
    add_config_arguments(parser)
    parser.add_argument("--workdir", required=True, help="the sweep's root: one subdirectory per run")
    parser.add_argument("--launcher", choices=["local", "tpu", "slurm"], default="local")
    parser.add_argument("--parallel", type=int, default=1, help="local: runs trained at once (default 1)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands; train nothing")
    parser.add_argument(
        "launcher_args",
        nargs=argparse.REMAINDER,
        metavar="-- LAUNCHER OPTIONS",
        help="tpu: --tpu --zone --accelerator ...; slurm: --nodes --gpus-per-node ... (see fastblt launch)",
    )
    parser.set_defaults(run=_run_sweep)


def _sweep_remote(args: argparse.Namespace, runs: list, root_dir: str) -> None:
    """Runs a sweep's runs one by one through the TPU launcher, or submits one SLURM job each."""
    from fastblt.launch import options
    from fastblt.launch.common import LaunchError, Runner, TrainJob, repo_root
    from fastblt.launch.slurm import launch_slurm
    from fastblt.launch.tpu import launch_tpu

    extra = list(args.launcher_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    sub = argparse.ArgumentParser(prog=f"fastblt sweep --launcher {args.launcher} --")
    if args.launcher == "tpu":
        options.add_tpu_arguments(sub)
    else:
        options.add_slurm_arguments(sub)
    largs = sub.parse_args(extra)
    runner = Runner(args.dry_run)
    try:
        root = repo_root()
        for run in runs:
            job = TrainJob(args.config, run.workdir, (*args.overrides, *run.override_args()))
            print(f"[sweep] {run.name}: {run.workdir}", flush=True)
            try:
                if args.launcher == "tpu":
                    launch_tpu(job, options.tpu_options(largs), runner, root)
                    run.status = "dry-run" if args.dry_run else "done"
                else:
                    name = re.sub(r"[^A-Za-z0-9._-]", "_", f"{largs.job_name}-{run.name}")
                    script = os.path.join(run.workdir, "slurm", "job.sbatch")
                    launch_slurm(job, options.slurm_options(largs, job_name=name), runner, root, script)
                    run.status = "dry-run" if args.dry_run else "submitted"
            except LaunchError as e:
                run.status, run.detail = "failed", str(e)
                print(f"[sweep] {run.name}: FAILED: {e}", flush=True)
    except ValueError as e:
        raise UsageError(str(e)) from None
    except LaunchError as e:
        raise launch_failed(e) from None


def _run_sweep(args: argparse.Namespace) -> None:
    from fastblt.launch import sweep

    is_local_root = "://" not in args.workdir
    root_dir = os.path.abspath(os.path.expanduser(args.workdir)) if is_local_root else args.workdir
    runs = sweep.expand(args.config, root_dir, args.overrides)
    print(f"[sweep] {len(runs)} runs of {args.config} under {root_dir}", flush=True)
    if args.launcher == "local":
        if args.launcher_args:
            raise UsageError(f"the local launcher takes no options after --: {' '.join(args.launcher_args)}")
        try:
            sweep.run_local(args.config, runs, args.overrides, parallel=args.parallel, dry_run=args.dry_run)
        except ValueError as e:
            raise UsageError(str(e)) from None
    else:
        if args.parallel != 1:
            raise UsageError(
                "--parallel is for the local launcher: TPU runs share one slice and SLURM runs are separate jobs"
            )
        _sweep_remote(args, runs, root_dir)
    print(sweep.table(runs))
    if is_local_root and not args.dry_run:
        print(f"[sweep] results: {sweep.write_summary(root_dir, runs)}")
    failed = [r.name for r in runs if r.status == "failed"]
    if failed:
        raise SystemExit(f"fastblt: error: {len(failed)} run(s) failed: {', '.join(failed)}")
