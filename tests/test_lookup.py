"""take_rows / scatter_add_rows / take_windows / add_windows against jnp.take's gradient and naive
numpy loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastblt.model.lookup import (
    ONE_HOT_MAX_ROWS,
    SORTED_WINDOW,
    WINDOW_ALIGN,
    add_windows,
    scatter_add_rows,
    take_rows,
    take_rows_batched,
    take_windows,
    take_windows_batched,
)


def _naive(values, ids, rows):
    out = np.zeros((rows, *values.shape[1:]), np.float64)
    for v, i in zip(values, ids, strict=True):
        out[i] += v
    return out


@pytest.mark.parametrize("rows", [7, ONE_HOT_MAX_ROWS + 3])
@pytest.mark.parametrize("ids_sorted", [False, True])
def test_scatter_add_rows_matches_loop(rows, ids_sorted):
    rng = np.random.default_rng(rows)
    n = 300
    # Heavy repetition (few distinct ids) and a long run, as bytes and 3-grams give.
    ids = rng.choice(rng.integers(0, rows, 5), n)
    ids[100:180] = ids[0]
    if ids_sorted:
        ids = np.sort(ids)
    values = rng.normal(size=(n, 3, 2)).astype(np.float32)
    # Jitted, as the model runs it: op by op, the 4 099-row case took 2.4 s of small compiles (0.3 s jitted).
    got = jax.jit(scatter_add_rows, static_argnums=(2, 3))(
        jnp.asarray(values), jnp.asarray(ids), rows, ids_sorted
    )
    assert got.dtype == jnp.float32 and got.shape == (rows, 3, 2)
    np.testing.assert_allclose(np.asarray(got), _naive(values, ids, rows), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [11, ONE_HOT_MAX_ROWS + 1])
def test_take_rows_value_and_grad_equal_take(rows):
    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.normal(size=(rows, 4)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, rows, 64))
    g = jnp.asarray(rng.normal(size=(64, 4)), jnp.float32)
    f_ref = lambda t: jnp.sum(jnp.take(t, ids, axis=0) * g)  # noqa: E731
    f_new = lambda t: jnp.sum(take_rows(t, ids) * g)  # noqa: E731
    np.testing.assert_array_equal(np.asarray(take_rows(table, ids)), np.asarray(jnp.take(table, ids, axis=0)))
    # Jitted gradients: op by op, the 4 097-row case took 2.2 s of small compiles (0.1 s jitted).
    np.testing.assert_allclose(
        np.asarray(jax.jit(jax.grad(f_new))(table)),
        np.asarray(jax.jit(jax.grad(f_ref))(table)),
        rtol=1e-5,
        atol=1e-6,
    )


def test_take_rows_batched_sorted_runs():
    """The decoder's case: per example, sorted ids (each patch read by a run of bytes)."""
    rng = np.random.default_rng(1)
    b, p, n = 3, 9, 40
    table = jnp.asarray(rng.normal(size=(b, p, 2, 5)), jnp.float32)
    ids = jnp.asarray(np.sort(rng.integers(0, p, (b, n)), axis=1))
    g = jnp.asarray(rng.normal(size=(b, n, 2, 5)), jnp.float32)
    ref = jax.grad(lambda t: jnp.sum(jax.vmap(lambda a, i: a[i])(t, ids) * g))(table)
    got = jax.grad(lambda t: jnp.sum(take_rows_batched(t, ids, ids_sorted=True) * g))(table)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["runs", "jumps", "unsorted"])
