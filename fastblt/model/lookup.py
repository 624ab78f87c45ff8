"""Row gathers whose gradient is not a contended scatter-add: embedding lookups and per-byte reads.

The gradient of ``table[ids]`` is a scatter-add of the output gradient into the table. With many
repeated ids (the byte table: ~260 rows read by every byte; 3-gram hash rows of whitespace and
common words; the decoder's slots, each read by every byte of its patch) the GPU's atomic adds
collide on the same rows: at blt_mid shapes on an H200 the byte table's scatter took 114 ms and
the six hash tables 135 ms of a 287 ms step (experiments/results/train_speed.md).

:func:`take_rows` computes the same gradient without collisions:

* ids known to be sorted (bytes reading their patch's slots): chunks of :data:`SORTED_WINDOW`
  consecutive ids each sum into a window of as many rows from their first id, one small one-hot
  matmul per chunk (FLOPs ``2 * ids * window * width``, independent of the table's rows), and the
  windows are added to the table with a scatter whose collisions are only where windows overlap;
* a small table (at most :data:`ONE_HOT_MAX_ROWS` rows): ``one_hot(ids)^T @ g``, one matmul;
* otherwise: sort the ids, sum each run of equal ids with a segmented prefix scan (log-depth,
  no atomics), and write each run's sum to its row with a scatter whose indices are unique.

:func:`take_windows` reads windows of consecutive rows (BLT-D's tiles of clean keys); windows that
overlap would collide in their gradient's scatter as well (2.2 ms per tensor and layer at blt_mid,
~17 ms of a 147 ms BLT-D-4 step, 2026-12-04). :func:`add_windows` sums windows without a scatter:
each window is shifted into chunks of :data:`WINDOW_ALIGN` rows aligned to the table (a gather),
and a one-hot matmul adds the chunks into the table's chunks (19.2 -> 3.5 ms per BLT-D-4 step).

Both are deterministic; they sum in a different order than a sequential loop, so gradients agree
with ``jnp.take``'s to float rounding (tests/test_lookup.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Tables up to this many rows take the one-hot matmul (its FLOPs, 2 * rows * ids * width, stay
# below the sort's cost); larger ones the sorted segmented scan.
ONE_HOT_MAX_ROWS = 4096

# Ids per chunk of the sorted-ids gradient, and rows of its window. At blt_mid (1026 patch slots)
# it does 1/8 of the full one-hot's FLOPs; a chunk's ids beyond its window (a jump of more than
# this many rows, e.g. at a row's padding patches) go through a plain scatter-add.
SORTED_WINDOW = 128

# Rows per aligned chunk in add_windows: a window of W rows covers ceil((W + A - 1) / A) chunks, so
# the one-hot matmul's FLOPs are 2 * windows * that * table rows * width.
WINDOW_ALIGN = 64


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def take_rows(table: jax.Array, ids: jax.Array, ids_sorted: bool = False) -> jax.Array:
    """``table[ids]`` with a collision-free gradient for ``table``.

    Args:
      table: float[rows, ...]; ids: int[n] in ``[0, rows)``;
      ids_sorted: the ids are known to be non-decreasing (skips the sort in the gradient).

    Returns: float[n, ...] = ``jnp.take(table, ids, axis=0)``.
    """
    return jnp.take(table, ids, axis=0)


def _fwd(table, ids, ids_sorted):
    # The table is a residual only for its shape and dtype (it is a live parameter anyway).
    return jnp.take(table, ids, axis=0), (ids, table)


def _bwd(ids_sorted, res, g):
    ids, table = res
    return scatter_add_rows(g, ids, table.shape[0], ids_sorted).astype(table.dtype), None


take_rows.defvjp(_fwd, _bwd)


def scatter_add_rows(values: jax.Array, ids: jax.Array, rows: int, ids_sorted: bool = False) -> jax.Array:
    """``zeros([rows, ...]).at[ids].add(values)`` without colliding atomic adds, in float32.

    Args: values: float[n, ...]; ids: int[n] in ``[0, rows)``. Returns float32[rows, ...].
    """
    n = ids.shape[0]
    flat = values.reshape(n, -1)
    if ids_sorted:
        return _windowed_sum(flat, ids, rows).reshape(rows, *values.shape[1:])
    if rows <= ONE_HOT_MAX_ROWS:
        hot = jax.nn.one_hot(ids, rows, dtype=flat.dtype)
        out = jnp.einsum("nr,nd->rd", hot, flat, preferred_element_type=jnp.float32)
        return out.reshape(rows, *values.shape[1:])
    flat = flat.astype(jnp.float32)
    if ids_sorted:
        sorted_ids, sorted_vals = ids, flat
    else:
        sorted_ids, order = jax.lax.sort_key_val(ids, jnp.arange(n, dtype=jnp.int32))
        sorted_vals = jnp.take(flat, order, axis=0)
    starts = jnp.concatenate([jnp.ones((1,), bool), sorted_ids[1:] != sorted_ids[:-1]])
    ends = jnp.concatenate([sorted_ids[1:] != sorted_ids[:-1], jnp.ones((1,), bool)])

    def combine(a, b):
        a_start, a_val = a
        b_start, b_val = b
        return a_start | b_start, jnp.where(b_start[:, None], b_val, a_val + b_val)

    _, run_sums = jax.lax.associative_scan(combine, (starts, sorted_vals))
    # Only the last row of each run carries its run's sum; the others go out of bounds and drop.
    target = jnp.where(ends, sorted_ids, rows)
    out = jnp.zeros((rows, flat.shape[1]), jnp.float32).at[target].add(run_sums, mode="drop")
    return out.reshape(rows, *values.shape[1:])


def _windowed_sum(flat: jax.Array, ids: jax.Array, rows: int) -> jax.Array:
    """Rows' sums of sorted ids' values: flat float[n, d], ids int[n] -> float32[rows, d].

    Exact for any ids (an id outside its chunk's window is added by the fallback scatter); fast
    when each chunk's ids lie within :data:`SORTED_WINDOW` rows of its first id, as sorted runs do.
    """
    n, d = flat.shape
    c = SORTED_WINDOW
    chunks = -(-n // c)
    ids = jnp.pad(ids.astype(jnp.int32), (0, chunks * c - n), constant_values=rows).reshape(chunks, c)
    vals = jnp.pad(flat, ((0, chunks * c - n), (0, 0))).reshape(chunks, c, d)
    first = ids[:, :1]  # [chunks, 1]: the smallest id of a sorted chunk
    local = ids - first
    inside = (local >= 0) & (local < c)
    # one_hot of the out-of-range class c is a zero row: those ids take the fallback below.
    hot = jax.nn.one_hot(jnp.where(inside, local, c), c, dtype=vals.dtype)  # [chunks, c ids, c rows]
    part = jnp.einsum("kir,kid->krd", hot, vals, preferred_element_type=jnp.float32)
    # Short windows (SORTED_WINDOW rows) collide little: a scatter is cheaper here than
    # add_windows' aligned chunks (+2.2 ms per blt_mid step on an H200, 2026-12-04).
    target = (first + jnp.arange(c, dtype=jnp.int32)).reshape(-1)  # rows past the table drop
    out = jnp.zeros((rows, d), jnp.float32).at[target].add(part.reshape(-1, d), mode="drop")
    rest = jnp.where(inside, rows, ids).reshape(-1)  # in-window ids go out of range and drop
    return out.at[rest].add(vals.reshape(-1, d).astype(jnp.float32), mode="drop")


def take_rows_batched(table: jax.Array, ids: jax.Array, ids_sorted: bool = False) -> jax.Array:
    """Per-example :func:`take_rows`: ``table[b, ids[b]]``.

    Args: table: float[batch, rows, ...]; ids: int[batch, n]. Returns float[batch, n, ...].
    """
    return jax.vmap(lambda t, i: take_rows(t, i, ids_sorted))(table, ids)


def add_windows(values: jax.Array, start: jax.Array, rows: int) -> jax.Array:
    """``zeros([rows, ...]).at[start[i] + j].add(values[i, j])``: windows of consecutive rows added
    into a table without atomic adds, in float32.

    Deterministic: each output element is the float32 sum of the values that land on it.
    Its FLOPs grow with windows x table rows: meant for a few long windows (tiles, chunks of ids),
    not one per row.

    Args: values: float[n, span, ...]; start: int[n], any value (rows outside ``[0, rows)`` drop).
    Returns: float32[rows, ...].
    """
    n, span = values.shape[:2]
    a = WINDOW_ALIGN
    flat = values.reshape(n, span, -1)
    width = flat.shape[-1]
    per_window = -(-(span + a - 1) // a)  # aligned chunks a window can touch
    table_chunks = -(-rows // a)
    start = start.astype(jnp.int32)
    chunk = jnp.floor_divide(start, a)
    shift = start - chunk * a  # in [0, a)
    # Window i shifted by its offset into its first chunk: slab[i, j] = values[i, j - shift[i]].
    padded = jnp.pad(flat, ((0, 0), (a, per_window * a - span), (0, 0)))
    slab = jax.vmap(lambda v, s: jax.lax.dynamic_slice_in_dim(v, a - s, per_window * a))(padded, shift)
    # one_hot of a chunk outside the table is a zero row: those rows drop.
    target = chunk[:, None] + jnp.arange(per_window, dtype=jnp.int32)
    hot = jax.nn.one_hot(target, table_chunks, dtype=slab.dtype)  # [n, per_window, table_chunks]
    out = jnp.einsum(
        "nkm,nkf->mf",
        hot,
        slab.reshape(n, per_window, a * width),
        preferred_element_type=jnp.float32,
        # Float32 values: no TF32 rounding on the GPU (bf16 ones sum exactly in float32 anyway).
        precision=jax.lax.Precision.HIGHEST if flat.dtype == jnp.float32 else None,
    )
    return out.reshape(table_chunks * a, *values.shape[2:])[:rows]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def take_windows(x: jax.Array, start: jax.Array, span: int) -> jax.Array:
    """Windows of ``span`` consecutive rows, ``x[start[i] + j]``, with a gradient that adds
    overlapping windows without atomic adds (:func:`add_windows`).

    Args: x: float[rows, ...]; start: int[n], meant to lie in ``[0, rows - span]`` (pad x so they
      do); one outside is clamped into it, as ``lax.dynamic_slice`` does, forward and backward.
    Returns: float[n, span, ...].
    """
    return _read_windows(x, _clamp(start, x.shape[0], span), span)


def _clamp(start: jax.Array, rows: int, span: int) -> jax.Array:
    return jnp.clip(start.astype(jnp.int32), 0, max(rows - span, 0))


def _read_windows(x: jax.Array, start: jax.Array, span: int) -> jax.Array:
    return jax.vmap(lambda s: jax.lax.dynamic_slice_in_dim(x, s, span))(start)


def _windows_fwd(x, start, span):
    # x's rows and dtype ride in an empty array (x itself would be kept alive until the backward).
    start = _clamp(start, x.shape[0], span)
    return _read_windows(x, start, span), (start, jnp.zeros((x.shape[0], 0), x.dtype))


def _windows_bwd(span, res, g):
    start, like = res
    return add_windows(g, start, like.shape[0]).astype(like.dtype), None


take_windows.defvjp(_windows_fwd, _windows_bwd)


def take_windows_batched(x: jax.Array, start: jax.Array, span: int) -> jax.Array:
    """Per-example :func:`take_windows`: x float[batch, rows, ...], start int[batch, n] ->
    float[batch, n, span, ...]."""
    return jax.vmap(lambda t, s: take_windows(t, s, span))(x, start)
