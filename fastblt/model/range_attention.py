"""Attention where each query sees one contiguous range of keys, as Pallas (Triton) kernels with
their own backward: a flash-attention forward and two backward kernels (dq; dk and dv).

A mask given as key ranges, query i seeing keys ``lo[i] <= j < hi[i]``, describes causal, sliding-
window and same-document masks, and BLT-D's block rows: a block cell sees the clean rows from its
window's first visible row up to its block's start (fastblt.train.blt_d.context_mask builds exactly
that). The kernels read keys where they lie, one tile of queries at a time over the union of its
rows' ranges, and read no mask: fastblt.model.block_rows' fused path today cuts overlapping key
windows per tile of blocks (a pad, a gather in the backward) and reads a dense bool mask as a bias
over ~1.7x the keys a cell sees (experiments/results/train_speed.md, run 9's leads). Queries are
padded to whole tiles (a copy where their count is not a multiple), and so are keys in the backward.

A query may also see a range of a second key array, in the same softmax (``extra``): BLT-D's block
cells see their own block's cells, which lie in the block rows' keys, not the clean rows'. The kernel
also returns each row's log-sum-exp, differentiable (the backward takes its cotangent too), so a
caller can merge it with attention over other keys.

The Pallas calls are compiled for the GPU whenever JAX's backend is one and interpreted otherwise
(``interpret``), as in fastblt.model.decode_attention; the CPU tests run them interpreted.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_NEG = -1e30  # as fastblt.model.attention: finite, so a row with no visible key stays finite
# Tiles (powers of two, at least 16). The forward and dq kernels hold a [BLOCK_Q, BLOCK_K] tile of
# scores and probabilities; the dk/dv kernel holds its key tile's k, v, dk and dv [BLOCK_K, d] for the
# whole loop plus the scores of BLOCK_Q_DKV queries, so it takes fewer queries at a time (register
# pressure at head dim 64 with 4 warps; JAX's Pallas flash attention uses 32 x 32 in its backward).
# On one H100 (train_speed.md run 10) these tiles ran the self-attention calls at ~0.7x cuDNN's rate;
# experiments/benchmarks/range_check.py's sweep times other tiles, warps and pipeline stages.
BLOCK_Q = 64
BLOCK_K = 64
BLOCK_Q_DKV = 32
NUM_WARPS = 4
NUM_STAGES = 2  # Triton's software pipelining of the key (query) tile loop
# The module settings above that change the compiled kernels (benchmarks sweep and record them).
# Visiting the tiles every row of a tile sees whole without the mask was measured and dropped: the
# same tiles ran 2.45 vs 2.36 ms (decoder self-attention), 1.55 vs 1.39 (global) and 4.00 vs 3.52
# (BLT-D-4 block rows) with it on one H200 (train_speed.md run 11).
TUNABLES = ("BLOCK_Q", "BLOCK_K", "BLOCK_Q_DKV", "NUM_WARPS", "NUM_STAGES")


def settings() -> dict[str, int]:
    """The kernels' :data:`TUNABLES` as they are now, by lower-case name."""
    return {name.lower(): globals()[name] for name in TUNABLES}


def on_one_device() -> bool:
    """The kernels have no sharding rule: on a mesh of several devices XLA's partitioner would
    gather their operands onto every device, so callers use them on one device only."""
    return jax.device_count() == 1


def supported(q: jax.Array, k: jax.Array) -> bool:
    """Whether the kernels take these shapes: a power-of-two head dim in [16, 256] (Triton's dot and
    loads) and heads a multiple of the kv heads."""
    d = q.shape[-1]
    return 16 <= d <= 256 and d & (d - 1) == 0 and q.shape[2] % k.shape[2] == 0


def local_ranges(docs: jax.Array | None, n: int, window: int | None) -> tuple[jax.Array, jax.Array]:
    """The key ranges of causal self-attention over rows 0..n-1, within ``window`` and each row's
    document (fastblt.model.attention.LocalMask's mask): lo = max(i - window + 1, first row of i's
    document), hi = i + 1.

    docs: int32[b, n] document ids, non-decreasing along the row (attention.document_ids), or None.
    Returns lo, hi: int32[b, n] (int32[1, n] without documents).
    """
    i = jnp.arange(n, dtype=jnp.int32)[None]
    lo = jnp.zeros_like(i) if window is None else jnp.maximum(i - window + 1, 0)
    if docs is not None:
        first = jax.vmap(lambda d: jnp.searchsorted(d, d, side="left"))(docs).astype(jnp.int32)
        lo = jnp.maximum(lo, first)
    return lo, jnp.broadcast_to(i + 1, lo.shape)


