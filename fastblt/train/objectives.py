"""Training losses. Next-byte cross-entropy as the reference: float32 logits, masked mean."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def next_byte_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, dict]:
    """Masked next-byte cross-entropy.

    Args:
      logits: float32[batch, bytes, vocab]; logits[:, t] predicts targets[:, t].
      targets: int32[batch, bytes]; mask: float32[batch, bytes] (0 on padding targets).

    Returns: the mean loss in nats over unmasked targets (sum / (count + 1e-6), as the reference)
      and metrics: ``loss``, ``accuracy``, ``tokens`` (the unmasked count).
    """
    with jax.named_scope("loss"):
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
        mask = mask.astype(jnp.float32)
        count = mask.sum()
        loss = (nll * mask).sum() / (count + 1e-6)
        correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
        accuracy = (correct * mask).sum() / (count + 1e-6)
    return loss, {"loss": loss, "accuracy": accuracy, "tokens": count}
