"""BLT-D training (Fast BLT §3.2): block layout, decoder masks, absorbing noise and the joint loss.

Training rows. The clean row x_0..x_{N-1} (``tokens``; ``targets[t]`` is x_{t+1}) is patched into
P slots (reference convention: the BOS patch first, lengths summing to N + 1, zero-padded). For
every patch slot q + 1 after the BOS patch (q = 0..K-1, K = P - 1) block q holds the B bytes
x_s..x_{s+B-1} from that patch's start s. Blocks overlap and run into later patches; cell j = s + k
is a *padding* cell (not attended, not scored) if it lies past the row's last target (j > N), on a
padding target (``mask[j - 1] == 0``), in a padding patch slot, or -- with document masking -- past
an EOS (the row predicting x_j, j - 1, is in another document than the prefix end s - 1; the byte
right after an EOS is still predicted, as the clean rows do). Every cell keeps its byte's position
for RoPE. The decoder's input is N + K * B rows.

Masks. Clean rows: BLT's causal mask (window, documents). Block cell at position j of block q
(start s) sees clean rows c < s with j - c < window and in the prefix end's document, and the
non-padding cells of block q (bidirectional); nothing else (no other block, no clean row >= s).
Cross-attention (``fastblt.model.patcher.latent_index``): clean rows as BLT; block q reads patch q,
the last patch completed before s (the patch whose latent has seen exactly x_{<s}).

Noise and loss. One t ~ U(noise_eps, 1) per example; each non-padding cell shows [MASK] with
probability t. L_clean = next-byte NLL of the clean rows; L_mask = sum over examples of (1/t) times
the NLL of its masked cells (unshifted: a cell predicts its own byte). ``normalization``:

* ``"sum"`` (the paper's Eq. 7 balance): loss = (w_nb * sum L_clean + w_d * L_mask) / n_clean, i.e.
  both sums divided by the batch's count of clean targets (so the scale is per byte, as BLT's loss);
* ``"mean"``: loss = w_nb * mean L_clean + w_d * L_mask / n_cells, n_cells the non-padding block
  cells (an unbiased per-cell estimate, E[#masked] = t * n_cells).

With w_d = 0 and w_nb = 1 both equal BLT's next-byte loss (``fastblt.train.objectives.next_byte_loss``).

Cost (per example; the encoder and global model are BLT's). The decoder runs N + K * B rows
(K = P - 1 = max_patches - 1), so its activations grow by (N + K * B) / N. A block row attends a
context window of C = decoder.window - 1 clean rows plus its B cells, so the block rows' attention
is about K * B * (C + B) scores per head (BLT's blockwise clean attention: N * 2 * window); it runs
in chunks of blocks (fastblt.model.block_rows.block_attention). The context mask is bool[K, B, C].

* tiny (N = 512, window 128, max_patches 192): B = 4 -> 1276 decoder rows (2.5x BLT's),
  B = 8 -> 2040 (4.0x), B = 16 -> 3568 (7.0x); block/clean attention scores 0.8x / 1.6x / 3.3x.
* blt_mid (N = 4096, D = 512, window 512, 4 decoder layers, max_patches 1536): B = 4 -> 10236 rows
  (2.5x), B = 8 -> 16376 (4.0x), B = 16 -> 28656 (7.0x); block/clean scores 0.75x / 1.5x / 3.1x;
  context masks 3 / 6 / 13 MB. Measured (CPU compile, batch 1, bf16, 1 global layer): the gradient
  of BLT-D (B = 4) needs 5.3 GiB of temporaries where BLT needs 3.8 GiB.

Keep max_patches close to the real patch count (N / mean patch length plus a margin; the
``patch_overflow`` metric says when it is too small): with max_patches None (N + 1 slots) the
decoder has N * (1 + B) rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp

from fastblt.config import ModelConfig, ObjectiveConfig, build, check_objective, config_dict
from fastblt.model.attention import document_ids
from fastblt.model.block_rows import DecoderBlocks
from fastblt.model.blt import blt_d_logits
from fastblt.model.patcher import latent_index
from fastblt.train.objectives import next_byte_loss

if TYPE_CHECKING:  # ml-collections is imported where a section is built (not on every machine)
    import ml_collections


# ---------------------------------------------------------------------------------------------------------
# The ``objective`` config section (fastblt/config/training.py), built by hand.
# ---------------------------------------------------------------------------------------------------------


def objective_section(**changes: Any) -> ml_collections.ConfigDict:
    """The ``objective`` section at its defaults (plain next-byte) with ``changes``, as a ConfigDict."""
    return config_dict(build(ObjectiveConfig, changes, "objective.", fill=True))


def objective_config(
    section: Mapping[str, Any] | ml_collections.ConfigDict | None,
    model: ModelConfig,
    prefix: str = "objective.",
) -> ObjectiveConfig:
    """The validated ObjectiveConfig of one ``objective`` section (None: next-byte), checked against
    ``model``; keys left out take the defaults (a whole experiment is read strictly by
    :func:`fastblt.config.experiment_config`).

    Raises ConfigError naming the key (``objective.block_size``) for unknown keys, wrong types,
    values out of range, or a BLT-D objective on a model without ``model.mask_embedding``.
    """
    objective = ObjectiveConfig() if section is None else build(ObjectiveConfig, section, prefix, fill=True)
    check_objective(objective, model, prefix)
    return objective


# ---------------------------------------------------------------------------------------------------------
# Block layout and masks.
# ---------------------------------------------------------------------------------------------------------


class BlockLayout(NamedTuple):
    """Where the K = P - 1 blocks of B cells sit (block q belongs to patch slot q + 1).

    starts: int32[b, K], block start s (the patch's first byte; a padding slot starts past the row).
    positions: int32[b, K, B], s + k: the byte index of each cell (its RoPE position).
    read_patch: int32[b, K], q: the patch whose latent the block's cells cross-attend.
    in_row: bool[b, K, B], the cell is a byte of the row with a target (real patch, s + k <= N).
    """

    starts: jax.Array
    positions: jax.Array
    read_patch: jax.Array
    in_row: jax.Array


def block_layout(patch_lengths: jax.Array, n: int, block_size: int) -> BlockLayout:
    """Blocks of the training row: one per patch after the BOS patch, fixed shapes.

    Args:
      patch_lengths: int32[b, P], reference convention (``lengths[:, 0] == 1``, zero-padded).
      n: N, bytes in the clean row (static). block_size: B (static).
    """
    lengths = jnp.asarray(patch_lengths).astype(jnp.int32)
    if lengths.ndim != 2 or lengths.shape[1] < 2:
        raise ValueError(f"patch_lengths must be int[batch, patches >= 2], got shape {lengths.shape}")
    b, p = lengths.shape
    starts = (jnp.cumsum(lengths, axis=1) - lengths)[:, 1:]
    positions = starts[..., None] + jnp.arange(block_size, dtype=jnp.int32)
    in_row = (lengths[:, 1:, None] > 0) & (positions <= n)
    # Block q starts at patch q + 1's first byte: it reads the latent of patch q.
    read_patch = latent_index(jnp.broadcast_to(jnp.arange(1, p, dtype=jnp.int32), (b, p - 1)))
    return BlockLayout(starts, positions, read_patch, in_row)


def _take(x: jax.Array, index: jax.Array) -> jax.Array:
    """x: [b, n]; index: int[b, ...] (clipped into [0, n)) -> x[b, index] of index's shape."""
    flat = jnp.clip(index, 0, x.shape[1] - 1).reshape(x.shape[0], -1)
    return jnp.take_along_axis(x, flat, axis=1).reshape(index.shape)


def block_cells(
    layout: BlockLayout,
    tokens: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    document_masking: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """The byte of each block cell and whether the cell is real (attended and scored).

    Args: tokens, targets: int32[b, N] (targets[t] = x_{t+1}); mask: [b, N] (0 on padding targets).

    Returns: cell bytes int32[b, K, B] (x_j = targets[j - 1]; 0 on padding cells) and
      valid bool[b, K, B] (see the module docstring for what makes a padding cell).
    """
    prev = layout.positions - 1  # the clean row that predicts cell j's byte
    valid = layout.in_row & (_take(jnp.asarray(mask), prev) > 0)
    if document_masking:
        docs = document_ids(jnp.asarray(tokens).astype(jnp.int32))
        block_doc = _take(docs, layout.starts - 1)
        valid &= _take(docs, prev) == block_doc[..., None]
    cell = _take(jnp.asarray(targets).astype(jnp.int32), prev)
    return jnp.where(valid, cell, 0), valid


def context_width(n: int, window: int | None) -> int:
    """C, clean rows in a block's context window: window - 1 (a cell at j >= s sees c > j - window,
    so c >= s - window + 1), or all N rows without a window."""
    return n if window is None else max(1, min(window - 1, n))


def context_mask(
    layout: BlockLayout, tokens: jax.Array, window: int | None, document_masking: bool = True
) -> tuple[jax.Array, jax.Array]:
    """Each block's context window of clean rows and which of them its cells see.

    Cell j of block q (start s) sees clean row c iff c < s, j - c < window, and c is in the
    document of the prefix end s - 1. All such rows lie in [s - C, s), C = :func:`context_width`.

    Returns: context_start int32[b, K] (= s - C) and context_mask bool[b, K, B, C] over rows
      context_start + 0 .. C - 1.
    """
    n = tokens.shape[1]
    width = context_width(n, window)
    start = layout.starts - width
    c = start[:, :, None, None] + jnp.arange(width, dtype=jnp.int32)  # [b, K, 1, C]
    visible = (c >= 0) & (c < n) & (c < layout.starts[:, :, None, None])
    if window is not None:
        visible &= layout.positions[..., None] - c < window
    if document_masking:
        docs = document_ids(jnp.asarray(tokens).astype(jnp.int32))
        block_doc = _take(docs, layout.starts - 1)
        visible &= _take(docs, c) == block_doc[:, :, None, None]
    return start, jnp.broadcast_to(visible, layout.positions.shape + (width,))


def self_mask(valid: jax.Array) -> jax.Array:
    """bool[b, K, B, B]: a cell sees every real cell of its own block (bidirectional)."""
    return jnp.broadcast_to(valid[:, :, None, :], valid.shape + valid.shape[-1:])


def decoder_mask(
    clean_mask: jax.Array, context_start: jax.Array, ctx_mask: jax.Array, own_mask: jax.Array
) -> jax.Array:
    """The whole decoder self-attention mask as one dense matrix (for inspection and tests).

    Args: clean_mask: bool[b, N, N] (BLT's); context_start: int32[b, K]; ctx_mask: bool[b, K, B, C];
      own_mask: bool[b, K, B, B].

    Returns: bool[b, N + R, N + R] over rows [clean ; block 0 cells ; block 1 cells ; ...].
    """
    b, n = clean_mask.shape[:2]
    nblk, bs, width = ctx_mask.shape[1:]
    r = nblk * bs
    rows = context_start[:, :, None] + jnp.arange(width, dtype=jnp.int32)  # [b, K, C]
    hit = rows[..., None] == jnp.arange(n, dtype=jnp.int32)  # [b, K, C, N]
    ctx = jnp.any(ctx_mask[..., None] & hit[:, :, None], axis=-2).reshape(b, r, n)
    eye = jnp.eye(nblk, dtype=bool)[None, :, None, :, None]
    own = (eye & own_mask[:, :, :, None, :]).reshape(b, r, r)
    top = jnp.concatenate([clean_mask, jnp.zeros((b, n, r), bool)], axis=-1)
    return jnp.concatenate([top, jnp.concatenate([ctx, own], axis=-1)], axis=1)


# ---------------------------------------------------------------------------------------------------------
# Noise and loss.
# ---------------------------------------------------------------------------------------------------------


def sample_noise(rng: jax.Array, valid: jax.Array, noise_eps: float) -> tuple[jax.Array, jax.Array]:
    """One t ~ U(noise_eps, 1) per example; each real cell is masked with probability t.

    Args: rng: a PRNG key; valid: bool[b, K, B]. Returns t float32[b] and masked bool[b, K, B].
    """
    k_t, k_cells = jax.random.split(rng)
    b = valid.shape[0]
    t = noise_eps + (1.0 - noise_eps) * jax.random.uniform(k_t, (b,), jnp.float32)
    u = jax.random.uniform(k_cells, valid.shape, jnp.float32)
    return t, valid & (u < t[:, None, None])


def masked_diffusion_terms(
    block_logits: jax.Array, cell_tokens: jax.Array, masked: jax.Array, t: jax.Array
) -> dict[str, jax.Array]:
    """Sums over the masked cells.

    Args: block_logits: float32[b, K, B, V]; cell_tokens: int32[b, K, B]; masked: bool[b, K, B];
      t: float32[b].

    Returns: ``weighted_nll`` sum_b (1/t_b) sum_masked NLL, ``nll`` sum_masked NLL, ``correct``
      masked cells predicted right (argmax), ``count`` masked cells.
    """
    logp = jax.nn.log_softmax(block_logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, cell_tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    w = masked.astype(jnp.float32)
    correct = (jnp.argmax(block_logits, axis=-1) == cell_tokens).astype(jnp.float32)
    return {
        "weighted_nll": jnp.sum((w * nll).sum(axis=(1, 2)) / t),
        "nll": (w * nll).sum(),
        "correct": (w * correct).sum(),
        "count": w.sum(),
    }


def decoder_blocks(
    config: ModelConfig,
    layout: BlockLayout,
    tokens: jax.Array,
    cell_tokens: jax.Array,
    valid: jax.Array,
    masked: jax.Array,
) -> DecoderBlocks:
    """The decoder's block input (padding cells show [MASK] and are never attended)."""
    start, ctx = context_mask(layout, tokens, config.decoder.window, config.document_masking)
    return DecoderBlocks(
        tokens=cell_tokens,
        masked=masked | ~valid,
        positions=layout.positions,
        read_patch=layout.read_patch,
        context_start=start,
        context_mask=ctx,
        self_mask=self_mask(valid),
    )


def blt_d_loss(
    params: Any,
    config: ModelConfig,
    objective: ObjectiveConfig,
    tokens: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    patch_lengths: jax.Array,
    rng: jax.Array,
    chunk_blocks: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The BLT-D training loss of one batch.

    Args:
      params: BLT parameters (unboxed; the entropy model's are not needed) with
        ``local_decoder.mask_embedding`` (``config.mask_embedding`` on).
      config: the model config; objective: a validated ``ObjectiveConfig`` (kind "blt_d").
      tokens, targets: int32[b, N]; mask: [b, N] (0 on padding targets), as ``BLTTask.loss``.
      patch_lengths: int32[b, P] (``BLTTask.patch(...).lengths``).
      rng: PRNG key for t and the masks (use a different one per step and micro-batch).
      chunk_blocks: blocks per block-attention chunk (None: automatic; a memory knob only).

    Returns: the scalar loss and metrics: ``loss``; ``next_byte_loss``, ``accuracy``, ``tokens``
      (clean rows, as next_byte_loss); ``diffusion_loss`` (the 1/t-weighted masked NLL as it
      enters the loss, before ``diffusion_weight``); ``masked_nll`` and ``masked_accuracy`` (per
      masked cell, unweighted); ``masked_cells``, ``block_cells`` (real cells), ``noise_t`` (mean t).
    """
    n = tokens.shape[1]
    layout = block_layout(patch_lengths, n, objective.block_size)
    cell_tokens, valid = block_cells(layout, tokens, targets, mask, config.document_masking)
    t, masked = sample_noise(rng, valid, objective.noise_eps)
    blocks = decoder_blocks(config, layout, tokens, cell_tokens, valid, masked)
    clean_logits, block_logits = blt_d_logits(params, config, tokens, patch_lengths, blocks, chunk_blocks)

    clean_loss, metrics = next_byte_loss(clean_logits, targets, mask)
    terms = masked_diffusion_terms(block_logits, cell_tokens, masked, t)
    cells = valid.astype(jnp.float32).sum()
    denom = metrics["tokens"] if objective.normalization == "sum" else cells
    diffusion = terms["weighted_nll"] / (denom + 1e-6)
    loss = objective.next_byte_weight * clean_loss + objective.diffusion_weight * diffusion
    metrics = {
        "loss": loss,
        "next_byte_loss": clean_loss,
        "accuracy": metrics["accuracy"],
        "tokens": metrics["tokens"],
        "diffusion_loss": diffusion,
        "masked_nll": terms["nll"] / (terms["count"] + 1e-6),
        "masked_accuracy": terms["correct"] / (terms["count"] + 1e-6),
        "masked_cells": terms["count"],
        "block_cells": cells,
        "noise_t": t.mean(),
    }
    return loss, metrics
