"""Decode-step attention in one kernel: a few queries over a key cache (Pallas, Triton on GPU).

A decode step's attention on the XLA path is about seven kernels per layer: the score product, the
mask select, max, sum, normalisation, a conversion and the value product (generate_speed.md, run 8),
~10 us per layer and step at batch 1; at batch 32 XLA runs one-query products as reduction fusions.
Here one program per (batch row, kv head, key split) reads its keys and values straight from the
cache layout ``[B, N, KV, hd]`` in blocks of ``block_k``, keeps the scores in registers and folds
them into an online softmax (flash decoding), so a layer's attention is one launch (two with key
splits: the splits' partial results are combined by XLA). The step's new keys can be written into
the cache by the same launch (:func:`decode_attention_write`; with key splits, by the first split).

Only the key blocks of each row's visible range (first to last key any of its queries sees) are
read: a decode mask is a window or a causal prefix of the buffer, so a long buffer (the global
model's patch slots at a 16 000-byte prompt: ~4 000 of 16 193 used) costs what its visible keys cost.
Key splits share out that range, not the buffer, and their number is sized for the most keys a row
can see (``visible_keys``: a sliding window's span, where the caller knows it), not for the buffer.

Numerics follow the XLA path (float32 scores and softmax statistics, probabilities in the values'
dtype for the value product, float32 accumulation); the softmax is normalised after the value
product (flash form) instead of before it, which moves bf16 results by rounding only. Off GPU the
kernel runs in Pallas interpret mode (the CPU tests' way of running it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from fastblt.model.head_view import HeadView, cut_out

# Query rows of a program are padded to at least this many (Triton's dot needs 16 on each side);
# more than MAX_ROWS (a prefill chunk of many queries and grouped heads) is left to the XLA path:
# the program's float32 scores and accumulator would not fit its registers.
MIN_ROWS = 16
MAX_ROWS = 64
# Keys per block: at most BLOCK_K, and one block of keys at most BLOCK_BYTES, so that keys and
# values of two pipeline stages fit a multiprocessor's shared memory (227 KB on an H100/H200).
BLOCK_K = 128
BLOCK_BYTES = 32 * 1024
# Triton's software-pipeline stages of the key loop (each holds a block of keys and one of values in
# shared memory): 2 x (16 + 16) KB at the default blocks.
NUM_STAGES = 2
# Key splits only where there are too few (row, kv head) programs to fill the GPU (132
# multiprocessors), and none under MIN_SPLIT_KEYS keys.
MIN_SPLIT_KEYS = 512
TARGET_PROGRAMS = 128
_NEG = -1e30  # finite, as fastblt.model.attention's


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def rows(t: int, group: int) -> int:
    """Query rows of a program: ``t`` queries x ``group`` heads per kv head, padded to a power of two."""
    return max(MIN_ROWS, _pow2(t * group))


def supported(q: jax.Array, kv_heads: int) -> bool:
    """Whether the kernel takes queries float[B, T, H, hd] over ``kv_heads`` kv heads: a power-of-two
    head dim of 16..256 (Triton's loads are powers of two), a float dtype, at most MAX_ROWS rows."""
    d = q.shape[-1]
    return (
        16 <= d <= 256
        and d == _pow2(d)
        and q.dtype in (jnp.bfloat16, jnp.float16, jnp.float32)
        and rows(q.shape[1], q.shape[2] // kv_heads) <= MAX_ROWS
    )


def block_keys(head_dim: int, dtype: jnp.dtype) -> int:
    """Keys per block for this head dim and dtype (see BLOCK_BYTES)."""
    return max(16, min(BLOCK_K, BLOCK_BYTES // (head_dim * jnp.dtype(dtype).itemsize)))


def key_splits(programs: int, n: int, block_k: int = BLOCK_K, visible_keys: int | None = None) -> int:
    """Splits of the keys: enough for ~``TARGET_PROGRAMS`` programs, none under ``MIN_SPLIT_KEYS``
    keys, each a whole number of blocks. programs: B * KV; n: keys in the cache; visible_keys: the
    most keys one row's queries can see (a static bound: a sliding window's span; None: n).

    The bound matters on a long buffer under a window: at batch 1 a 512-byte window over a 4 224-byte
    buffer would otherwise take 7-8 splits that mostly see nothing, and lose the one-split call's
    direct layout (pads, transposes and the combine around each layer's kernel, generate_speed.md run
    21; its cache writes too, until the first split wrote them)."""
    keys = n if visible_keys is None else max(1, min(n, visible_keys))
    splits = min(max(1, keys // MIN_SPLIT_KEYS), max(1, TARGET_PROGRAMS // programs))
    return _ceil(keys, _ceil(_ceil(keys, splits), block_k) * block_k)  # whole blocks that hold the keys


def visible_range(mask: jax.Array, first_key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Per row, a range ``lo .. hi - 1`` of keys, read around the end (key ``k`` is ``k mod N``),
    that holds every key any of its queries sees; (0, 0) for a row that sees none. mask: bool[B, T,
    N] -> (int32[B] in [0, N), int32[B] in [lo, lo + N]).

    It starts at the first key that opens a visible run (visible, its predecessor around the end
    not), and ends after the last visible key from there: for the keys of a buffer (a causal prefix,
    a window) the first to the last visible key; for a ring cache's window (fastblt.sampler.state.
    ring_slots), which may run past the last slot into the first, just that window.

    ``first_key`` int32[B] (a ring's caller gives it: the slot of the oldest position its queries
    can see) sets where the range starts instead, so that every query reads its keys in the order of
    their positions whatever the other queries see (a ring every key of which some query sees has
    no opening key to start from)."""
    n = mask.shape[2]
    seen = jnp.any(mask, axis=1)
    has = jnp.any(seen, axis=1)
    if first_key is None:
        opens = seen & ~jnp.roll(seen, 1, axis=1)
        lo = jnp.argmax(opens, axis=1).astype(jnp.int32)  # no opening key (every key seen): 0
    else:
        lo = jnp.mod(first_key, n).astype(jnp.int32)
    after = jnp.mod(jnp.arange(n, dtype=jnp.int32)[None] - lo[:, None], n)  # keys from lo on
    hi = lo + 1 + jnp.max(jnp.where(seen, after, 0), axis=1)
    return jnp.where(has, lo, 0), jnp.where(has, hi, 0)


def _tile(x: jax.Array, copies: int) -> jax.Array:
    """[R, ...] -> [copies * R, ...]: the rows repeated as a block ``copies`` times (1: x itself)."""
    if copies == 1:
        return x
    return jnp.broadcast_to(x[None], (copies, *x.shape)).reshape(copies * x.shape[0], *x.shape[1:])


def _untile(x: jax.Array, copies: int) -> jax.Array:
    """The inverse of :func:`_tile` on rows computed alike in every copy: their max, which is any one
    of them exactly (Triton cannot slice a block of registers)."""
    if copies == 1:
        return x
    return jnp.max(x.reshape(copies, x.shape[0] // copies, *x.shape[1:]), axis=0)


def _kernel(*refs, n, splits, block_k, scale, copies, new_keys=0, writes=True):
    """One (row, kv head, split). Inputs: lo_ref/hi_ref the row's visible key range (scalars), q_ref
    [R, hd], k_ref/v_ref [N, hd], m_ref int8[R or 1, N] (1 = visible; one row: every query row's
    mask); with ``new_keys`` = T > 0 also nv_ref int8[R or 1, T] (which of the T new keys each query
    row sees), kn_ref/vn_ref [T, hd] (the new keys and values) and, if ``writes``, T column scalars
    (where each goes in the cache; out of range: nowhere); with several splits the first folds the new
    keys in and writes them, the others mask their columns. Outputs: o [R, hd]
    (normalised, when there is one split), or o [R, hd] float32 unnormalised with the softmax max [R]
    and sum [R] (several splits); with new keys that it writes also the caches (aliased to
    k_ref/v_ref), written at the columns. ``copies``: R < 16 rows (the direct layout) are repeated
    ``copies`` times to the 16 rows Triton's dot needs, and the repeats dropped from the output; every
    product is a Triton dot."""
    n_in = 6 + (3 + (new_keys if writes else 0) if new_keys else 0)
    (lo_ref, hi_ref, q_ref, k_ref, v_ref, m_ref), extra, out_refs = refs[:6], refs[6:n_in], refs[n_in:]
    r = q_ref.shape[0] * copies  # rows of the products
    lo, hi = lo_ref[()], hi_ref[()]
    if splits > 1:  # split s takes the s-th of ``splits`` runs of whole blocks over the row's range
        base = (lo // block_k) * block_k
        per_split = ((hi - base + splits - 1) // splits + block_k - 1) // block_k * block_k
        first = base + pl.program_id(2) * per_split
        lo, hi = jnp.maximum(lo, first), jnp.minimum(hi, first + per_split)
    q = _tile(q_ref[...], copies)
    cols = []  # the new keys' columns, -1 where out of range
    for col_ref in extra[3:]:
        col = col_ref[()]
        cols.append(jnp.where((col >= 0) & (col < n), col, -1))

    def body(a, b, i, carry):  # keys a .. b - 1 of block i (a run's first and last blocks are partial)
        o, mx, den = carry
        start = i * block_k
        pos = start + jnp.arange(block_k)
        in_range = pos < n
        vis = plgpu.load(m_ref.at[:, pl.ds(start, block_k)], mask=in_range[None, :], other=0) != 0
        vis = vis & ((pos >= a) & (pos < b))[None, :]
        if vis.shape[0] > 1:  # one mask row per query row (one row serves all rows as it is)
            vis = _tile(vis, copies)
        for col in cols:  # the cache holds the old entry there: the new key is added after the loop
            vis = vis & (pos != col)[None, :]
        k = plgpu.load(k_ref.at[pl.ds(start, block_k), :], mask=in_range[:, None], other=0)
        v = plgpu.load(v_ref.at[pl.ds(start, block_k), :], mask=in_range[:, None], other=0)
        s = plgpu.dot(q, k, trans_b=True).astype(jnp.float32) * scale  # [R, block_k]
        s = jnp.where(vis, s, _NEG)
        new_mx = jnp.maximum(mx, jnp.max(s, axis=1))
        p = jnp.where(vis, jnp.exp(s - new_mx[:, None]), 0.0)
        fix = jnp.exp(mx - new_mx)
        p_v = p.astype(v.dtype)
        o = o * fix[:, None] + plgpu.dot(p_v, v).astype(jnp.float32)
        return o, new_mx, den * fix + jnp.sum(p, axis=1)

    init = (
        jnp.zeros((r, q.shape[1]), jnp.float32),
        jnp.full((r,), _NEG, jnp.float32),
        jnp.zeros((r,), jnp.float32),
    )

    # Only the blocks of the visible range: a window at the end of a long buffer reads the window. The
    # range may run past the end into the start (a ring cache's window, see visible_range): two runs.
    def run(a, b, carry):
        return jax.lax.fori_loop(
            a // block_k, (b + block_k - 1) // block_k, functools.partial(body, a, b), carry
        )

    carry = run(jnp.minimum(lo, n), jnp.minimum(hi, n), init)
    o, mx, den = run(jnp.maximum(lo, n) - n, jnp.maximum(hi, n) - n, carry)
    if new_keys:
        main = 1 if splits == 1 else 3  # the output, or the split's output, max and sum
        only = pl.program_id(2) == 0 if splits > 1 else None  # each new key counted and written once
        o, mx, den = _add_new_keys(q, extra, cols, out_refs[main:], (o, mx, den), scale, copies, only)
        out_refs = out_refs[:main]
    if len(out_refs) == 1:  # one split: finish here (a row with no visible key gives 0)
        out = jnp.where(den[:, None] > 0, o / jnp.where(den > 0, den, 1.0)[:, None], 0.0)
        out_refs[0][...] = _untile(out, copies).astype(out_refs[0].dtype)
    else:
        o_ref, mx_ref, den_ref = out_refs
        o_ref[...] = o
        mx_ref[...] = mx
        den_ref[...] = den


# At most this many query rows (a power of two, at most MIN_ROWS) run in the arrays' own layouts
# (direct_layout): the kernel reads q and writes the output where they are, and repeats the rows in
# registers up to the 16 Triton's dot needs. Outside it, XLA pads and transposes q before the kernel
# and transposes the output after it, ~3 us per layer and step at batch 1 (generate_speed.md, run 9).
# 16 takes a decode step's usual calls (1 or 2 queries of one head per kv head) and power-of-two
# chunks of up to 16 queries. On its own it moved ar at batch 1 from 1.38 to 1.34 ms per byte on one
# H200 (run 12); with WRITE_CACHE it is what lets the kernel read q, k and v in place (below).
# 0 turns it off (generate_speed.py --decode-direct-rows 0).
MAX_DIRECT_ROWS = 16
# Whether the sampler's cached attention lets the kernel write the step's new keys and values into
# the caches (decode_attention_write) instead of XLA's two scatters per layer and step. With the
# direct layout on as well, the sampler hands the kernel q, k and v as HeadViews of the layer's q|k|v
# product, read in place: no scatter, slice, pad or transpose is left around the kernel. On one H200
# (generate_speed.md, run 12, one machine session) ar went from 1.38 to 1.27 ms per byte at batch 1
# and from 1.63 to 1.54 ms per step at batch 32, blt_s8 from 0.74 to 0.70 and 1.01 to 0.98 ms per
# pass. In the dot layout alone the writes gained nothing (run 11: slices and transposes of k and v
# took the scatters' place). False: XLA's scatters (generate_speed.py --no-decode-cache-write).
WRITE_CACHE = True
# Whether calls of several key splits write the caches too (the first split writes and counts the new
# keys; the others mask their columns), instead of XLA's scatters: the global model's calls at batch
# 1 over a long prompt's patches (generate_speed.md, run 22: 0.077 ms of scatters per byte at 4 000
# bytes). False: only one-split calls write (generate_speed.py --no-split-writes).
SPLIT_WRITES = True


def _add_new_keys(q, extra, cols, cache_outs, carry, scale, copies, only=None):
    """The step's new keys folded into the online softmax (o [R, hd], max [R], sum [R]), and written
    into the caches at their columns (after the loop: the loop's reads saw the old entries, masked).
    ``only``: a scalar bool (the first of several key splits), None: always. Where it is false the
    keys are neither seen nor written (another split of the row does both; a split that reads a
    column being written masks it, so it sees neither entry)."""
    nv_ref, kn_ref, vn_ref = extra[:3]
    o, mx, den = carry
    kn, vn = kn_ref[...], vn_ref[...]  # [T, hd]
    seen = nv_ref[...] != 0  # [R or 1, T]
    if seen.shape[0] > 1:
        seen = _tile(seen, copies)
    if only is not None:
        seen = seen & only
    s = jnp.sum(q.astype(jnp.float32)[:, None, :] * kn.astype(jnp.float32)[None], axis=2) * scale
    s = jnp.where(seen, s, _NEG)  # [R, T]
    new_mx = jnp.maximum(mx, jnp.max(s, axis=1))
    p = jnp.where(seen, jnp.exp(s - new_mx[:, None]), 0.0)
    fix = jnp.exp(mx - new_mx)
    # A key no query sees may be garbage (an inert column's NaN): selected away, not multiplied by 0.
    pv = p.astype(vn.dtype).astype(jnp.float32)[:, :, None] * vn.astype(jnp.float32)[None]
    pv = jnp.sum(jnp.where(seen[:, :, None], pv, 0.0), axis=1)
    for t, col in enumerate(cols):  # none where the keys are only read (decode_attention_extra)
        kc_ref, vc_ref = cache_outs[:2]

        @pl.when((col >= 0) if only is None else (col >= 0) & only)
        def _write(t=t, col=col, kc_ref=kc_ref, vc_ref=vc_ref):
            kc_ref[pl.ds(col, 1), :] = kn_ref[pl.ds(t, 1), :]
            vc_ref[pl.ds(col, 1), :] = vn_ref[pl.ds(t, 1), :]

    return o * fix[:, None] + pv, new_mx, den * fix + jnp.sum(p, axis=1)


def direct_layout(t: int, group: int, splits: int, max_rows: int | None = None) -> bool:
    """Whether a call runs on q, the mask and the output as they are (no transpose, no zero rows, no
    combine; the kernel repeats the rows up to MIN_ROWS in registers): one key split, at most
    ``max_rows`` (None: MAX_DIRECT_ROWS) and at most MIN_ROWS query rows, a power of two, and either
    one head per kv head (the rows are t queries) or one query (the rows are its heads)."""
    rows_ = t * group
    limit = min(MAX_DIRECT_ROWS if max_rows is None else max_rows, MIN_ROWS)
    return splits == 1 and rows_ <= limit and rows_ == _pow2(rows_) and (group == 1 or t == 1)


def decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    *,
    block_k: int | None = None,
    splits: int | None = None,
    direct_rows: int | None = None,
    interpret: bool | None = None,
    visible_keys: int | None = None,
    first_key: jax.Array | None = None,
) -> jax.Array:
    """Attention of a few queries per row over a key cache, under a dense mask, in one kernel.

    Args:
      q: float[B, T, H, hd] (T small: a decode step's new bytes).
      k, v: float[B, N, KV, hd], the cache as the sampler keeps it; KV divides H.
      mask: bool[B, T, N] (True = visible).
      block_k: keys per block, a power of two >= 16 (None: :func:`block_keys`).
      splits: key splits (None: :func:`key_splits`, sized for ``visible_keys``).
      direct_rows: the most query rows run in the arrays' own layouts (:func:`direct_layout`; None:
        MAX_DIRECT_ROWS, 0: never).
      interpret: run in Pallas interpret mode (None: unless JAX's backend is a GPU; decided by the
        device, not by fastblt.model.attention.target_platform, so that CPU tests can trace the
        sampler for a GPU and still run the kernel).
      visible_keys: the most keys one row's queries can see, a static bound (a sliding window's
        ``window + T - 1``; None: N). It sizes the key splits only: the mask decides what is seen.
      first_key: int32[B], where each row's keys start in a ring cache (:func:`visible_range`).

    Returns:
      float[B, T, H, hd] in q's dtype; a query with no visible key gives 0.
    """
    q = cut_out(q)  # views are read in place by the cache-writing call only
    return _attend(q, k, v, mask, None, block_k, splits, direct_rows, interpret, visible_keys, first_key)[0]


def writes_cache(q: jax.Array, cache: jax.Array, visible_keys: int | None = None) -> bool:
    """Whether the sampler lets the kernel write its caches: WRITE_CACHE on and :func:`write_supported`
    (and, unless SPLIT_WRITES, one key split)."""
    split_ok = SPLIT_WRITES or one_split(q, cache, visible_keys)
    return WRITE_CACHE and write_supported(q, cache) and split_ok


def write_supported(q: jax.Array, cache: jax.Array) -> bool:
    """Whether :func:`decode_attention_write` takes queries float[B, T, H, hd] over ``cache``
    [B, N, KV, hd]: a supported call, T a power of two, q in the cache's dtype (any number of key
    splits)."""
    t = q.shape[1]
    return t == _pow2(t) and q.dtype == cache.dtype and supported(q, cache.shape[2])


def one_split(q: jax.Array, cache: jax.Array, visible_keys: int | None = None) -> bool:
    """Whether a call of queries float[B, T, H, hd] over ``cache`` [B, N, KV, hd] runs as one key split
    (:func:`key_splits`, ``visible_keys`` as :func:`decode_attention`'s)."""
    b, n, kv, d = q.shape[0], *cache.shape[1:]
    return key_splits(b * kv, n, block_keys(d, q.dtype), visible_keys) == 1


def reads_in_place(
    q: jax.Array | HeadView, cache: jax.Array, direct_rows: int | None = None, visible_keys: int | None = None
) -> bool:
    """Whether :func:`decode_attention_write` reads queries float[B, T, H, hd] and the new keys and
    values as :class:`HeadView` in place over ``cache`` [B, N, KV, hd]: a write it supports, one head
    per kv head, and the direct layout (:func:`direct_layout`; direct_rows None: MAX_DIRECT_ROWS)."""
    t, h = q.shape[1], q.shape[2]
    return (
        write_supported(q, cache)
        and one_split(q, cache, visible_keys)
        and h == cache.shape[2]
        and direct_layout(t, 1, 1, direct_rows)
    )


def decode_attention_write(
    q: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    cols: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    mask: jax.Array,
    *,
    block_k: int | None = None,
    splits: int | None = None,
    direct_rows: int | None = None,
    interpret: bool | None = None,
    visible_keys: int | None = None,
    first_key: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A decode step's cache write and attention in one kernel: ``scatter_rows`` of the new keys and
    values into the caches at ``cols``, then :func:`decode_attention` over the written caches, without
    the two scatter kernels XLA runs for the writes.

    Args:
      q: float[B, T, H, hd]; k_new, v_new: float[B, T, KV, hd] (cast to the caches' dtype). Each may
        be a :class:`HeadView` (of the caches' dtype): read in place where :func:`reads_in_place`,
        else cut out first.
      cols: int32[B, T], where each new key goes (out of range: not written, not seen).
      k_cache, v_cache: [B, N, KV, hd]; mask: bool[B, T, N] over the written caches.
      block_k, splits, direct_rows, interpret, visible_keys, first_key: as :func:`decode_attention`
        (with several key splits the first writes the new keys and folds them in).

    Returns:
      (o float[B, T, H, hd], k_cache, v_cache written).
    """
    if not write_supported(q, k_cache):
        raise ValueError(
            f"decode_attention_write takes a power-of-two number of queries, got q "
            f"{q.shape} {q.dtype} over a cache {k_cache.shape} {k_cache.dtype}: check write_supported first"
        )
    if k_new.shape != (*q.shape[:2], *k_cache.shape[2:]) or cols.shape != q.shape[:2]:
        raise ValueError(f"k_new must be [B, T, KV, hd] and cols [B, T], got {k_new.shape} and {cols.shape}")
    views = (q, k_new, v_new)
    if any(isinstance(x, HeadView) for x in views):
        if (
            not all(isinstance(x, HeadView) for x in views)
            or not reads_in_place(q, k_cache, direct_rows, visible_keys)
            or (splits or 1) > 1
            or k_new.dtype != k_cache.dtype
            or v_new.dtype != v_cache.dtype
        ):
            q, k_new, v_new = (cut_out(x) for x in views)
    if not isinstance(k_new, HeadView):
        k_new, v_new = k_new.astype(k_cache.dtype), v_new.astype(v_cache.dtype)
    new = (k_new, v_new, cols.astype(jnp.int32), None)
    return _attend(
        q, k_cache, v_cache, mask, new, block_k, splits, direct_rows, interpret, visible_keys, first_key
    )


def extra_supported(q: jax.Array, cache: jax.Array, visible_keys: int | None = None) -> bool:
    """Whether :func:`decode_attention_extra` takes queries float[B, T, H, hd] over ``cache``: as
    :func:`write_supported`, in one key split."""
    return write_supported(q, cache) and one_split(q, cache, visible_keys)


def decode_attention_extra(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    mask: jax.Array,
    k_extra: jax.Array,
    v_extra: jax.Array,
    extra_mask: jax.Array,
    *,
    block_k: int | None = None,
    direct_rows: int | None = None,
    interpret: bool | None = None,
    visible_keys: int | None = None,
    first_key: jax.Array | None = None,
) -> jax.Array:
    """Attention over a key cache and T more keys that are not in it (BLT-D's block of cells over the
    decoder's cache: the cache read in place, not gathered and concatenated with the block's keys per
    layer), in one kernel; nothing is written.

    Args:
      q: float[B, T, H, hd]; k_cache, v_cache: [B, N, KV, hd]; mask: bool[B, T, N] over the cache.
      k_extra, v_extra: float[B, T, KV, hd] (cast to the caches' dtype); extra_mask: bool[B, T, T],
        which of them each query sees.
      block_k, direct_rows, interpret, visible_keys, first_key: as :func:`decode_attention`
        (``visible_keys`` bounds the cache keys a row sees).

    Returns:
      float[B, T, H, hd]: softmax over the visible cache keys and extra keys together; a query that
      sees none gives 0.
    """
    if not extra_supported(q, k_cache, visible_keys):
        raise ValueError(
            f"decode_attention_extra takes one key split and a power-of-two number of queries, got q "
            f"{q.shape} {q.dtype} over a cache {k_cache.shape} {k_cache.dtype}: check extra_supported first"
        )
    b, t = q.shape[:2]
    if k_extra.shape != (b, t, *k_cache.shape[2:]) or extra_mask.shape != (b, t, t):
        raise ValueError(
            f"k_extra must be [B, T, KV, hd] and extra_mask bool[B, T, T], got {k_extra.shape} and "
            f"{extra_mask.shape}"
        )
    new = (k_extra.astype(k_cache.dtype), v_extra.astype(v_cache.dtype), None, extra_mask)
    return _attend(
        q, k_cache, v_cache, mask, new, block_k, 1, direct_rows, interpret, visible_keys, first_key
    )[0]


def _attend(q, k, v, mask, new, block_k, splits, direct_rows, interpret, visible_keys=None, first_key=None):
    """decode_attention, with T more keys where ``new`` = (k_new, v_new, cols, seen) is given: written
    by the kernel at ``cols`` and seen where their columns are visible, or (cols None) only read, seen
    as ``seen`` bool[B, T, T] says. Returns (o,), or (o, k written, v written) where it writes.
    ``splits`` None: sized for ``visible_keys`` (:func:`key_splits`).

    The module's switches (MAX_DIRECT_ROWS, and whether to interpret) are read here, outside the jit:
    a traced call is cached by its static arguments, so a program's calls of one shape (a stack's
    layers, prefill and step alike) trace and lower the kernel once instead of once per layer. So
    are the key splits (MIN_SPLIT_KEYS, TARGET_PROGRAMS). The sizing constants read inside (MAX_ROWS,
    BLOCK_BYTES, BLOCK_K, NUM_STAGES, ...) are fixed for a process; changing one would need this
    jit's cache cleared (``_attend_once.clear_cache()``) as well as the sampler's."""
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    if direct_rows is None:
        direct_rows = MAX_DIRECT_ROWS
    if splits is None:
        block = block_keys(q.shape[-1], q.dtype) if block_k is None else block_k
        splits = key_splits(q.shape[0] * k.shape[2], k.shape[1], block, visible_keys)
    # Views go in as their parents, where they start as static arguments (heads: q's own count).
    starts = (0, 0, 0)
    heads = q.shape[2]
    if isinstance(q, HeadView):
        k_new, v_new, cols, seen = new
        starts = (q.start, k_new.start, v_new.start)
        q, new = q.parent, (k_new.parent, v_new.parent, cols, seen)
    return _attend_once(q, k, v, mask, new, block_k, splits, direct_rows, interpret, starts, heads, first_key)


@functools.partial(jax.jit, static_argnums=(5, 6, 7, 8, 9, 10))
def _attend_once(q, k, v, mask, new, block_k, splits, direct_rows, interpret, starts, heads, first_key=None):
    b, t, _, d = q.shape
    h = heads
    q_start, k_start, v_start = starts
    n, kv = k.shape[1], k.shape[2]
    if (
        not supported(jax.ShapeDtypeStruct((b, t, h, d), q.dtype), kv)
        or k.dtype != q.dtype
        or v.dtype != q.dtype
    ):
        raise ValueError(
            f"decode_attention takes a power-of-two head dim of 16..256, one float dtype and at most "
            f"{MAX_ROWS} query rows per kv head, got q {(b, t, h, d)} {q.dtype}, k {k.shape} {k.dtype}"
        )
    if mask.shape != (b, t, n):
        raise ValueError(f"mask must be bool[{b}, {t}, {n}], got {mask.shape}")
    block_k = block_keys(d, q.dtype) if block_k is None else block_k
    if block_k < 16 or block_k != _pow2(block_k):
        raise ValueError(f"block_k must be a power of two >= 16, got {block_k}")
    g = h // kv
    direct = direct_layout(t, g, splits, direct_rows)
    if (q.shape[2] != h or starts != (0, 0, 0)) and not (direct and g == 1 and new is not None):
        raise ValueError("head views are read in place only by a cache-writing call in the direct layout")
    one = splits == 1
    r = t * g if direct else rows(t, g)

    # Query rows of a program and the mask rows they read. Direct: q as it is (t queries of one head,
    # or one query's g heads); else (query, head of the group) rows, then zero rows up to a power of
    # two, and a single query's mask row serves every row (padding rows' outputs are dropped).
    def program_rows(x):  # [b, t, kv * g, ...] -> [b, kv, r, ...]
        x = x.reshape(b, t, kv, g, *x.shape[3:]).swapaxes(1, 2).reshape(b, kv, t * g, *x.shape[3:])
        return jnp.pad(x, [(0, 0), (0, 0), (0, r - t * g)] + [(0, 0)] * (x.ndim - 3))

    def mask_rows(m):  # [b, t, ...] -> [b, t or r, ...]
        if direct or t == 1:
            return m.astype(jnp.int8)
        return jnp.pad(jnp.repeat(m, g, axis=1), [(0, 0), (0, r - t * g), (0, 0)]).astype(jnp.int8)

    if not direct:
        q_in, q_spec = program_rows(q), pl.BlockSpec((None, None, r, d), lambda i, j, s: (i, j, 0, 0))
        o_shape, o_spec = q_in.shape, q_spec
    elif g == 1:  # the ~3 us of XLA's transpose and pad around the kernel (run 9) are not run
        q_in, q_spec = q, pl.BlockSpec((None, t, None, d), lambda i, j, s: (i, 0, q_start + j, 0))
        o_shape, o_spec = (b, t, h, d), pl.BlockSpec((None, t, None, d), lambda i, j, s: (i, 0, j, 0))
    else:
        q_in, q_spec = q.reshape(b, kv, g, d), pl.BlockSpec((None, None, g, d), lambda i, j, s: (i, j, 0, 0))
        o_shape, o_spec = q_in.shape, q_spec
    mr = mask_rows(mask)
    m_rows = mr.shape[1]
    row_scalar = pl.BlockSpec((None,), lambda i, j, s: (i,))
    cache_spec = pl.BlockSpec((None, n, None, d), lambda i, j, s: (i, 0, j, 0))
    args = [*visible_range(mask, first_key), q_in, k, v, mr]
    in_specs = [
        row_scalar,
        row_scalar,
        q_spec,
        cache_spec,
        cache_spec,
        pl.BlockSpec((None, m_rows, n), lambda i, j, s: (i, 0, 0)),
    ]

    if one:  # the kernel writes the normalised output, in q's layout (a view's: its own heads only)
        out_shape, out_specs = [jax.ShapeDtypeStruct(o_shape, q.dtype)], [o_spec]
    else:  # each split writes its unnormalised output, softmax max and sum; XLA combines them
        stats = jax.ShapeDtypeStruct((splits, b, kv, r), jnp.float32)
        out_shape = [jax.ShapeDtypeStruct((splits, b, kv, r, d), jnp.float32), stats, stats]
        stats_spec = pl.BlockSpec((None, None, None, r), lambda i, j, s: (s, i, j, 0))
        out_specs = [
            pl.BlockSpec((None, None, None, r, d), lambda i, j, s: (s, i, j, 0, 0)),
            stats_spec,
            stats_spec,
        ]
    aliases = {}
    writes = new is not None and new[2] is not None
    if new is not None:
        k_new, v_new, cols, seen = new
        if writes:  # each new key is seen where its column is
            valid = (cols >= 0) & (cols < n)
            seen = jnp.take_along_axis(mask, jnp.clip(cols, 0, n - 1)[:, None, :], axis=2) & valid[:, None, :]
        k_spec = pl.BlockSpec((None, t, None, d), lambda i, j, s: (i, 0, k_start + j, 0))
        v_spec = pl.BlockSpec((None, t, None, d), lambda i, j, s: (i, 0, v_start + j, 0))
        args += [mask_rows(seen), k_new, v_new]
        in_specs += [pl.BlockSpec((None, m_rows, t), lambda i, j, s: (i, 0, 0)), k_spec, v_spec]
    if writes:
        args += [cols[:, i] for i in range(t)]
        in_specs += [row_scalar] * t
        out_shape += [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
        out_specs += [cache_spec, cache_spec]
        aliases = {3: len(out_shape) - 2, 4: len(out_shape) - 1}  # the caches are written in place
    kernel = functools.partial(
        _kernel,
        n=n,
        splits=splits,
        block_k=block_k,
        scale=d**-0.5,
        copies=MIN_ROWS // (t * g) if direct else 1,
        new_keys=0 if new is None else t,
        writes=writes,
    )
    params = (
        {} if interpret else {"compiler_params": plgpu.CompilerParams(num_warps=4, num_stages=NUM_STAGES)}
    )
    outs = pl.pallas_call(
        kernel,
        grid=(b, kv, splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        interpret=interpret,
        name="fastblt_decode_attention",
        **params,
    )(*args)
    o = outs[0]
    if not one:
        _, mx, den = outs[:3]
        w = jnp.exp(mx - jnp.max(mx, axis=0))  # [S, b, kv, r]
        total = jnp.sum(den * w, axis=0)
        o = jnp.sum(o * w[..., None], axis=0)
        o = jnp.where(total[..., None] > 0, o / jnp.where(total > 0, total, 1.0)[..., None], 0.0)
    if not direct:
        o = o[:, :, : t * g].reshape(b, kv, t, g, d).swapaxes(1, 2)
    caches = tuple(outs[-2:]) if writes else ()
    return (o.reshape(b, t, h, d).astype(q.dtype), *caches)
