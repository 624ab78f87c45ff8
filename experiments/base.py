"""Shared base of the experiment configs: the model section plus the sections training reads.

Not an experiment of its own (its model is BLT-1B in float32 with placeholder training settings):
experiments start from ``base.get_config()`` and change what they need. The training sections are
placeholders until ``fastblt train`` lands; the trainer owns their final names.

    fastblt train --config experiments/base.py --workdir /tmp/base   # possible, but see blt_1b.py
"""

from __future__ import annotations

import ml_collections

from fastblt.config import ModelConfig


def training_sections() -> ml_collections.ConfigDict:
    """``seed``, ``data``, ``optimizer``, ``train`` and ``checkpoint``: everything but the model."""
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.source = "stdlib"  # the embedded default corpus: Python's standard library source
    config.data.batch_size = 8  # rows per step, across all devices
    config.data.seq_len = 4096  # bytes per row (BOS included); the reference counts patches instead

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.lr = 3e-4  # peak; linear warmup then cosine decay to min_lr_ratio * lr
    config.optimizer.warmup_steps = 2000
    config.optimizer.min_lr_ratio = 0.1
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.95
    config.optimizer.eps = 1e-8
    config.optimizer.weight_decay = 0.1  # on all parameters, as the reference
    config.optimizer.grad_clip = 1.0  # global norm

    config.train = ml_collections.ConfigDict()
    config.train.steps = 100_000
    config.train.log_every = 10
    config.train.eval_every = 1000

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.workdir = ""  # set by `fastblt train --workdir`
    config.checkpoint.save_every = 1000
    config.checkpoint.keep = 3  # most recent checkpoints kept
    return config


def get_config() -> ml_collections.ConfigDict:
    """The base config: BLT-1B's model section (float32) and placeholder training sections."""
    config = training_sections()
    config.model = ModelConfig().to_dict()
    return config