def range_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lo: jax.Array,
    hi: jax.Array,
    *,
    extra: tuple[jax.Array, jax.Array, jax.Array, jax.Array] | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    block_q_dkv: int | None = None,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Softmax attention of each query over its key range, with grouped kv heads.

    Args:
      q: float[b, T, H, d]; k, v: float[b, S, KV, d] (KV divides H).
      lo, hi: int[b, T]: query i sees keys j with lo[i] <= j < hi[i] (both clipped to [0, S]); an empty
        range (hi <= lo) sees nothing.
      extra: a second key set and each query's range in it, (k2, v2 float[b, S2, KV, d], lo2, hi2
        int[b, T]), read where it lies: one softmax runs over both ranges together. BLT-D's block
        rows see a range of the clean rows and a range of their own block's cells, two arrays
        (fastblt.model.block_rows.ranged_block_attention).
      block_q, block_k, block_q_dkv: tile sizes (powers of two, at least 16; None: the module's
        BLOCK_Q, BLOCK_K, BLOCK_Q_DKV, read at the call).
      interpret: Pallas interpret mode (None: unless JAX's backend is a GPU).

    Returns:
      out float[b, T, H, d] in q's dtype (0 for a query that sees nothing) and lse float32[b, T, H],
      each row's log of the sum of exp(scores) over its keys (-1e30 for a query that sees nothing).
      Both are differentiable (q and every k, v; the ranges are not).
    """
    sets = [(k, v, lo, hi)] + ([tuple(extra)] if extra is not None else [])
    for ks, vs, los, his in sets:
        chex.assert_rank([q, ks, vs, los, his], [4, 4, 4, 2, 2])
        chex.assert_equal_shape([ks, vs])
        chex.assert_equal_shape([los, his])
        chex.assert_equal_shape_prefix([q, los], 2)
        chex.assert_equal_shape_prefix([q, ks], 1)
        chex.assert_equal_shape_suffix([k, ks], 2)
        chex.assert_type([ks, vs], k.dtype)  # Triton's dot takes one dtype
    if not supported(q, k):
        raise ValueError(
            f"range_attention takes a power-of-two head dim in [16, 256] and heads a multiple of the kv "
            f"heads; got q {list(q.shape)}, k {list(k.shape)}: use fastblt.model.attention.attention "
            "with a dense mask instead"
        )
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    blocks = (block_q or BLOCK_Q, block_k or BLOCK_K, block_q_dkv or BLOCK_Q_DKV)
    t = q.shape[1]
    pad = -t % max(blocks[0], blocks[2])
    if pad:  # padded queries see nothing
        q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))

    def ranges(x: jax.Array, n: int) -> jax.Array:
        return jnp.clip(jnp.pad(x.astype(jnp.int32), ((0, 0), (0, pad))), 0, n)

    keys = tuple((ks, vs, ranges(los, ks.shape[1]), ranges(his, ks.shape[1])) for ks, vs, los, his in sets)
    out, lse = _attend(q, keys, blocks, bool(interpret))
    return out[:, :t], jnp.swapaxes(lse, 1, 2)[:, :t]


def _params(interpret: bool) -> dict:
    if interpret:
        return {}
    return {"compiler_params": plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES)}


def key_tiles_per_query_tile(
    lo: jax.Array, hi: jax.Array, block_q: int, block_k: int
) -> tuple[jax.Array, jax.Array]:
    """For each tile of ``block_q`` queries, the key tiles [first, last) its rows' ranges touch
    (first >= last: every range of the tile is empty). lo, hi: int32[b, T], T a multiple of block_q.
    Returns int32[b, T / block_q] each; the kernels take them as scalars (loop bounds)."""
    b, t = lo.shape
    rows_lo = lo.reshape(b, t // block_q, block_q)
    rows_hi = hi.reshape(b, t // block_q, block_q)
    some = rows_hi > rows_lo
    first = jnp.min(jnp.where(some, rows_lo, jnp.iinfo(jnp.int32).max), axis=-1) // block_k
    last = (jnp.max(jnp.where(some, rows_hi, 0), axis=-1) + block_k - 1) // block_k
    return first.astype(jnp.int32), last.astype(jnp.int32)


def _scores(q, k, start, lo, hi, n, scale):
    """Scaled scores of a query tile [BQ, d] against the key tile at ``start`` [BK, d], with the
    visibility of each pair: key start + j visible to row i iff lo[i] <= start + j < hi[i] and
    start + j < n."""
    pos = start + jnp.arange(k.shape[0], dtype=jnp.int32)
    vis = (pos[None, :] >= lo[:, None]) & (pos[None, :] < hi[:, None]) & (pos < n)[None, :]
    s = plgpu.dot(q, k, trans_b=True).astype(jnp.float32) * scale
    return jnp.where(vis, s, _NEG), vis


def _load_keys(ref, start, block, n):
    pos = start + jnp.arange(block, dtype=jnp.int32)
    return plgpu.load(ref.at[pl.ds(start, block), :], mask=(pos < n)[:, None], other=0)


def _split_refs(refs, n_sets: int):
    """A kernel's refs as (per key set: first, last, k, v, lo, hi; the rest in order), the order the
    pallas_calls below pass them."""
    sets = [refs[6 * i : 6 * i + 6] for i in range(n_sets)]
    return sets, refs[6 * n_sets :]


def _fwd_kernel(*refs, n_sets, block_k, scale):
    """One (batch row, head, query tile). Per key set: its key tiles [first, last) (scalars),
    k_ref/v_ref [S, d] and lo_ref/hi_ref [BQ]; then q_ref [BQ, d]; writes o [BQ, d] and lse [BQ]: one
    online softmax over the tiles of every set."""
    sets, (q_ref, o_ref, lse_ref) = _split_refs(refs, n_sets)
    q = q_ref[...]
    rows, d = q.shape
    carry = (
        jnp.zeros((rows, d), jnp.float32),
        jnp.full((rows,), _NEG, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    for first_ref, last_ref, k_ref, v_ref, lo_ref, hi_ref in sets:
        n = k_ref.shape[0]
        lo, hi = lo_ref[...], hi_ref[...]

        def body(i, carry, k_ref=k_ref, v_ref=v_ref, lo=lo, hi=hi, n=n):
            o, mx, den = carry
            start = i * block_k
            s, vis = _scores(q, _load_keys(k_ref, start, block_k, n), start, lo, hi, n, scale)
            v = _load_keys(v_ref, start, block_k, n)
            new_mx = jnp.maximum(mx, jnp.max(s, axis=1))
            p = jnp.where(vis, jnp.exp(s - new_mx[:, None]), 0.0)
            fix = jnp.exp(mx - new_mx)
            o = o * fix[:, None] + plgpu.dot(p.astype(v.dtype), v).astype(jnp.float32)
            return o, new_mx, den * fix + jnp.sum(p, axis=1)

        carry = jax.lax.fori_loop(first_ref[()], last_ref[()], body, carry)
    o, mx, den = carry
    seen = den > 0
    safe = jnp.where(seen, den, 1.0)
    o_ref[...] = jnp.where(seen[:, None], o / safe[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, mx + jnp.log(safe), _NEG)


def _dq_kernel(*refs, n_sets, block_k, scale):
    """One (batch row, head, query tile): dq [BQ, d] over the tile's keys in every set, as the forward
    visits them. Refs: the key sets as in _fwd_kernel, then q, do [BQ, d], lse, delta [BQ] and dq;
    delta = rowsum(o * do) - dlse."""
    sets, (q_ref, do_ref, lse_ref, delta_ref, dq_ref) = _split_refs(refs, n_sets)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    dq = jnp.zeros(q.shape, jnp.float32)
    for first_ref, last_ref, k_ref, v_ref, lo_ref, hi_ref in sets:
        n = k_ref.shape[0]
        lo, hi = lo_ref[...], hi_ref[...]

        def body(i, dq, k_ref=k_ref, v_ref=v_ref, lo=lo, hi=hi, n=n):
            start = i * block_k
            k = _load_keys(k_ref, start, block_k, n)
            v = _load_keys(v_ref, start, block_k, n)
            s, vis = _scores(q, k, start, lo, hi, n, scale)
            p = jnp.where(vis, jnp.exp(s - lse[:, None]), 0.0)
            dp = plgpu.dot(do, v, trans_b=True).astype(jnp.float32)
            ds = p * (dp - delta[:, None])
            return dq + plgpu.dot(ds.astype(k.dtype), k).astype(jnp.float32)

        dq = jax.lax.fori_loop(first_ref[()], last_ref[()], body, dq)
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(
    tfirst_ref, tlast_ref, k_ref, v_ref, q_ref, do_ref, lo_ref, hi_ref, lse_ref, delta_ref, dk_ref, dv_ref,
    *, block_q, scale,
):  # fmt: skip
    """One (batch row, head, key tile): k_ref/v_ref [BK, d] (the tile), q_ref/do_ref [T, d] and
    lo/hi/lse/delta [T] (every query); loops over the query tiles [tfirst, tlast) whose ranges touch
    this key tile. Writes dk, dv [BK, d] of this query head (the caller sums a kv head's group)."""
    k, v = k_ref[...], v_ref[...]
    block_k = k.shape[0]
    n = block_k * pl.num_programs(2)  # the keys' padded length; rows past S are never visible
    start = pl.program_id(2) * block_k

    def body(t, carry):
        dk, dv = carry
        rows = pl.ds(t * block_q, block_q)
        q, do = q_ref[rows, :], do_ref[rows, :]
        lo, hi, lse, delta = lo_ref[rows], hi_ref[rows], lse_ref[rows], delta_ref[rows]
        s, vis = _scores(q, k, start, lo, hi, n, scale)  # [BQ, BK]
        p = jnp.where(vis, jnp.exp(s - lse[:, None]), 0.0)
        dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True).astype(jnp.float32)
        dp = plgpu.dot(do, v, trans_b=True).astype(jnp.float32)
        ds = p * (dp - delta[:, None])
        dk = dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True).astype(jnp.float32)
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(tfirst_ref[()], tlast_ref[()], body, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _key_set_specs(k: jax.Array, block_q: int, g: int) -> list:
    """BlockSpecs of one key set's refs (first, last, k, v, lo, hi) on a (batch, head, query tile) grid."""
    s, d = k.shape[1], k.shape[3]
    kv = pl.BlockSpec((None, s, None, d), lambda i, j, r: (i, 0, j // g, 0))
    rows = pl.BlockSpec((None, block_q), lambda i, j, r: (i, r))
    tile_scalar = pl.BlockSpec((None, None), lambda i, j, r: (i, r))
    return [tile_scalar, tile_scalar, kv, kv, rows, rows]


def _key_set_args(keys, block_q: int, block_k: int, g: int) -> tuple[list, list]:
    """Each key set's operands in _split_refs' order, and their BlockSpecs."""
    args, specs = [], []
    for k, v, lo, hi in keys:
        first, last = key_tiles_per_query_tile(lo, hi, block_q, block_k)
        args += [first, last, k, v, lo, hi]
        specs += _key_set_specs(k, block_q, g)
    return args, specs


def _forward(q, keys, blocks, interpret):
    block_q, block_k, _ = blocks
    b, t, h, d = q.shape
    g = h // keys[0][0].shape[2]
    q_spec = pl.BlockSpec((None, block_q, None, d), lambda i, j, r: (i, r, j, 0))
    args, specs = _key_set_args(keys, block_q, block_k, g)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, n_sets=len(keys), block_k=block_k, scale=d**-0.5),
        grid=(b, h, t // block_q),
        in_specs=[*specs, q_spec],
        out_specs=[q_spec, pl.BlockSpec((None, None, block_q), lambda i, j, r: (i, j, r))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, t), jnp.float32)],
        interpret=interpret,
        name="fastblt_range_attention",
        **_params(interpret),
    )(*args, q)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _attend(q, keys, blocks, interpret):
    """q [b, T, H, d] (T a multiple of the query tiles); keys: per key set (k, v [b, S, KV, d], lo, hi
    int32[b, T] within [0, S]); blocks (block_q, block_k, block_q_dkv) -> (out [b, T, H, d], lse
    float32[b, H, T]) of one softmax over every set's ranges."""
    return _forward(q, keys, blocks, interpret)


