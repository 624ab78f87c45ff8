"""Training: what is trained, its losses, the optimizer, the loop, and what it reports.

Modules:

    loop.py             Trainer: the train step (a pure function jitted once with shardings and
                        donation), evaluation, and the loop with checkpoints and logging (``train``)
    tasks.py            what is trained: BLT or BLT-D (patched in the step by a frozen entropy model)
                        or the entropy model; ``make_task`` picks it from an experiment config
    objectives.py       the next-byte loss
    blt_d.py            the BLT-D objective: block layout, masks, noise, 1/t-weighted masked loss
    optimizer.py        AdamW + warmup-cosine + clipping
    calibration.py      stage 2's patching from the frozen entropy model: threshold, patch buffer
    metrics.py          TensorBoard events, progress, FLOPs per byte and MFU
    aot.py              ahead-of-time compile of the train step for a topology (``fastblt compile``)
    command.py          ``fastblt train``;  compile_command.py: ``fastblt compile``

Names below load on first access, so ``import fastblt.train.command`` (which ``fastblt --help`` does)
does not import JAX.
"""

from __future__ import annotations

from fastblt.lazy_exports import lazy_exports

_EXPORTS = {"Trainer": "loop", "train": "loop", "make_task": "tasks"}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
