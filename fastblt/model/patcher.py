"""Patch boundaries with fixed shapes: entropies (or bytes) -> start mask -> patch lengths -> patch ids.

Everything here is jittable with a static :class:`~fastblt.config.PatcherConfig`: no Python lists and
no data-dependent shapes. A row of ``bytes`` tokens has ``bytes + 1`` boundary columns; column ``t``
says whether byte ``t`` starts a patch, and column ``bytes`` stands for the not-yet-seen next byte
(the reference's ``include_next_token``). Rows are patched independently (the reference flattens the
batch into one entropy-model row, issue #123; that is not reproduced).

Patch lengths live in a ``max_patches`` buffer, right-padded with 0, with a per-row ``count``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fastblt.config import PATCHING_MODES, PatcherConfig
from fastblt.tokenizer import OFFSET


class Patching(NamedTuple):
    """Fixed-shape patching of a batch.

    lengths: int32[batch, max_patches], right-padded with 0; sums to ``total`` per row.
    count: int32[batch], number of patches (clipped to max_patches).
    overflow: bool[batch], True where the row had more patches than slots (surplus merged into the last).
    needed: int32[batch], patches the row has before any merging (> max_patches where it overflowed).
    """

    lengths: jax.Array
    count: jax.Array
    overflow: jax.Array
    needed: jax.Array


def entropy(logits: jax.Array) -> jax.Array:
    """Next-byte entropy in nats: ``-sum_v p_v log p_v`` over the last axis.

    Args:
      logits: float[batch, bytes, vocab].

    Returns:
      float32[batch, bytes]; position ``t`` is the uncertainty about byte ``t + 1``.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def _shift_right(x: jax.Array, k: int) -> jax.Array:
    """``out[:, t] = x[:, t - k]`` with ``bytes + 1`` columns; columns before ``k`` read 0."""
    pad = jnp.zeros((x.shape[0], k), x.dtype)
    return jnp.concatenate([pad, x], axis=1)[:, : x.shape[1] + 1]


def _entropy_starts(entropies: jax.Array, config: PatcherConfig, pos: jax.Array) -> jax.Array:
    """Mode rule for columns ``t >= 2``; columns 0 and 1 are forced by the caller."""
    if config.threshold is None:
        raise ValueError(
            "patcher.threshold is None: the reference's top-k entropy mode is not supported; "
            "set patcher.threshold (the released BLT-1B uses 1.335442066192627)"
        )
    # Arithmetic and comparisons stay in the entropies' dtype with Python-float thresholds (weakly
    # typed), which is what the reference's torch code does: bf16 entropies compare against a bf16
    # threshold and bf16 differences.
    prev = _shift_right(entropies, 1)  # H[t - 1]
    if config.monotonicity:
        diff = prev - _shift_right(entropies, 2)  # H[t - 1] - H[t - 2]
        return (pos == 2) | ((pos >= 3) & (diff > config.threshold))
    if config.threshold_add is not None:
        diff = prev - _shift_right(entropies, 2)
        # Reference quirk (patch_start_mask_global_and_monotonicity): byte 2 always starts, and the
        # rule ANDs with "the previous byte does not start" evaluated on a mask that is still all False
        # except byte 2, so byte 3 can never start while later bytes ignore their neighbour.
        rule = (diff > config.threshold_add) & (prev > config.threshold)
        return (pos == 2) | ((pos >= 4) & rule)
    return prev > config.threshold


def _space_starts(tokens: jax.Array) -> jax.Array:
    """Space-like boundaries (reference ``find_space_patch_start_ids``), for columns ``t >= 2``.

    A byte is a candidate unless it is an ASCII letter/digit or a UTF-8 continuation byte; only the
    first of a run of candidates counts, special ids always count, and the byte after a counted
    candidate starts a patch.
    """
    b = tokens - OFFSET
    letter_or_digit = (
        ((b >= ord("0")) & (b <= ord("9")))
        | ((b >= ord("A")) & (b <= ord("Z")))
        | ((b >= ord("a")) & (b <= ord("z")))
    )
    continuation = (b >= 0x80) & (b < 0xC0)
    candidate = ~letter_or_digit & ~continuation
    prev_candidate = jnp.pad(candidate, ((0, 0), (1, 0)))[:, :-1]
    counted = (candidate & ~prev_candidate) | (tokens < OFFSET)
    return _shift_right(counted, 1)


