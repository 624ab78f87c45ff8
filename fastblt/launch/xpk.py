"""``fastblt launch xpk``: train on a GKE TPU cluster through xpk (JobSet + Kueue).

xpk layers the checkout (``--script-dir``) into a base image (``--base-docker-image``) and runs the
command in every pod of the slice(s); the command installs fastblt (unless ``--docker-image`` names
an image that has it) and runs ``fastblt train`` with ``FASTBLT_DISTRIBUTED=auto`` under
``launch/worker.sh`` (GKE sets ``TPU_WORKER_ID``, so each pod's exit line names its worker).
Preemptions and failures restart the whole JobSet up to ``--max-restarts`` times; ``fastblt train``
resumes from the latest checkpoint in the (``gs://``) workdir.

The launcher then waits with ``xpk workload list --wait-for-job-completion`` (0: succeeded,
125: failed) and, on failure, reads the pods' exit lines with ``kubectl logs`` to name the
workers that failed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fastblt.launch.accelerators import TpuSlice
from fastblt.launch.common import (
    LaunchError,
    Runner,
    TrainJob,
    parse_worker_exits,
    pip_args,
    worker_command,
    worker_report,
)

__all__ = ["XpkOptions", "launch_xpk", "workload_create"]


@dataclasses.dataclass(frozen=True)
class XpkOptions:
    cluster: str
    workload: str
    slice: TpuSlice
    num_slices: int = 1
    project: str | None = None
    zone: str | None = None
    base_docker_image: str | None = None
    docker_image: str | None = None
    max_restarts: int = 20
    priority: str | None = None
    # Installed with fastblt: JAX for TPUs, and gcsfs, through which Orbax (etils.epath) opens gs:// paths.
    pip_extra: tuple[str, ...] = ("jax[tpu]", "gcsfs")


def _scope(opts: XpkOptions) -> list[str]:
    out = [f"--cluster={opts.cluster}"]
    if opts.project:
        out.append(f"--project={opts.project}")
    if opts.zone:
        out.append(f"--zone={opts.zone}")
    return out


def container_command(job: TrainJob, opts: XpkOptions, root: Path) -> str:
    """The shell command of every pod (run from the layered checkout)."""
    wrapped = worker_command("/tmp/fastblt-logs", job.train_argv(root), env={"FASTBLT_DISTRIBUTED": "auto"})
    if opts.num_slices > 1:
        # TPU_WORKER_ID restarts at 0 in every slice: number the workers across slices instead.
        hosts = opts.slice.hosts
        wrapped = (
            f"FASTBLT_WORKER_ID=$((${{MEGASCALE_SLICE_ID:-0}} * {hosts} + ${{TPU_WORKER_ID:-0}})) {wrapped}"
        )
    if opts.docker_image:
        return wrapped  # the image has fastblt installed
    return f"pip install -q -e . {pip_args(opts.pip_extra)} && {wrapped}"


def workload_create(job: TrainJob, opts: XpkOptions, root: Path) -> list[str]:
    cmd = [
        "xpk",
        "workload",
        "create",
        *_scope(opts),
        f"--workload={opts.workload}",
        f"--tpu-type={opts.slice.name}",
        f"--num-slices={opts.num_slices}",
        f"--max-restarts={opts.max_restarts}",
    ]
    if opts.docker_image:
        cmd.append(f"--docker-image={opts.docker_image}")
    else:
        cmd.append(f"--script-dir={root}")
        if opts.base_docker_image:
            cmd.append(f"--base-docker-image={opts.base_docker_image}")
    if opts.priority:
        cmd.append(f"--priority={opts.priority}")
    return [*cmd, f"--command={container_command(job, opts, root)}"]


def workload_wait(opts: XpkOptions) -> list[str]:
    return ["xpk", "workload", "list", *_scope(opts), f"--wait-for-job-completion={opts.workload}"]


def pod_logs(opts: XpkOptions) -> list[str]:
    return [
        "kubectl",
        "logs",
        f"--selector=jobset.sigs.k8s.io/jobset-name={opts.workload}",
        "--tail=200",
        "--prefix",
        "--all-containers",
    ]


def launch_xpk(job: TrainJob, opts: XpkOptions, runner: Runner, root: Path) -> None:
    """Submits the workload and waits for it; raises LaunchError naming failed workers."""
    if opts.docker_image and opts.base_docker_image:
        raise LaunchError(
            "pass either --docker-image (fastblt preinstalled) or --base-docker-image, not both"
        )
    if not job.workdir.startswith("gs://"):
        raise LaunchError(f"--workdir {job.workdir}: pods share nothing else; use a bucket, gs://BUCKET/PATH")
    job.validate()
    runner.check(workload_create(job, opts, root), "xpk workload create")
    rc, _ = runner.stream(workload_wait(opts))
    if runner.dry_run or rc == 0:
        return
    status, lines = runner.query(pod_logs(opts))
    hosts = opts.slice.hosts * opts.num_slices
    problems = worker_report(parse_worker_exits(lines.splitlines()), hosts) if status == 0 else []
    detail = "\n  ".join(problems) or "(no worker exit lines found in the pod logs)"
    raise LaunchError(f"workload {opts.workload} did not succeed (xpk status {rc}):\n  {detail}")
