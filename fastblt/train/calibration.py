"""Stage 2's patching, set from the frozen entropy model on a few training batches before BLT
trains: the entropy threshold for a target patch length, and a patch buffer large enough that no
row overflows it.

A row with more patches than ``model.patcher.max_patches`` slots has its surplus merged into the last
slot (fastblt/model/patcher.py): the model then trains on a patch that generation never makes (and
BLT-D loses the blocks of the merged patches), so the buffer is sized from the rows themselves.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from fastblt.config import EntropyModelConfig, PatcherConfig

# Headroom over the most patches a calibration row needed, and the slot multiple the buffer is
# rounded up to (a few hundred rows do not show the tail of the whole corpus).
BUFFER_HEADROOM = 1.25
BUFFER_MULTIPLE = 64


def entropies(
    entropy_cfg: EntropyModelConfig, params: Any, batches: list[dict], attention_impl: str = "auto"
) -> list[np.ndarray]:
    """Next-byte entropies (nats) of each batch's rows under the entropy model: float32[batch, bytes]."""
    from fastblt.model import EntropyModel
    from fastblt.model.patcher import entropy

    # The attention impl of BLTTask.patch, which computes the same entropies in the step.
    model = EntropyModel(entropy_cfg, attention_impl=attention_impl)
    fn = jax.jit(lambda p, t: entropy(model.apply({"params": p}, t)))
    return [np.asarray(fn(params, b["inputs"])) for b in batches]


def threshold_for(values: list[np.ndarray], batches: list[dict], patch_len: float) -> float:
    """Entropy threshold that gives ``patch_len`` bytes per patch on average over ``batches``
    (``values``: their :func:`entropies`)."""
    kept = [v[:, 1:][b["mask"][:, 1:] > 0] for v, b in zip(values, batches, strict=True)]
    return float(np.quantile(np.concatenate(kept), 1.0 - 1.0 / patch_len))


def patches_needed(values: list[np.ndarray], batches: list[dict], patcher: PatcherConfig) -> np.ndarray:
    """Patches each row needs under ``patcher`` (int[rows]), counted in a buffer that cannot
    overflow (bytes + 1 slots)."""
    from fastblt.model.patcher import patch

    counts = []
    for v, b in zip(values, batches, strict=True):
        tokens = np.asarray(b["inputs"])
        counts.append(np.asarray(patch(tokens, v, patcher, max_patches=tokens.shape[1] + 1).needed))
    return np.concatenate(counts)


def sized_buffer(needed: np.ndarray, max_patches: int | None, seq_len: int) -> int | None:
    """The patch buffer to train with: ``max_patches`` when every row fits it with the headroom,
    else the most patches a row needed times BUFFER_HEADROOM, rounded up to BUFFER_MULTIPLE slots
    (never more than ``seq_len + 1``, which cannot overflow). None stays None (``seq_len + 1`` slots)."""
    if max_patches is None:
        return None
    want = math.ceil(int(needed.max()) * BUFFER_HEADROOM)
    if want <= max_patches:
        return max_patches
    return min(seq_len + 1, -(-want // BUFFER_MULTIPLE) * BUFFER_MULTIPLE)
