"""Has a training run finished? Read from its workdir alone, without JAX.

A run is finished when the checkpoint of its last step (``train.steps``) exists in the directory
of its last stage: the workdir itself, or ``WORKDIR/blt`` for an entropy-patched BLT (which trains
``WORKDIR/entropy`` first). ``fastblt train`` forces that save at the last step, so a run that
stopped early (preempted, killed, time limit) is unfinished and resumes from its latest checkpoint.

Launchers run it on a worker after the job ends (exit status 0: finished, 1: not yet)::

    python -m fastblt.launch.status --config blt_1b --workdir gs://bucket/run [--set k=v ...]

Paths may be local or anything ``etils.epath`` opens (``gs://`` with a GCS-capable backend).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["checkpoint_steps", "final_dir", "final_step", "is_finished", "main"]


def final_dir(cfg: Any, workdir: str) -> str:
    """The directory whose ``checkpoints/`` hold the run's last stage."""
    entropy_patched = "model" in cfg and cfg.model.patcher.mode == "entropy"
    return f"{workdir.rstrip('/')}/blt" if entropy_patched else workdir


def final_step(cfg: Any) -> int:
    """The step of the run's last checkpoint: ``train.steps``."""
    return int(cfg.train.steps)


def checkpoint_steps(directory: str) -> list[int]:
    """Committed checkpoint steps under ``directory/checkpoints`` (empty if none or missing)."""
    from etils import epath

    root = epath.Path(directory) / "checkpoints"
    if not root.exists():
        return []
    steps = []
    for child in root.iterdir():
        # Orbax writes into "<step>.orbax-checkpoint-tmp-*" and renames on commit; on object stores,
        # where there is no rename, it marks a committed step with commit_success.txt.
        if not child.name.isdigit():
            continue
        if str(directory).startswith("gs://") and not (child / "commit_success.txt").exists():
            continue
        steps.append(int(child.name))
    return sorted(steps)


def is_finished(cfg: Any, workdir: str) -> bool:
    """Whether the checkpoint of the last step of the last stage exists."""
    return final_step(cfg) in checkpoint_steps(final_dir(cfg, workdir))


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 0 if the run is finished, 1 if not, 2 on bad input."""
    parser = argparse.ArgumentParser(
        prog="python -m fastblt.launch.status", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    from fastblt.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"fastblt.launch.status: error: {e}", file=sys.stderr)
        return 2
    directory = final_dir(cfg, args.workdir)
    steps = checkpoint_steps(directory)
    done = final_step(cfg) in steps
    latest = steps[-1] if steps else None
    print(
        f"{directory}: latest checkpoint {latest}, last step {final_step(cfg)}: "
        f"{'finished' if done else 'not finished'}"
    )
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())
