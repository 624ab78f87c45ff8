"""Command-line options of the launchers, shared by ``fastblt launch ...`` and ``fastblt sweep``.

Each ``add_*_arguments`` adds one launcher's flags to a parser; the matching ``*_options`` builds the
launcher's options from the parsed namespace (raising ValueError, shown as a usage error, on bad input).
"""

from __future__ import annotations

import argparse

from fastblt.launch.accelerators import parse_tpu
from fastblt.launch.slurm import SlurmOptions
from fastblt.launch.tpu import TpuOptions
from fastblt.launch.xpk import XpkOptions

__all__ = [
    "add_slurm_arguments",
    "add_tpu_arguments",
    "add_xpk_arguments",
    "slurm_options",
    "tpu_options",
    "xpk_options",
]


def add_tpu_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tpu", required=True, metavar="NAME", help="TPU VM (and queued resource) name")
    parser.add_argument("--zone", required=True, help="e.g. us-east5-a")
    parser.add_argument("--accelerator", required=True, help="slice type, e.g. v5p-128, v4-32, v5litepod-16")
    parser.add_argument("--project", help="GCP project (default: gcloud's configured project)")
    parser.add_argument("--queued", action="store_true", help="provision through a queued resource")
    parser.add_argument("--spot", action="store_true", help="Spot capacity (preemptible)")
    parser.add_argument("--runtime-version", help="TPU VM software version (default: the generation's)")
    parser.add_argument(
        "--max-restarts", type=int, default=20, help="restarts after preemptions (default 20)"
    )
    parser.add_argument("--poll-seconds", type=float, default=30.0, help="between state checks (default 30)")


def tpu_options(args: argparse.Namespace) -> TpuOptions:
    return TpuOptions(
        name=args.tpu,
        zone=args.zone,
        slice=parse_tpu(args.accelerator),
        project=args.project,
        queued=args.queued,
        spot=args.spot,
        runtime_version=args.runtime_version,
        max_restarts=args.max_restarts,
        poll_seconds=args.poll_seconds,
    )


def add_xpk_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cluster", required=True, help="the xpk (GKE) cluster")
    parser.add_argument("--workload", required=True, help="workload name (unique in the cluster)")
    parser.add_argument("--tpu-type", required=True, help="slice type, e.g. v5p-128")
    parser.add_argument("--num-slices", type=int, default=1, help="slices (multislice over DCN; default 1)")
    parser.add_argument("--project", help="GCP project")
    parser.add_argument("--zone", help="GCP zone")
    parser.add_argument(
        "--base-docker-image", help="image the checkout is layered into (xpk's default if unset)"
    )
    parser.add_argument(
        "--docker-image", help="an image with fastblt installed (no layering, no pip install)"
    )
    parser.add_argument("--max-restarts", type=int, default=20, help="JobSet restarts (default 20)")
    parser.add_argument("--priority", choices=["very-low", "low", "medium", "high", "very-high"])


def xpk_options(args: argparse.Namespace) -> XpkOptions:
    if args.num_slices < 1:
        raise ValueError(f"--num-slices must be >= 1, got {args.num_slices}")
    return XpkOptions(
        cluster=args.cluster,
        workload=args.workload,
        slice=parse_tpu(args.tpu_type),
        num_slices=args.num_slices,
        project=args.project,
        zone=args.zone,
        base_docker_image=args.base_docker_image,
        docker_image=args.docker_image,
        max_restarts=args.max_restarts,
        priority=args.priority,
    )


def add_slurm_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    parser.add_argument(
        "--gpus-per-node", type=int, default=8, help="GPUs per node = tasks per node (default 8)"
    )
    parser.add_argument("--cpus-per-task", type=int, default=8, help="CPU cores per task (default 8)")
    parser.add_argument("--time", default="24:00:00", help="time limit per job (default 24:00:00)")
    parser.add_argument("--job-name", default="fastblt")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--venv", help="virtualenv to activate on the nodes (default: this one)")
    parser.add_argument(
        "--coordinator-port",
        type=int,
        help="use the first node's hostname and this port as coordinator (default: JAX's SLURM detection)",
    )
    parser.add_argument("--log-dir", help="SLURM and worker logs (default: WORKDIR/slurm)")
    parser.add_argument(
        "--max-requeues", type=int, default=20, help="requeues of an unfinished run (default 20)"
    )
    parser.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="OPTION",
        help="another #SBATCH option, e.g. --qos=high",
    )


def slurm_options(args: argparse.Namespace, job_name: str | None = None) -> SlurmOptions:
    return SlurmOptions(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task,
        time=args.time,
        job_name=job_name or args.job_name,
        partition=args.partition,
        account=args.account,
        venv=args.venv,
        coordinator_port=args.coordinator_port,
        log_dir=args.log_dir,
        max_requeues=args.max_requeues,
        extra_sbatch=tuple(args.sbatch),
    )
