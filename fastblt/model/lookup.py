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
    target = (first + jnp.arange(c, dtype=jnp.int32)).reshape(-1)  # rows past the table drop
    out = jnp.zeros((rows, d), jnp.float32).at[target].add(part.reshape(-1, d), mode="drop")
    rest = jnp.where(inside, rows, ids).reshape(-1)  # in-window ids go out of range and drop
    return out.at[rest].add(vals.reshape(-1, d).astype(jnp.float32), mode="drop")


def take_rows_batched(table: jax.Array, ids: jax.Array, ids_sorted: bool = False) -> jax.Array:
    """Per-example :func:`take_rows`: ``table[b, ids[b]]``.

    Args: table: float[batch, rows, ...]; ids: int[batch, n]. Returns float[batch, n, ...].
    """
    return jax.vmap(lambda t, i: take_rows(t, i, ids_sorted))(table, ids)
