"""Multi-process start-up through JAX's own multi-controller runtime.

One process per host (TPU VM worker) or per GPU (SLURM task); every process runs the same
``fastblt train``. Call :func:`initialize` before anything touches a JAX backend.
"""

from __future__ import annotations

import os

import jax


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout_s: int = 1800,
) -> bool:
    """Joins the job if one is described; returns whether ``jax.distributed`` was initialised.

    Sources, first match wins: the arguments; ``FASTBLT_COORDINATOR`` / ``FASTBLT_NUM_PROCESSES`` /
    ``FASTBLT_PROCESS_ID``; ``FASTBLT_DISTRIBUTED=auto`` (JAX detects TPU pods, SLURM, Open MPI and
    GKE by itself). Without any of these it is a single-process run and nothing happens.
    """
    coordinator = coordinator or os.environ.get("FASTBLT_COORDINATOR")
    if coordinator or os.environ.get("FASTBLT_DISTRIBUTED") == "auto":
        # Cross-process collectives on the CPU backend go through gloo (no effect on GPU/TPU).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator:
        num = num_processes if num_processes is not None else os.environ.get("FASTBLT_NUM_PROCESSES")
        pid = process_id if process_id is not None else os.environ.get("FASTBLT_PROCESS_ID")
        if num is None or pid is None:
            raise ValueError(
                "a coordinator address needs the process count and this process's id: set "
                "FASTBLT_NUM_PROCESSES and FASTBLT_PROCESS_ID (or --num-processes / --process-id)"
            )
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(num),
            process_id=int(pid),
            initialization_timeout=timeout_s,
        )
        return True
    if os.environ.get("FASTBLT_DISTRIBUTED") == "auto":
        jax.distributed.initialize(initialization_timeout=timeout_s)
        return True
    return False
