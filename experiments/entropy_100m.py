"""Trains BLT's entropy model: the ~100M-parameter byte LM (768 dim, 14 layers, 12 heads, sliding window
512, RoPE theta 1e4) whose next-byte entropies place BLT-1B's patch boundaries.

    fastblt train --config entropy_100m --workdir /tmp/entropy_100m

An entropy-model experiment has an ``entropy_model`` section (an ``EntropyModelConfig``, validated at
load) instead of a ``model`` section. Its dims are blt_1b.py's ``model.entropy_model``, so the trained
model drops into BLT-1B; it computes in bfloat16 as the reference runs it (parameters stay float32).
The rows are 8192 bytes, the reference's entropy-model training length (``entropy_model.yaml``);
documents are masked from each other at EOS.
"""

from __future__ import annotations

import ml_collections

from experiments import base, blt_1b


def get_config() -> ml_collections.ConfigDict:
    """The entropy model of BLT-1B with the base optimizer recipe."""
    config = base.entropy_model(blt_1b.BLT_1B.entropy_model)
    config.data.batch_size = 64
    config.data.seq_len = 8192
    return config
