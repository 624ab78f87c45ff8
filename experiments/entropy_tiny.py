"""Trains the tiny entropy model that patches ``experiments/tiny.py`` (a 64-dim, 2-layer byte LM).

    fastblt train --config entropy_tiny --workdir /tmp/fastblt-entropy-tiny

An entropy-model experiment has an ``entropy_model`` section (an ``EntropyModelConfig``, validated at
load) instead of ``model``; its dims are taken from tiny.py so that the trained model fits tiny's
``model.entropy_model`` exactly.
"""

from __future__ import annotations

import ml_collections

from experiments import base, tiny


def get_config() -> ml_collections.ConfigDict:
    """The tiny entropy model with CPU-sized training settings."""
    config = base.entropy_model(tiny.TINY.entropy_model)
    config.data.batch_size = 8
    config.data.seq_len = 512
    config.optimizer.lr = 1e-3
    config.optimizer.warmup_steps = 100
    config.train.steps = 2000
    config.train.eval_every = 200
    config.checkpoint.save_every = 500
    return config
