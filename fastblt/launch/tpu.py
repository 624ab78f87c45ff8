"""``fastblt launch tpu``: train on a Cloud TPU VM slice with gcloud, restarting after preemptions.

One attempt, as printed by ``--dry-run``:

1. provision or reuse the slice: ``gcloud compute tpus tpu-vm describe`` (reuse a READY VM of the
   right type), else ``tpu-vm create``; with ``--queued``, ``queued-resources describe`` /
   ``create`` and wait until the request is ACTIVE. A preempted VM (or a suspended/failed queued
   resource) is deleted and created again.
2. install: ``tar`` the checkout, ``tpu-vm scp --worker=all`` it, and on every worker unpack it
   into ``~/fastblt/src`` and ``pip install -e`` it (with ``jax[tpu]`` and ``gcsfs``) into
   ``~/fastblt/venv``.
3. train: ``tpu-vm ssh --worker=all`` runs the same ``fastblt train`` on every host with
   ``FASTBLT_DISTRIBUTED=auto`` (JAX finds the other hosts itself), wrapped by
   ``launch/worker.sh``: worker 0's log streams here, every worker prints its exit status.
4. decide: every worker exited 0 and ``python -m fastblt.launch.status`` on worker 0 finds the last
   checkpoint: done. A worker that failed while the slice is still READY is a real failure: it is
   reported with its worker id and the launcher exits non-zero. Otherwise (the slice was preempted,
   or the run saved on SIGTERM and stopped early) go back to 1; ``fastblt train`` resumes from the
   latest checkpoint in the workdir, which must therefore outlive the VMs (``gs://...``).
"""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

from fastblt.launch.accelerators import TpuSlice
from fastblt.launch.common import (
    STOPPED_CLEANLY,
    LaunchError,
    Runner,
    TrainJob,
    parse_worker_exits,
    pip_args,
    shell_path,
    source_tarball_command,
    worker_command,
    worker_report,
)

__all__ = ["TpuOptions", "launch_tpu"]

REMOTE_ROOT = "~/fastblt"
REMOTE_TARBALL = "~/fastblt-src.tar.gz"
LOCAL_TARBALL = "/tmp/fastblt-src.tar.gz"

# States after which the slice must be deleted and created again.
_VM_GONE = {"PREEMPTED", "TERMINATED", "FAILED"}
_QR_GONE = {"FAILED", "SUSPENDED", "SUSPENDING"}
_QR_WAIT = {"CREATING", "ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING"}


@dataclasses.dataclass(frozen=True)
class TpuOptions:
    """Where and how to run: the slice and the gcloud settings."""

    name: str
    zone: str
    slice: TpuSlice
    project: str | None = None
    queued: bool = False
    spot: bool = False
    runtime_version: str | None = None  # default: the slice generation's JAX runtime
    max_restarts: int = 20
    poll_seconds: float = 30.0
    # Installed with fastblt: JAX for TPUs, and gcsfs, through which Orbax (etils.epath) opens gs:// paths.
    pip_extra: tuple[str, ...] = ("jax[tpu]", "gcsfs")

    @property
    def version(self) -> str:
        return self.runtime_version or self.slice.runtime_version


def _gcloud(opts: TpuOptions, *args: str) -> list[str]:
    cmd = ["gcloud", "compute", "tpus", *args, f"--zone={opts.zone}"]
    if opts.project:
        cmd.append(f"--project={opts.project}")
    return cmd


def describe_vm(opts: TpuOptions) -> list[str]:
    return _gcloud(opts, "tpu-vm", "describe", opts.name, "--format=value(state,acceleratorType)")


def create_vm(opts: TpuOptions) -> list[str]:
    cmd = _gcloud(
        opts,
        "tpu-vm",
        "create",
        opts.name,
        f"--accelerator-type={opts.slice.name}",
        f"--version={opts.version}",
    )
    return cmd + (["--spot"] if opts.spot else [])


def delete_vm(opts: TpuOptions) -> list[str]:
    return _gcloud(opts, "tpu-vm", "delete", opts.name, "--quiet")


def describe_queued(opts: TpuOptions) -> list[str]:
    return _gcloud(opts, "queued-resources", "describe", opts.name, "--format=value(state.state)")


