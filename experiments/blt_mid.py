"""A mid-size BLT for one GPU (~0.3B parameters with hash tables): the benchmark and ablation size.

    fastblt train --config blt_mid --workdir /tmp/fastblt-mid

Stage 1 trains the 4-layer entropy model on the same data (``entropy_stage``), then the threshold is
calibrated to ~4.5 bytes per patch. bf16 compute, float32 master weights, fused attention where the
GPU supports it.
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
)

MID = ModelConfig(
    encoder=LocalModelConfig(dim=512, n_layers=1, n_heads=8, window=512),
    global_model=TransformerConfig(dim=1024, n_layers=12, n_heads=16),
    decoder=LocalModelConfig(dim=512, n_layers=4, n_heads=8, window=512, cross_attn_all_layers=True),
    entropy_model=EntropyModelConfig(dim=256, n_layers=4, n_heads=4, window=512, dtype="bfloat16"),
    # 4096-byte rows at ~4.5 bytes per patch give ~910 patches; 1536 slots leave room.
    patcher=PatcherConfig(mode="entropy", max_patches=1536),
    hash=HashConfig(group_sizes=(3, 4, 5, 6, 7, 8), nb_functions=1, vocab=50002),
    cross_attn_k=2,
    max_bytes=8192,
    max_global_patches=4096,
    dtype="bfloat16",
    attention_impl="auto",
)


def get_config() -> ml_collections.ConfigDict:
    """The mid-size BLT with single-GPU training settings."""
    config = base.blt(MID)
    config.data.batch_size = 16
    config.data.seq_len = 4096
    config.optimizer.lr = 1e-3
    config.optimizer.warmup_steps = 200
    config.train.steps = 2000
    config.train.log_every = 50
    config.train.eval_every = 500
    config.checkpoint.save_every = 500
    config.entropy_stage = base.entropy_stage(steps=400, lr=2e-3, warmup_steps=50, target_patch_len=4.5)
    return config