def patch_start_mask(
    tokens: jax.Array,
    entropies: jax.Array | None,
    config: PatcherConfig,
    include_next_token: bool = True,
    seq_lens: jax.Array | None = None,
) -> jax.Array:
    """Which bytes start a patch.

    Args:
      tokens: int32[batch, bytes] token ids (BOS first).
      entropies: float[batch, bytes] next-byte entropies (entropy mode only; may be None otherwise).
        ``entropies[:, t]`` decides whether byte ``t + 1`` starts a patch; position 0 is ignored.
      config: the patcher config (static).
      include_next_token: if True, column ``seq_len`` (the next, unseen byte) may start a patch, as in
        the model forward and generation; if False (training data pipeline) it never does.
      seq_lens: int32[batch], real bytes per row (the rest is padding); None: all ``bytes``.

    Returns:
      bool[batch, bytes + 1]; columns 0 and 1 start (unless cut by ``seq_len``), columns after
      ``seq_len`` (from ``seq_len`` on without include_next_token) never do.
    """
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be int[batch, bytes], got shape {tokens.shape}")
    batch, n = tokens.shape
    pos = jnp.arange(n + 1, dtype=jnp.int32)[None, :]
    mode = config.mode
    if mode == "entropy":
        if entropies is None:
            raise ValueError(
                "patcher.mode='entropy' needs entropies float[batch, bytes]; pass the entropy model's"
            )
        if entropies.shape != tokens.shape:
            raise ValueError(f"entropies shape {entropies.shape} must equal tokens shape {tokens.shape}")
        starts = _entropy_starts(jnp.asarray(entropies), config, pos)
    elif mode == "space":
        starts = _space_starts(tokens)
    elif mode == "static":
        if config.patch_size < 1:
            raise ValueError(f"patcher.patch_size must be >= 1, got {config.patch_size}")
        # The BOS patch has length 1; patches of patch_size follow from byte 1 on.
        starts = (pos >= 1) & ((pos - 1) % config.patch_size == 0)
    elif mode == "byte":
        starts = jnp.ones((1, n + 1), bool)
    else:
        raise ValueError(f"patcher.mode={mode!r} is not one of {PATCHING_MODES}")
    starts = jnp.broadcast_to(starts | (pos < 2), (batch, n + 1))

    if config.max_patch_length is not None:
        m = config.max_patch_length
        if m < 1:
            raise ValueError(f"patcher.max_patch_length must be >= 1 or None, got {m}")
        # Splitting a patch of length L into [m, ..., m, r] adds starts at every m-th byte after each
        # original start; columns past seq_len are cut below, which cuts the split the same way.
        last_start = jax.lax.cummax(jnp.where(starts, pos, 0), axis=1)
        offset = pos - last_start
        starts = starts | ((offset > 0) & (offset % m == 0))

    lens = jnp.full((batch,), n, jnp.int32) if seq_lens is None else _check_seq_lens(seq_lens, batch)
    last_column = lens if include_next_token else lens - 1
    return starts & (pos <= last_column[:, None])


def _check_seq_lens(seq_lens: jax.Array, batch: int) -> jax.Array:
    seq_lens = jnp.asarray(seq_lens)
    if seq_lens.shape != (batch,):
        raise ValueError(f"seq_lens must be int[batch] = ({batch},), got shape {seq_lens.shape}")
    return seq_lens.astype(jnp.int32)


