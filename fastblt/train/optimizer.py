"""The optimizer of the reference: AdamW on all parameters, linear warmup then cosine decay to
``min_lr_ratio * lr``, global-norm gradient clipping."""

from __future__ import annotations

from typing import Any

import optax


def learning_rate_schedule(opt: Any, total_steps: int) -> optax.Schedule:
    """Warmup-cosine schedule from the ``optimizer`` config section."""
    warmup = min(int(opt.warmup_steps), max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=float(opt.lr),
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=float(opt.lr) * float(opt.min_lr_ratio),
    )


def make_optimizer(opt: Any, total_steps: int) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW (weight decay on every parameter, as the reference)."""
    return optax.chain(
        optax.clip_by_global_norm(float(opt.grad_clip)),
        optax.adamw(
            learning_rate_schedule(opt, total_steps),
            b1=float(opt.b1),
            b2=float(opt.b2),
            eps=float(opt.eps),
            weight_decay=float(opt.weight_decay),
        ),
    )