def _attend_fwd(q, keys, blocks, interpret):
    out, lse = _forward(q, keys, blocks, interpret)
    return (out, lse), (q, keys, out, lse)


def query_tiles_per_key_tile(
    lo: jax.Array, hi: jax.Array, block_q: int, block_k: int, n_key_tiles: int
) -> tuple[jax.Array, jax.Array]:
    """For each key tile, the query tiles [first, last) whose rows' ranges may touch it (a contiguous
    superset: the kernels mask each pair exactly). lo, hi: int32[b, T], T a multiple of block_q.
    Returns first, last: int32[b, n_key_tiles] (first >= last: no query sees the tile)."""
    b, t = lo.shape
    rows_lo = lo.reshape(b, t // block_q, block_q)
    rows_hi = hi.reshape(b, t // block_q, block_q)
    some = rows_hi > rows_lo
    kmin = jnp.min(jnp.where(some, rows_lo, jnp.iinfo(jnp.int32).max), axis=-1)  # [b, tiles]
    kmax = jnp.max(jnp.where(some, rows_hi, 0), axis=-1)
    key_start = jnp.arange(n_key_tiles, dtype=jnp.int32) * block_k
    touch = (kmin[:, :, None] < key_start + block_k) & (kmax[:, :, None] > key_start)  # [b, tiles, keys]
    tile = jnp.arange(t // block_q, dtype=jnp.int32)[None, :, None]
    first = jnp.min(jnp.where(touch, tile, t // block_q), axis=1)
    last = jnp.max(jnp.where(touch, tile + 1, 0), axis=1)
    return first, last


def _key_grads(k, v, lo, hi, q, do, lse, delta, blocks, params, interpret, name):
    """dk, dv of one key set [b, S, KV, d]: for each key tile, the query tiles whose ranges in this
    set touch it. The softmax is over every set (lse, delta), so each set's gradients are its own.
    ``name``: the kernel's (a profile tells the sets apart)."""
    _, block_k, block_q_dkv = blocks
    b, t, h, d = q.shape
    s, kvh = k.shape[1:3]
    g = h // kvh
    n_tiles = -(-s // block_k)
    if n_tiles * block_k != s:  # the key-tile blocks below need whole tiles
        pad = ((0, 0), (0, n_tiles * block_k - s), (0, 0), (0, 0))
        k_p, v_p = jnp.pad(k, pad), jnp.pad(v, pad)
    else:
        k_p, v_p = k, v
    first, last = query_tiles_per_key_tile(lo, hi, block_q_dkv, block_k, n_tiles)
    scalar = pl.BlockSpec((None, None), lambda i, j, c: (i, c))
    k_tile = pl.BlockSpec((None, block_k, None, d), lambda i, j, c: (i, c, j // g, 0))
    head_out = pl.BlockSpec((None, block_k, None, d), lambda i, j, c: (i, c, j, 0))
    q_full = pl.BlockSpec((None, t, None, d), lambda i, j, c: (i, 0, j, 0))
    all_rows = pl.BlockSpec((None, t), lambda i, j, c: (i, 0))
    all_head_rows = pl.BlockSpec((None, None, t), lambda i, j, c: (i, j, 0))
    grad_dtype = k.dtype if g == 1 else jnp.float32  # a group's heads are summed below
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, block_q=block_q_dkv, scale=d**-0.5),
        grid=(b, h, n_tiles),
        in_specs=[
            scalar,
            scalar,
            k_tile,
            k_tile,
            q_full,
            q_full,
            all_rows,
            all_rows,
            all_head_rows,
            all_head_rows,
        ],
        out_specs=[head_out, head_out],
        out_shape=[jax.ShapeDtypeStruct((b, n_tiles * block_k, h, d), grad_dtype)] * 2,
        interpret=interpret,
        name=name,
        **params,
    )(first, last, k_p, v_p, q, do, lo, hi, lse, delta)
    dk, dv = dk[:, :s], dv[:, :s]
    if g > 1:
        dk = dk.reshape(b, s, kvh, g, d).sum(axis=3)
        dv = dv.reshape(b, s, kvh, g, d).sum(axis=3)
    return dk.astype(k.dtype), dv.astype(v.dtype)


def _attend_bwd(blocks, interpret, res, cotangents):
    block_q, block_k, _ = blocks
    q, keys, out, lse = res
    do, dlse = cotangents
    b, t, h, d = q.shape
    g = h // keys[0][0].shape[2]
    # dS = P * (dP - rowsum(o * do)) from the output; a cotangent of lse adds P * dlse.
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), do.astype(jnp.float32)) - dlse
    do = do.astype(q.dtype)
    params = _params(interpret)

    q_spec = pl.BlockSpec((None, block_q, None, d), lambda i, j, r: (i, r, j, 0))
    head_rows = pl.BlockSpec((None, None, block_q), lambda i, j, r: (i, j, r))
    args, specs = _key_set_args(keys, block_q, block_k, g)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, n_sets=len(keys), block_k=block_k, scale=d**-0.5),
        grid=(b, h, t // block_q),
        in_specs=[*specs, q_spec, q_spec, head_rows, head_rows],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=interpret,
        name="fastblt_range_attention_dq",
        **params,
    )(*args, q, do, lse, delta)
    key_grads = []
    for i, (k, v, lo, hi) in enumerate(keys):
        name = "fastblt_range_attention_dkv" + (f"_set{i}" if i else "")
        dk, dv = _key_grads(k, v, lo, hi, q, do, lse, delta, blocks, params, interpret, name)
        key_grads.append((dk, dv, None, None))
    return dq, tuple(key_grads)


_attend.defvjp(_attend_fwd, _attend_bwd)
