"""Shared base of the experiment configs: the model section plus the sections training reads.

Not an experiment of its own (its model is BLT-1B in float32 with placeholder training settings):
experiments start from ``base.get_config()`` and change what they need. The training sections are
placeholders until ``fastblt train`` lands; the trainer owns their final names.

    fastblt train --config experiments/base.py --workdir /tmp/base   # possible, but see blt_1b.py
"""

from __future__ import annotations

import ml_collections

from fastblt.config import ModelConfig
from fastblt.data.settings import DEFAULTS as DATA_DEFAULTS


def training_sections() -> ml_collections.ConfigDict:
    """``seed``, ``data``, ``optimizer``, ``train`` and ``checkpoint``: everything but the model."""
    config = ml_collections.ConfigDict()
    config.seed = 0

    # Every data key with its default (fastblt/data/settings.py documents them); source "stdlib" is
    # the embedded default corpus: Python's standard library source, whole modules held out.
    config.data = ml_collections.ConfigDict(dict(DATA_DEFAULTS))
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
    config.train.grad_accum = 1  # micro-batches per step (data.batch_size must divide by it)
    config.train.sample_bytes = 0  # > 0: print a greedy sample of this many bytes at each evaluation
    config.train.sample_prompt = "def "
    # A step with a NaN/inf loss or gradient norm: "stop" the run (saving nothing of it), or "skip"
    # its update and go on (at most max_nonfinite_skips steps in a row).
    config.train.on_nonfinite = "stop"
    config.train.max_nonfinite_skips = 10

    # Device mesh: data x fsdp x tensor; one axis may be -1 (all remaining devices).
    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1
    config.mesh.fsdp = 1
    config.mesh.tensor = 1

    # Training objective of a BLT: "next_byte", or "blt_d" (next-byte + block-wise masked diffusion,
    # fastblt/train/blt_d.py; needs model.mask_embedding=True). Entropy-model runs ignore it.
    config.objective = ml_collections.ConfigDict(
        dict(
            kind="next_byte",
            block_size=4,
            noise_eps=1e-3,
            diffusion_weight=1.0,
            next_byte_weight=1.0,
            normalization="sum",
        )
    )

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.workdir = ""  # set by `fastblt train --workdir`
    config.checkpoint.save_every = 1000
    config.checkpoint.keep = 3  # most recent checkpoints kept
    config.checkpoint.keep_every = 0  # also keep every N-th step forever (0: none)
    config.checkpoint.async_save = True
    return config


def entropy_stage(
    steps: int, lr: float, warmup_steps: int, target_patch_len: float
) -> ml_collections.ConfigDict:
    """Stage 1 of an entropy-patched BLT run: train ``model.entropy_model`` on the same data first.

    ``checkpoint``: a trained entropy model's workdir to use instead (skips stage 1).
    ``target_patch_len``: if > 0, set ``model.patcher.threshold`` to the entropy quantile that gives
    this many bytes per patch on the held-out rows (a new entropy model's scale is its own).
    """
    return ml_collections.ConfigDict(
        dict(
            checkpoint="",
            steps=steps,
            lr=lr,
            warmup_steps=warmup_steps,
            target_patch_len=target_patch_len,
        )
    )


def blt_d(config: ml_collections.ConfigDict, block_size: int) -> ml_collections.ConfigDict:
    """Turns a BLT experiment into BLT-D with blocks of ``block_size`` bytes (in place)."""
    config.model.mask_embedding = True
    config.model.patcher.max_patch_length = 8  # the paper's BLT-D setting
    config.objective.kind = "blt_d"
    config.objective.block_size = block_size
    return config


def get_config() -> ml_collections.ConfigDict:
    """The base config: BLT-1B's model section (float32) and placeholder training sections."""
    config = training_sections()
    config.model = ModelConfig().to_dict()
    config.entropy_stage = entropy_stage(steps=100_000, lr=4e-4, warmup_steps=2000, target_patch_len=0.0)
    return config