def test_sorted_window_sum_matches_loop(case):
    """The sorted-ids gradient: chunks of SORTED_WINDOW ids summed into windows of rows. Runs of
    patch lengths; a jump of more than a window inside a chunk (a row's padding patches); and ids
    that are not sorted at all (the flag is a speed hint: the sum stays exact)."""
    rng = np.random.default_rng(7)
    rows, n = 3 * SORTED_WINDOW + 5, 5 * SORTED_WINDOW + 17
    ids = np.repeat(np.arange(rows), rng.integers(1, 9, rows))[:n]
    if case == "jumps":
        ids[SORTED_WINDOW // 2 :] = np.minimum(ids[SORTED_WINDOW // 2 :] + SORTED_WINDOW + 3, rows - 1)
    if case == "unsorted":
        ids = rng.permutation(ids)
    values = rng.normal(size=(len(ids), 2, 3)).astype(np.float32)
    got = scatter_add_rows(jnp.asarray(values), jnp.asarray(ids), rows, ids_sorted=True)
    np.testing.assert_allclose(np.asarray(got), _naive(values, ids, rows), rtol=1e-5, atol=1e-5)


def _naive_windows(values, start, rows):
    out = np.zeros((rows, *values.shape[2:]), np.float64)
    for v, s in zip(values, start, strict=True):
        for j, row in enumerate(v):
            if 0 <= s + j < rows:
                out[s + j] += row
    return out


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_add_windows_matches_loop(dtype):
    """Overlapping windows (BLT-D's tiles), windows at the table's edges, aligned and unaligned
    starts, windows partly or wholly outside the table (their rows drop), a table whose rows are
    not a multiple of WINDOW_ALIGN."""
    rng = np.random.default_rng(3)
    rows, span = 5 * WINDOW_ALIGN + 7, 2 * WINDOW_ALIGN + 9
    start = np.array(
        [0, 3, 5, WINDOW_ALIGN, WINDOW_ALIGN + 1, 40, rows - span, rows - 5, -20, rows + 3, -span]
    )
    values = rng.normal(size=(len(start), span, 2, 3)).astype(np.float32)
    values = np.asarray(jnp.asarray(values, dtype).astype(jnp.float32))  # representable in dtype
    got = add_windows(jnp.asarray(values, dtype), jnp.asarray(start), rows)
    assert got.dtype == jnp.float32 and got.shape == (rows, 2, 3)
    np.testing.assert_allclose(np.asarray(got), _naive_windows(values, start, rows), rtol=1e-6, atol=1e-5)


def test_take_windows_value_and_grad():
    """Values are the windows; the gradient equals the naive sum of the windows' gradients (and
    jnp's gather gradient), for overlapping windows and windows at both ends."""
    rng = np.random.default_rng(4)
    rows, span = 150, 70
    x = jnp.asarray(rng.normal(size=(rows, 4)), jnp.float32)
    start = np.array([0, 10, 11, 79, 80, 35, 0])
    g = rng.normal(size=(len(start), span, 4)).astype(np.float32)
    got = take_windows(x, jnp.asarray(start), span)
    want = np.stack([np.asarray(x)[s : s + span] for s in start])
    np.testing.assert_array_equal(np.asarray(got), want)
    grad = jax.grad(lambda t: jnp.sum(take_windows(t, jnp.asarray(start), span) * g))(x)
    np.testing.assert_allclose(np.asarray(grad), _naive_windows(g, start, rows), rtol=1e-5, atol=1e-5)
    index = jnp.asarray(start[:, None] + np.arange(span))
    ref = jax.grad(lambda t: jnp.sum(t[index] * g))(x)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_take_windows_batched_under_jit():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(2, 90, 3, 2)), jnp.bfloat16)
    start = jnp.asarray([[0, 7, 30], [60, 1, 2]])
    g = jnp.asarray(rng.normal(size=(2, 3, 30, 3, 2)), jnp.bfloat16)
    f = jax.jit(
        jax.value_and_grad(lambda t: jnp.sum((take_windows_batched(t, start, 30) * g).astype(jnp.float32)))
    )
    _, grad = f(x)
    assert grad.dtype == jnp.bfloat16
    want = np.stack(
        [_naive_windows(np.asarray(g[b], np.float32), np.asarray(start[b]), 90) for b in range(2)]
    )
    np.testing.assert_allclose(np.asarray(grad, np.float32), want, rtol=1e-2, atol=2e-2)


def test_take_windows_clamps_out_of_range_starts_both_ways():
    """A start outside [0, rows - span] reads the clamped window, and its gradient goes where
    that window was read (the transpose of the forward, as for lax.dynamic_slice)."""
    rows, span = 10, 4
    x = jnp.arange(rows, dtype=jnp.float32)
    start = jnp.asarray([-3, 8])
    got = take_windows(x, start, span)
    np.testing.assert_array_equal(np.asarray(got), [[0, 1, 2, 3], [6, 7, 8, 9]])
    grad = jax.grad(lambda t: jnp.sum(take_windows(t, start, span)))(x)
    np.testing.assert_array_equal(np.asarray(grad), [1, 1, 1, 1, 0, 0, 1, 1, 1, 1])
