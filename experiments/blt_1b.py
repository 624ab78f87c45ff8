"""BLT-1B (Pagnoni et al. 2024) as released: the architecture of facebook/blt `blt_1b`.

Every number is written out (not inherited from fastblt.config defaults) so that this file alone says
what BLT-1B is; the values are the reference's args dump (notes: blt-architecture.md §9).

    fastblt train --config blt_1b --workdir /tmp/blt_1b
    fastblt train --config blt_1b:runlocal --workdir /tmp/blt_1b_smoke    # a few small steps
    fastblt convert hf-to-orbax --src /path/to/blt-1b-hf --dst /tmp/blt_1b_export

Argument (after ``:``): ``runlocal`` shrinks batch, row length and steps for a quick smoke run of the
full-size model on one host.
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

BLT_1B = ModelConfig(
    encoder=LocalModelConfig(
        dim=1024, n_layers=1, n_heads=16, window=512, rope_theta=500000.0, cross_attn_all_layers=False
    ),
    global_model=TransformerConfig(dim=2048, n_layers=25, n_heads=16, rope_theta=500000.0, window=None),
    decoder=LocalModelConfig(
        dim=1024, n_layers=9, n_heads=16, window=512, rope_theta=500000.0, cross_attn_all_layers=True
    ),
    # The shared entropy model of facebook/blt; the reference runs it in bfloat16.
    entropy_model=EntropyModelConfig(
        dim=768, n_layers=14, n_heads=12, rope_theta=10000.0, window=512, dtype="bfloat16"
    ),
    patcher=PatcherConfig(mode="entropy", threshold=1.335442066192627),
    hash=HashConfig(group_sizes=(3, 4, 5, 6, 7, 8), nb_functions=1, vocab=500002),
    vocab_size=260,
    cross_attn_k=2,
    init_std_factor="current_depth",
    max_bytes=24576,
    max_global_patches=4096,
    dtype="bfloat16",  # compute; parameters stay float32
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """BLT-1B; the base optimizer is the reference's AdamW recipe (its peak lr is a placeholder)."""
    args = parse_arg(arg, runlocal=False)
    config = base.blt(BLT_1B)
    config.data.seq_len = 24576  # the reference's longest byte row (max_encoder_seq_length)
    # Training buffers: ~5.5k patches per 24576-byte row at ~4.5 bytes per patch; 8192 slots leave
    # room (None would give the global model 24577 slots: 1.3 TB of temporaries per v5p chip).
    config.model.patcher.max_patches = 8192
    config.model.remat = True
    config.model.scan_layers = True  # 25 global layers compiled once
    # Stage 1 trains experiments/entropy_100m.py's model unless a trained one is named with
    # --config.entropy_stage.checkpoint=WORKDIR; BLT-1B keeps the reference threshold (no calibration).
    config.entropy_stage = base.entropy_stage(steps=100_000, lr=4e-4, warmup_steps=2000, target_patch_len=0.0)
    if args.runlocal:
        config.data.batch_size = 2
        config.data.seq_len = 2048
        config.optimizer.warmup_steps = 2
        config.train.steps = 10
        config.train.log_every = 1
        config.checkpoint.save_every = 5
    return config
