"""A CPU-sized BLT (~5M parameters) with every part of the real one: hash n-grams, sliding windows,
cross-attention in all decoder layers, entropy patching. The default run and the tests use it.

    fastblt train --config tiny --workdir /tmp/fastblt-tiny
    fastblt train --config tiny:patching=static --workdir /tmp/fastblt-tiny-static
    fastblt train --config tiny --workdir /tmp/t --set optimizer.lr=3e-3 --set train.steps=200

Entropy patching needs a trained entropy model of the shape of ``model.entropy_model``: train one with
``experiments/entropy_tiny.py`` (same section). The patch threshold is BLT-1B's; a tiny entropy model's
entropies sit on a different scale, so tune ``model.patcher.threshold`` for ~4.5 bytes per patch.

Argument (after ``:``): ``patching=entropy|static|space`` (static and space need no entropy model).
"""

from __future__ import annotations

import ml_collections

from experiments import base
from fastblt.config import (
    EntropyModelConfig,
    HashConfig,
    LocalModelConfig,
    ModelConfig,
    PatcherConfig,
    TransformerConfig,
    parse_arg,
)

# Windows shorter than a row so that the sliding-window masks are exercised on CPU too.
TINY = ModelConfig(
    encoder=LocalModelConfig(dim=128, n_layers=1, n_heads=4, window=128),
    global_model=TransformerConfig(dim=256, n_layers=2, n_heads=4),
    decoder=LocalModelConfig(dim=128, n_layers=2, n_heads=4, window=128, cross_attn_all_layers=True),
    entropy_model=EntropyModelConfig(dim=64, n_layers=2, n_heads=2, window=128),
    # ~4.5-byte patches on 512-byte rows give ~115 patches; 192 slots leave room (overflow is logged).
    patcher=PatcherConfig(mode="entropy", max_patches=192),
    hash=HashConfig(group_sizes=(3, 4, 5), nb_functions=1, vocab=4099),
    cross_attn_k=2,  # k * encoder.dim == global dim: no global input projection
    max_bytes=1024,
    max_global_patches=1024,
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The tiny BLT; ``patching=static|space`` drops the entropy model."""
    args = parse_arg(arg, patching="entropy")
    config = base.blt(TINY)
    if args.patching != "entropy":
        config.model.patcher.mode = args.patching
        config.model.entropy_model = None
    config.data.batch_size = 8
    config.data.seq_len = 512
    config.data.eval_batches = 4
    # Sized for the main job on a 2-core CPU: both stages in a few minutes, held-out bits per byte
    # well below 8 (an untrained model's); raise train.steps for a better tiny model.
    config.optimizer.lr = 2e-3
    config.optimizer.warmup_steps = 30
    config.train.steps = 150
    config.train.log_every = 25
    config.train.eval_every = 75
    config.train.sample_bytes = 48
    config.checkpoint.save_every = 50
    # Stage 1 (entropy model) then stage 2 (BLT) in one `fastblt train`; the threshold is calibrated
    # to ~4.5 bytes per patch on training rows.
    config.entropy_stage = base.entropy_stage(steps=150, lr=3e-3, warmup_steps=30, target_patch_len=4.5)
    return config