def create_queued(opts: TpuOptions) -> list[str]:
    cmd = _gcloud(
        opts,
        "queued-resources",
        "create",
        opts.name,
        f"--node-id={opts.name}",
        f"--accelerator-type={opts.slice.name}",
        f"--runtime-version={opts.version}",
    )
    return cmd + (["--spot"] if opts.spot else [])


def delete_queued(opts: TpuOptions) -> list[str]:
    # --force also deletes the TPU VM the request holds.
    return _gcloud(opts, "queued-resources", "delete", opts.name, "--force", "--quiet")


def ssh(opts: TpuOptions, worker: str, command: str) -> list[str]:
    return _gcloud(opts, "tpu-vm", "ssh", opts.name, f"--worker={worker}", f"--command={command}")


def scp(opts: TpuOptions, src: str, dst: str) -> list[str]:
    return _gcloud(opts, "tpu-vm", "scp", src, f"{opts.name}:{dst}", "--worker=all")


def install_script(opts: TpuOptions) -> str:
    """Unpacks the shipped checkout and installs it into a virtualenv, on one worker."""
    src, venv = f"{REMOTE_ROOT}/src", f"{REMOTE_ROOT}/venv"
    return " && ".join(
        [
            "set -e",
            f"rm -rf {shell_path(src)}",
            f"mkdir -p {shell_path(src)}",
            f"tar -xzf {shell_path(REMOTE_TARBALL)} -C {shell_path(src)}",
            f"(test -x {shell_path(venv)}/bin/python || python3 -m venv {shell_path(venv)})",
            f"{shell_path(venv)}/bin/pip install -q -e {shell_path(src)} {pip_args(opts.pip_extra)}",
        ]
    )


def train_script(job: TrainJob, root: Path) -> str:
    """What every worker runs: ``fastblt train`` under ``launch/worker.sh``, from the checkout."""
    argv = job.train_argv(root, fastblt=f"{REMOTE_ROOT}/venv/bin/fastblt")
    wrapped = worker_command(f"{REMOTE_ROOT}/logs", argv, env={"FASTBLT_DISTRIBUTED": "auto"})
    return f"cd {shell_path(REMOTE_ROOT + '/src')} && {wrapped}"


def status_script(job: TrainJob, root: Path) -> str:
    """Exit status 0 on a worker iff the run's last checkpoint exists (see fastblt.launch.status)."""
    argv = [f"{REMOTE_ROOT}/venv/bin/python", "-m", "fastblt.launch.status", *job.train_argv(root)[2:]]
    return f"cd {shell_path(REMOTE_ROOT + '/src')} && {shell_path(argv[0])} {shlex.join(argv[1:])}"


def _ensure_slice(opts: TpuOptions, runner: Runner) -> bool:
    """Provisions the slice unless a usable one exists; returns whether it was (re)created."""
    if opts.queued:
        rc, state = runner.query(describe_queued(opts))
        if runner.dry_run:
            runner.note("dry run: assuming the queued resource does not exist yet")
            rc = 1
        created = False
        if rc == 0 and state in _QR_GONE:
            runner.note(f"queued resource {opts.name} is {state}: deleting it to request a new one")
            runner.check(delete_queued(opts), "deleting the queued resource")
            rc = 1
        if rc != 0:
            runner.check(create_queued(opts), "requesting the queued resource")
            created = True
        while not runner.dry_run:
            rc, state = runner.query(describe_queued(opts))
            if rc == 0 and state == "ACTIVE":
                break
            if rc != 0 or state not in _QR_WAIT:
                raise LaunchError(
                    f"queued resource {opts.name} is {state or 'unreadable'} while waiting for ACTIVE: see "
                    f"`gcloud compute tpus queued-resources describe {opts.name} --zone={opts.zone}`"
                )
            runner.note(f"queued resource {opts.name}: {state}; checking again in {opts.poll_seconds:.0f}s")
            runner.sleep(opts.poll_seconds)
        return created

    rc, answer = runner.query(describe_vm(opts))
    if runner.dry_run:
        runner.note("dry run: assuming the TPU VM does not exist yet")
        rc = 1
    state, _, accel = answer.partition("\t")
    if rc == 0 and accel and accel != opts.slice.name:
        raise LaunchError(
            f"TPU VM {opts.name} exists as {accel}, not {opts.slice.name}: delete it "
            f"(gcloud compute tpus tpu-vm delete {opts.name} --zone={opts.zone}) or choose another --tpu"
        )
    if rc == 0 and state in _VM_GONE:
        runner.note(f"TPU VM {opts.name} is {state}: deleting it to create it again")
        runner.check(delete_vm(opts), "deleting the TPU VM")
        rc = 1
    if rc != 0:
        runner.check(create_vm(opts), "creating the TPU VM")
        return True
    while state != "READY" and not runner.dry_run:
        runner.note(f"TPU VM {opts.name}: {state}; checking again in {opts.poll_seconds:.0f}s")
        runner.sleep(opts.poll_seconds)
        rc, answer = runner.query(describe_vm(opts))
        state = answer.partition("\t")[0]
        if rc != 0 or state in _VM_GONE:
            raise LaunchError(f"TPU VM {opts.name} is {state or 'gone'} while waiting for READY")
    return False


