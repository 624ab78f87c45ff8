"""``fastblt launch slurm``: render ``launch/slurm.sbatch`` for a config and submit it with sbatch.

One task per GPU (``--ntasks-per-node = --gpus-per-node``), every task running the same
``fastblt train`` under ``launch/worker.sh``. ``jax.distributed`` comes up one of two ways:

* ``auto`` (default): ``FASTBLT_DISTRIBUTED=auto``; JAX recognises SLURM (``SLURM_JOB_ID``) and
  takes the coordinator (first node of the step, a port derived from the job id), the process
  count and id (``SLURM_NTASKS``, ``SLURM_PROCID``) and the task's GPU (``SLURM_LOCALID``) from it.
* ``--coordinator-port P``: the first node's hostname (``scontrol show hostnames``) and port P
  are passed as ``FASTBLT_COORDINATOR``, with ``FASTBLT_NUM_PROCESSES`` / ``FASTBLT_PROCESS_ID``
  and ``CUDA_VISIBLE_DEVICES=$SLURM_LOCALID`` set per task.

The checkout must be on a filesystem the nodes share (the script ``cd``s into it), and so must
the workdir. ``--dry-run`` prints the rendered script and the ``sbatch`` command.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import sys
from pathlib import Path

from fastblt.launch.common import LaunchError, Runner, TrainJob

__all__ = ["SlurmOptions", "launch_slurm", "render"]

_PLACEHOLDER = re.compile(r"\{\{([A-Z_]+)\}\}")


@dataclasses.dataclass(frozen=True)
class SlurmOptions:
    nodes: int = 1
    gpus_per_node: int = 8
    cpus_per_task: int = 8
    time: str = "24:00:00"
    job_name: str = "fastblt"
    partition: str | None = None
    account: str | None = None
    venv: str | None = None  # activated in the script; None: the launcher's own virtualenv; "": none
    coordinator_port: int | None = None  # None: JAX's own SLURM detection
    log_dir: str | None = None  # default: WORKDIR/slurm
    signal_seconds: int = 300
    max_requeues: int = 20
    extra_sbatch: tuple[str, ...] = ()  # more "#SBATCH" options, e.g. "--qos=high"


def _default_venv() -> str | None:
    return sys.prefix if sys.prefix != sys.base_prefix else None


def fill(template: str, values: dict[str, str]) -> str:
    """Replaces every ``{{NAME}}``; a placeholder without a value, or a value without a placeholder, fails."""
    used = set(_PLACEHOLDER.findall(template))
    missing, unused = used - set(values), set(values) - used
    if missing or unused:
        raise LaunchError(
            f"launch/slurm.sbatch and the renderer disagree: placeholders without values {sorted(missing)}, "
            f"values without placeholders {sorted(unused)}"
        )
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def log_dir_of(job: TrainJob, opts: SlurmOptions) -> str:
    """Where SLURM and the workers write logs: ``--log-dir``, else ``WORKDIR/slurm``."""
    if opts.log_dir:
        return opts.log_dir
    if not job.workdir.startswith("/"):
        raise LaunchError(
            f"--workdir {job.workdir}: use an absolute path on a filesystem all nodes share (or pass "
            f"--log-dir DIR on one: SLURM cannot write its logs to {job.workdir})"
        )
    return f"{job.workdir.rstrip('/')}/slurm"


def render(job: TrainJob, opts: SlurmOptions, root: Path) -> str:
    """The batch script for ``job``."""
    for name in ("nodes", "gpus_per_node", "cpus_per_task"):
        if getattr(opts, name) < 1:
            raise LaunchError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(opts, name)}")
    log_dir = log_dir_of(job, opts)
    train = shlex.join(job.train_argv(root))
    if opts.coordinator_port is None:
        note = "FASTBLT_DISTRIBUTED=auto; JAX reads the coordinator, ranks and GPUs from SLURM's variables."
        env = "export FASTBLT_DISTRIBUTED=auto"
        task = f'bash launch/worker.sh "$LOGDIR" -- {train}'
    else:
        note = "an explicit coordinator on the first node (FASTBLT_COORDINATOR), one GPU per task."
        env = (
            'export FASTBLT_COORDINATOR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'
            f':{int(opts.coordinator_port)}"\nexport FASTBLT_NUM_PROCESSES="$SLURM_NTASKS"'
        )
        inner = (
            "export FASTBLT_PROCESS_ID=$SLURM_PROCID CUDA_VISIBLE_DEVICES=$SLURM_LOCALID; "
            'exec bash launch/worker.sh "$0" -- "$@"'
        )
        task = f'bash -c {shlex.quote(inner)} "$LOGDIR" {train}'
    extra = [f"#SBATCH --partition={opts.partition}"] if opts.partition else []
    extra += [f"#SBATCH --account={opts.account}"] if opts.account else []
    extra += [f"#SBATCH {o}" for o in opts.extra_sbatch]
    venv = opts.venv if opts.venv is not None else _default_venv()
    values = {
        "JOB_NAME": opts.job_name,
        "NODES": str(opts.nodes),
        "GPUS_PER_NODE": str(opts.gpus_per_node),
        "CPUS_PER_TASK": str(opts.cpus_per_task),
        "TIME": opts.time,
        "LOG_DIR": log_dir,
        "SIGNAL_SECONDS": str(opts.signal_seconds),
        "MAX_REQUEUES": str(opts.max_requeues),
        "EXTRA_SBATCH": "\n".join(extra),
        "REPO": shlex.quote(str(root)),
        "ACTIVATE": f"source {shlex.quote(venv)}/bin/activate" if venv else "# fastblt is on PATH",
        "DISTRIBUTED_NOTE": note,
        "DISTRIBUTED_ENV": env,
        "TASK_COMMAND": task,
        "STATUS_ARGS": shlex.join(job.train_argv(root)[2:]),
    }
    template = (root / "launch" / "slurm.sbatch").read_text()
    return fill(template, values)


def launch_slurm(job: TrainJob, opts: SlurmOptions, runner: Runner, root: Path, script: str) -> None:
    """Writes the rendered script to ``script`` and submits it (dry run: prints both, writes nothing)."""
    job.validate()
    text = render(job, opts, root)
    if runner.dry_run:
        runner.note(f"would write {script}:")
        runner.out.write(text)
    else:
        Path(script).expanduser().parent.mkdir(parents=True, exist_ok=True)
        Path(script).expanduser().write_text(text)
        runner.note(f"wrote {script}")
    # SLURM does not create the directory of --output: a job whose log directory is missing fails
    # without a word.
    runner.check(["mkdir", "-p", log_dir_of(job, opts)], "creating the log directory")
    runner.check(["sbatch", script], "sbatch")
