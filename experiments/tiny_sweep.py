"""The tiny BLT swept over learning rate x seed: the example of ``get_sweep``.

    fastblt sweep --config tiny_sweep --workdir /tmp/tiny-sweep                  # 4 runs, one at a time
    fastblt sweep --config tiny_sweep:patching=static --workdir /tmp/s --parallel 2 --set train.steps=60
    fastblt sweep --config tiny_sweep --workdir /tmp/s --dry-run                 # print the commands

Each run trains in ``WORKDIR/<name>`` (``lr=0.001,seed=0``, ...); running the sweep again skips
finished runs and resumes unfinished ones. The argument (after ``:``) is tiny's (``patching=...``).
"""

from __future__ import annotations

import ml_collections

from experiments import tiny
from fastblt.launch.sweep import product, sweep


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """tiny's config, unchanged."""
    return tiny.get_config(arg)


def get_sweep(arg: str | None = None) -> list[dict]:
    """Peak learning rate x seed: 2 x 2 runs."""
    del arg  # the same grid for every patching mode
    return product(sweep("optimizer.lr", [1e-3, 3e-3]), sweep("seed", [0, 1]))