def _slice_alive(opts: TpuOptions, runner: Runner) -> bool:
    if opts.queued:
        rc, state = runner.query(describe_queued(opts))
        return rc == 0 and state == "ACTIVE"
    rc, answer = runner.query(describe_vm(opts))
    return rc == 0 and answer.partition("\t")[0] == "READY"


def _install(job: TrainJob, opts: TpuOptions, runner: Runner, root: Path) -> None:
    runner.check(source_tarball_command(root, LOCAL_TARBALL), "packing the checkout")
    runner.check(scp(opts, LOCAL_TARBALL, REMOTE_TARBALL), "copying the checkout to the workers")
    runner.check(ssh(opts, "all", install_script(opts)), "installing fastblt on the workers")


def launch_tpu(job: TrainJob, opts: TpuOptions, runner: Runner, root: Path) -> None:
    """Runs ``job`` on the slice until it finishes (see the module docstring); raises LaunchError."""
    if not (job.workdir.startswith("gs://") or job.workdir.startswith("/")):
        raise LaunchError(
            f"--workdir {job.workdir}: every TPU host writes there and a restarted slice resumes from "
            f"it, so use a bucket (gs://BUCKET/PATH) or an absolute path on a shared filesystem"
        )
    job.validate()
    hosts = opts.slice.hosts
    runner.note(
        f"{opts.slice.name}: {opts.slice.chips} chips on {hosts} host(s), topology {opts.slice.topology}"
    )
    installed = False
    for attempt in range(opts.max_restarts + 1):
        if _ensure_slice(opts, runner) or not installed:
            _install(job, opts, runner, root)
            installed = True
        rc, lines = runner.stream(ssh(opts, "all", train_script(job, root)))
        exits = parse_worker_exits(lines)
        if runner.dry_run:
            runner.note("then, when every worker exited 0: is the last checkpoint there?")
            runner.query(ssh(opts, "0", status_script(job, root)))
            runner.note(
                f"not finished, or the slice was preempted: provision again and resume "
                f"(at most {opts.max_restarts} restarts); a worker failing on a live slice stops the launch"
            )
            return
        problems = worker_report(exits, hosts)
        if not problems and rc in STOPPED_CLEANLY:
            done, _ = runner.query(ssh(opts, "0", status_script(job, root)))
            if done == 0:
                runner.note(f"finished: {job.workdir}")
                return
            runner.note("every worker stopped cleanly before the last step (saved on SIGTERM): resuming")
            continue
        if _slice_alive(opts, runner) and problems:
            raise LaunchError(
                "training failed on a live slice:\n  "
                + "\n  ".join(problems)
                + f"\nworker logs: {REMOTE_ROOT}/logs/worker-<id>.log on each host "
                f"(gcloud compute tpus tpu-vm ssh {opts.name} --zone={opts.zone} --worker=<id>)"
            )
        runner.note(
            f"attempt {attempt + 1}: the slice was preempted or lost ({'; '.join(problems) or f'gcloud status {rc}'});"
            f" restarting"
        )
        installed = False
    raise LaunchError(
        f"gave up after {opts.max_restarts} restarts; the workdir {job.workdir} keeps the progress"
    )