def lengths_from_starts(
    starts: jax.Array, max_patches: int, total: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Patch lengths from a start mask, into a fixed buffer.

    Args:
      starts: bool[batch, L] start mask (column 0 is treated as a start; columns >= total are ignored).
      max_patches: P, number of slots (static).
      total: int32[batch], bytes covered per row (seq_len + 1 with include_next_token, else seq_len).

    Returns:
      lengths: int32[batch, P], consecutive patch lengths right-padded with 0, summing to ``total``;
      count: int32[batch], patches per row, clipped to P;
      overflow: bool[batch], True where there were more than P patches. The surplus is merged into the
        last slot so the sum stays ``total`` and every byte keeps a valid patch id;
      needed: int32[batch], patches per row before clipping.
    """
    if not isinstance(max_patches, int) or max_patches < 1:
        raise ValueError(f"max_patches must be a positive int, got {max_patches!r}")
    if starts.ndim != 2:
        raise ValueError(f"starts must be bool[batch, L], got shape {starts.shape}")
    batch, length = starts.shape
    total = jnp.asarray(total).astype(jnp.int32)
    if total.shape != (batch,):
        raise ValueError(f"total must be int[batch] = ({batch},), got shape {total.shape}")
    pos = jnp.arange(length, dtype=jnp.int32)[None, :]
    live = pos < total[:, None]
    starts = live & (starts.astype(bool) | (pos == 0))  # byte 0 opens the first patch in every mode

    index = jnp.cumsum(starts, axis=1, dtype=jnp.int32) - 1  # patch index of each start
    n_patches = index[:, -1] + 1
    # Starts beyond the buffer go to slot P and are dropped: their bytes extend the last slot.
    slot = jnp.where(starts & (index < max_patches), index, max_patches)
    rows = jnp.arange(batch)[:, None]
    begin = jnp.broadcast_to(total[:, None], (batch, max_patches))
    begin = begin.at[rows, slot].set(jnp.broadcast_to(pos, (batch, length)), mode="drop")
    # Empty slots begin at `total`, so their length is 0 and the last real patch runs to `total`.
    lengths = jnp.concatenate([begin[:, 1:], total[:, None]], axis=1) - begin
    count = jnp.minimum(n_patches, max_patches)
    return lengths, count, n_patches > max_patches, n_patches


def patch_ids_from_lengths(lengths: jax.Array, n: int) -> jax.Array:
    """Index of the patch containing each byte.

    Args:
      lengths: int32[batch, patches], non-negative, right-padded with 0.
      n: number of byte positions (static).

    Returns:
      int32[batch, n], ``id[t] = #{j : start_j <= t} - 1`` with ``start_j`` the exclusive cumsum of
      ``lengths`` (padding patches begin at the row total, so they do not count before it).
    """
    if lengths.ndim != 2:
        raise ValueError(f"lengths must be int[batch, patches], got shape {lengths.shape}")
    batch = lengths.shape[0]
    lengths = lengths.astype(jnp.int32)
    begins = jnp.cumsum(lengths, axis=1) - lengths
    # Count starts per position with a scatter-add, then a cumsum: O(bytes + patches), no [n, P] compare.
    marks = jnp.zeros((batch, n), jnp.int32).at[jnp.arange(batch)[:, None], begins].add(1, mode="drop")
    return jnp.cumsum(marks, axis=1) - 1


def latent_index(next_patch: jax.Array, last_patch: jax.Array | None = None) -> jax.Array:
    """Which patch latent a decoder row reads: the one place that decides it, for training and
    generation alike.

    A row that predicts from the bytes before byte ``s`` reads the latent of the last patch that
    ends before ``s``: the patch before ``s``'s own (its latent has seen exactly the patches up to
    there, so the row reads no byte at or after ``s``). The callers, and their ``s``:

    * a clean row ``t`` (predicting byte ``t + 1``): ``s = t + 1``, in the model's forward
      (``BLT.__call__``; :func:`decoder_patch_ids_from_lengths` from lengths alone) and in cached
      generation (``Runner.extend``);
    * a BLT-D training block starting at patch ``q + 1``'s first byte: ``s`` is that byte, so the
      block reads patch ``q`` (fastblt.train.blt_d.block_layout);
    * BLT-S's draft bytes after a committed prefix of length ``L``: ``s = L`` for all of them (their
      own boundaries are not known while drafting), ``next_patch = State.completed``;
    * BLT-D generation's blocks after a prefix of length ``L`` (Algorithm 1's o_M): ``s = L`` with
      the patch of byte ``L - 1`` closed there, as training's blocks start at a patch start;
      ``last_patch`` says so (fastblt.sampler.cached.Runner.closed_last_patch); with
      ``anchor="patch"`` a block starts at the open patch's first byte ``s`` instead and reads the
      patch before it (fastblt.sampler.unmasking.patch_anchor), as a training block there would.

    Args:
      next_patch: int[...], the patch of byte ``s``: column ``s`` of the patch ids of a row's
        boundary columns (column ``bytes`` is the unseen next byte).
      last_patch: int[...], the patch of byte ``s - 1``, where that patch counts as closed at byte
        ``s - 1`` even if the patcher keeps it open; None: the patcher's boundaries.

    Returns: int[...], the index of the patch whose latent each row reads.
    """
    if last_patch is not None:
        return last_patch  # closed at s - 1: the last patch that ends before s
    return next_patch - 1


def decoder_patch_ids_from_lengths(lengths: jax.Array, n: int) -> jax.Array:
    """Patch whose global output byte ``t`` reads in the decoder (:func:`latent_index` with
    ``s = t + 1``); the reference computes it as the patch ids of ``lengths[:, 1:]``.

    Args:
      lengths: int32[batch, patches], reference convention (``lengths[:, 0] == 1``, the BOS patch);
      n: byte positions (static).

    Returns:
      int32[batch, n].
    """
    return latent_index(patch_ids_from_lengths(lengths, n + 1)[:, 1:])


def patch(
    tokens: jax.Array,
    entropies: jax.Array | None,
    config: PatcherConfig,
    max_patches: int | None = None,
    include_next_token: bool = True,
    seq_lens: jax.Array | None = None,
) -> Patching:
    """Patches a batch: start mask then fixed-shape lengths.

    Args:
      tokens: int32[batch, bytes]; entropies: float[batch, bytes] or None (non-entropy modes).
      config: patcher config (static).
      max_patches: slots in the buffer; None: ``config.max_patches``, and if that is None too
        ``bytes + 1``, which can never overflow.
      include_next_token, seq_lens: see :func:`patch_start_mask`.

    Returns:
      Patching(lengths int32[batch, max_patches], count int32[batch], overflow bool[batch], needed
      int32[batch]); lengths sum
      to ``seq_len + 1`` with include_next_token, else ``seq_len``.
    """
    tokens = jnp.asarray(tokens)
    with jax.named_scope("patcher"):
        starts = patch_start_mask(tokens, entropies, config, include_next_token, seq_lens)
        batch, n = tokens.shape
        lens = jnp.full((batch,), n, jnp.int32) if seq_lens is None else _check_seq_lens(seq_lens, batch)
        total = lens + 1 if include_next_token else lens
        if max_patches is None:
            max_patches = config.max_patches if config.max_patches is not None else n + 1
        return Patching(*lengths_from_starts(starts, max_patches, total))
