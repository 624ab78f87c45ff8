"""Launchers: run ``fastblt train`` on many hosts with the standard tools, never a scheduler of our own.

Every host (TPU VM worker, GKE pod, SLURM task) runs the same command line; JAX's multi-controller
runtime (``jax.distributed``, set up by ``fastblt.distributed``) connects them. Modules:

    common.py        the train command, the worker wrapper (launch/worker.sh), the dry-run runner
    accelerators.py  TPU slice names -> chips, hosts, topology, HBM, runtime version
    tpu.py           Cloud TPU VMs with gcloud (queued resources, install, preemption restarts)
    xpk.py           GKE through xpk
    slurm.py         GPU clusters: render launch/slurm.sbatch, sbatch it
    status.py        has a run finished? (its last checkpoint exists)

Every launcher has ``--dry-run``, which prints the exact commands instead of running them.
"""
