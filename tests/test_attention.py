"""The attention entry point: the XLA reference path against a naive loop, the library path
(``jax.nn.dot_product_attention``) against the reference path, and the masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastblt.model import attention as attn_lib
from fastblt.model import cross_attention as cross
from fastblt.model.attention import attention, causal_mask, document_ids, resolve_impl
from fastblt.model.cross_attention import gathered_attention


def naive(q, k, v, mask):
    b, t, h, d = q.shape
    g = h // k.shape[2]
    out = np.zeros(q.shape)
    for bi in range(b):
        for ti in range(t):
            for hi in range(h):
                keys = [s for s in range(k.shape[1]) if mask[bi, ti, s]]
                if not keys:
                    continue
                logits = np.array([q[bi, ti, hi] @ k[bi, s, hi // g] for s in keys]) / np.sqrt(d)
                p = np.exp(logits - logits.max())
                p /= p.sum()
                out[bi, ti, hi] = sum(pi * v[bi, s, hi // g] for pi, s in zip(p, keys, strict=True))
    return out


def _inputs(seed=0, b=2, t=9, s=11, h=4, kv=2, d=8):
    rng = np.random.default_rng(seed)
    q, k, v = (
        rng.normal(size=shape).astype(np.float32) for shape in [(b, t, h, d), (b, s, kv, d), (b, s, kv, d)]
    )
    mask = rng.random((b, t, s)) < 0.5
    mask[0, 3] = False  # a row with no visible key
    return q, k, v, mask


def test_xla_path_matches_naive_and_zeroes_empty_rows():
    q, k, v, mask = _inputs()
    out = np.asarray(attention(q, k, v, jnp.asarray(mask), "xla"))
    np.testing.assert_allclose(out, naive(q, k, v, mask), atol=1e-5)
    assert np.all(out[0, 3] == 0)


@pytest.mark.parametrize("h,kv", [(4, 4), (4, 2)])
def test_one_query_decode_on_gpu_runs_two_row_products(h, kv):
    """Traced for a GPU, a one-query call pads each (row, kv head) product to two query rows (so
    XLA keeps them GEMMs); the values are the naive loop's, and a group of >= 2 heads needs no pad."""
    q, k, v, mask = _inputs(b=3, t=4, s=7, h=h, kv=kv)
    q, mask = q[:, :1], mask[:, :1]  # one query per row
    mask[1, 0] = False  # the padded row's neighbour with no visible key stays 0
    fn = jax.jit(lambda *a: attention(*a, "xla"))
    with attn_lib.target_platform("gpu"):
        out = np.asarray(fn(q, k, v, jnp.asarray(mask)))
        hlo = fn.lower(q, k, v, jnp.asarray(mask)).as_text()
    np.testing.assert_allclose(out, naive(q, k, v, mask), atol=1e-5)
    assert np.all(out[1, 0] == 0)
    g = h // kv
    t_run = 2 if g == 1 else 1  # queries run: one zero query added when a product would have one row
    assert f"tensor<3x{t_run}x{kv}x{g}x8xf32>" in hlo  # q as the products take it: [b, t, kv, g, d]


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_fused_path_wrapper_agrees_with_reference_path(dtype, tol, monkeypatch):
    """The "cudnn" path's own work (mask as bias, odd lengths padded to even, empty rows zeroed),
    values and gradients, with jax.nn.dot_product_attention's XLA kernel standing in for cuDNN on CPU."""
    real = jax.nn.dot_product_attention
    seen = {}

    def stand_in(q, k, v, *, mask, implementation):
        seen["shapes"] = (q.shape[1], k.shape[1])
        assert implementation == "cudnn"
        return real(q, k, v, mask=mask)

    monkeypatch.setattr(attn_lib.jax.nn, "dot_product_attention", stand_in)
    q, k, v, mask = (jnp.asarray(x, dtype) if x.dtype != bool else jnp.asarray(x) for x in _inputs(1))
    g = jnp.asarray(np.random.default_rng(2).normal(size=q.shape), jnp.float32)

    def loss(impl, q, k, v):
        return jnp.sum(attention(q, k, v, mask, impl).astype(jnp.float32) * g)

    ref, ref_grads = jax.value_and_grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2))(q, k, v)
    got, grads = jax.value_and_grad(lambda *a: loss("cudnn", *a), argnums=(0, 1, 2))(q, k, v)
    assert seen["shapes"] == (10, 12)  # t = 9 and s = 11 padded to even
    np.testing.assert_allclose(float(got), float(ref), rtol=tol, atol=tol)
    for a, b in zip(grads, ref_grads, strict=True):
        assert bool(jnp.all(jnp.isfinite(a.astype(jnp.float32))))
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tol)
    out = attention(q, k, v, mask, "cudnn")
    assert np.all(np.asarray(out[0, 3], np.float32) == 0)  # the row with no visible key


def test_auto_dispatch_rules(monkeypatch):
    q32 = jnp.zeros((1, 128, 2, 64), jnp.float32)
    q16 = q32.astype(jnp.bfloat16)
    assert resolve_impl("auto", q16) == "xla"  # CPU
    assert resolve_impl("xla", q16) == "xla" and resolve_impl("cudnn", q16) == "cudnn"
    monkeypatch.setattr(attn_lib.jax, "default_backend", lambda: "gpu")
    assert resolve_impl("auto", q16) == "cudnn"
    assert resolve_impl("auto", q32) == "xla"  # float32: the reference path
    assert resolve_impl("auto", q16[:, :8]) == "xla"  # decode-sized calls stay on XLA
    assert resolve_impl("auto", jnp.zeros((1, 128, 2, 12), jnp.bfloat16)) == "xla"  # head dim 12
    with pytest.raises(ValueError, match="not one of"):
        resolve_impl("flash", q16)


def test_gathered_attention_equals_dense_masked_attention():
    rng = np.random.default_rng(2)
    b, t, p, kk, h, d = 2, 7, 5, 3, 2, 4
    q = rng.normal(size=(b, t, h, d)).astype(np.float32)
    slots_k = rng.normal(size=(b, p, kk, h, d)).astype(np.float32)
    slots_v = rng.normal(size=(b, p, kk, h, d)).astype(np.float32)
    index = rng.integers(0, p, (b, t))
    gk = np.stack([slots_k[i, index[i]] for i in range(b)])
    gv = np.stack([slots_v[i, index[i]] for i in range(b)])
    out = gathered_attention(q, gk, gv)
    mask = (np.arange(p * kk)[None, None] // kk) == index[..., None]
    dense = attention(
        q, slots_k.reshape(b, p * kk, h, d), slots_v.reshape(b, p * kk, h, d), jnp.asarray(mask)
    )
    np.testing.assert_allclose(np.asarray(out), np.asarray(dense), atol=1e-5)


def _patch_reads(rng, b, t, p):
    """Patch ids a decoder's rows read: non-decreasing, rising by at most one per row."""
    steps = rng.random((b, t)) < 0.4
    steps[:, 0] = False
    return np.minimum(np.cumsum(steps, axis=1), p - 1).astype(np.int32)


@pytest.mark.parametrize("t", [37, 70])
def test_latent_ranges_equal_gathered_reads_values_and_gradients(t):
    """The decoder's cross-attention on the key-range kernel (interpreted): each row's slots as one
    range of the slots laid end to end, against the gathered reference; outputs and gradients for q
    and every slot, including rows that jump several patches (any index in range is exact)."""
    rng = np.random.default_rng(6)
    b, p, kk, h, d = 2, 40, 2, 2, 16
    q = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, p, kk, h, d)), jnp.float32) for _ in range(2))
    index = _patch_reads(rng, b, t, p)
    index[1, t // 2 :] = np.minimum(index[1, t // 2 :] + 7, p - 1)  # a jump of 7 patches
    index = jnp.asarray(index)
    g = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

    def reference(q, k, v):
        take = jax.vmap(lambda x, i: x[i])
        return jnp.sum(gathered_attention(q, take(k, index), take(v, index)) * g)

    def ranged(q, k, v):
        return jnp.sum(cross.latent_ranges(q, k, v, index, interpret=True) * g)

    ref, ref_grads = jax.value_and_grad(reference, argnums=(0, 1, 2))(q, k, v)
    got, grads = jax.value_and_grad(ranged, argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(float(got), float(ref), rtol=1e-5)
    for a, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=1e-5)


def test_segment_ranges_equal_segment_attention_values_and_gradients():
    """The encoder's cross-attention on the key-range kernel (interpreted) against the reference's
    segment maxima and sums: slots of a patch over its run of bytes, patches without bytes (0, as
    the patch buffer's unused slots); outputs and gradients of q, k and v."""
    rng = np.random.default_rng(8)
    b, p, kk, n, h, d = 2, 9, 2, 30, 2, 16
    ids = np.sort(rng.integers(0, p - 2, size=(b, n)), axis=1).astype(np.int32)  # the last two unused
    ids[0, ids[0] == 3] = 4  # and patch 3 of row 0
    ids = jnp.asarray(ids)
    q = jnp.asarray(rng.normal(size=(b, p, kk, h, d)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, n, h, d)), jnp.float32) for _ in range(2))
    g = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * g)

    reference = loss(lambda q, k, v: cross.segment_attention(q, k, v, ids))
    ranged = loss(lambda q, k, v: cross.segment_ranges(q, k, v, ids, interpret=True))
    ref, ref_grads = jax.value_and_grad(reference, argnums=(0, 1, 2))(q, k, v)
    got, grads = jax.value_and_grad(ranged, argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(float(got), float(ref), rtol=1e-5)
    assert not np.asarray(cross.segment_ranges(q, k, v, ids, interpret=True))[0, 3].any()
    for a, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=1e-5)


def test_cross_attention_takes_the_ranges_only_in_a_gpu_step_on_one_device(monkeypatch):
    from fastblt.model import range_attention

    calls = []
    monkeypatch.setattr(cross, "latent_ranges", lambda *a: calls.append(1) or jnp.zeros_like(a[0]))
    monkeypatch.setattr(cross, "segment_ranges", lambda *a: calls.append(2) or jnp.zeros_like(a[0]))
    monkeypatch.setattr(cross, "GPU_CROSS_RANGES", True)
    monkeypatch.setattr(range_attention, "on_one_device", lambda: True)
    q = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
    k = jnp.zeros((1, 4, 2, 2, 64), jnp.bfloat16)
    index = jnp.zeros((1, 8), jnp.int32)
    cross.latent_attention(q, k, k, index, "cudnn")  # a CPU step: the gathered form
    assert calls == []
    with attn_lib.target_platform("gpu"):
        cross.latent_attention(q, k, k, index, "xla")
        assert calls == []
        cross.latent_attention(q, k, k, index, "cudnn")
        assert calls == [1]
        pool_q, byte_k = jnp.zeros((1, 4, 2, 2, 64), jnp.bfloat16), jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
        cross.segment_attention(pool_q, byte_k, byte_k, index, "xla")
        assert calls == [1]
        cross.segment_attention(pool_q, byte_k, byte_k, index, "cudnn")
        assert calls == [1, 2]
        monkeypatch.setattr(range_attention, "on_one_device", lambda: False)
        cross.latent_attention(q, k, k, index, "cudnn")
        cross.segment_attention(pool_q, byte_k, byte_k, index, "cudnn")
        assert calls == [1, 2]


def test_masks_window_and_documents():
    tokens = jnp.array([[1, 5, 6, 2, 1, 7, 8, 9]])
    docs = document_ids(tokens)
    np.testing.assert_array_equal(np.asarray(docs), [[0, 0, 0, 0, 1, 1, 1, 1]])  # EOS ends its document
    pos = jnp.arange(8)[None]
    mask = np.asarray(causal_mask(pos, pos, 2, docs, docs))[0]
    for i in range(8):
        for j in range(8):
            assert mask[i, j] == (j <= i and i - j < 2 and (i < 4) == (j < 4))


@pytest.mark.parametrize("n,w", [(37, 8), (64, 16), (40, 20)])
def test_blockwise_local_attention_equals_dense_mask(n, w):
    from fastblt.model.attention import LocalMask

    rng = np.random.default_rng(n)
    b, h, kv, d = 2, 4, 2, 8
    q = rng.normal(size=(b, n, h, d)).astype(np.float32)
    k = rng.normal(size=(b, n, kv, d)).astype(np.float32)
    v = rng.normal(size=(b, n, kv, d)).astype(np.float32)
    tokens = rng.integers(3, 260, (b, n))
    tokens[0, [5, 17]] = 2  # documents end inside the row
    pos = jnp.broadcast_to(jnp.arange(n), (b, n))
    docs = document_ids(jnp.asarray(tokens))
    local = LocalMask(pos, docs, w)
    dense = causal_mask(pos, pos, w, docs, docs)
    np.testing.assert_allclose(
        np.asarray(attention(q, k, v, local)), np.asarray(attention(q, k, v, dense)), atol=1e-6
    )
    np.testing.assert_allclose(
        np.asarray(attention(q, k, v, dense)), naive(q, k, v, np.asarray(dense)), atol=1e-5
    )


def test_segment_attention_equals_dense_patch_mask():
    from fastblt.model.cross_attention import segment_attention

    rng = np.random.default_rng(4)
    b, n, p, kk, h, d = 2, 19, 7, 3, 2, 4
    ids = np.sort(rng.integers(0, p - 1, (b, n)), axis=1)  # the last patch has no byte
    q = rng.normal(size=(b, p, kk, h, d)).astype(np.float32)
    k = rng.normal(size=(b, n, h, d)).astype(np.float32)
    v = rng.normal(size=(b, n, h, d)).astype(np.float32)
    out = np.asarray(segment_attention(q, k, v, jnp.asarray(ids)))
    mask = ids[:, None, :] == (np.arange(p * kk) // kk)[None, :, None]
    dense = naive(q.reshape(b, p * kk, h, d), k, v, mask).reshape(b, p, kk, h, d)
    np.testing.assert_allclose(out, dense, atol=1e-5)
    assert np.all(out[:, p - 1] == 0)


def test_segment_attention_gradients_equal_dense_patch_mask():
    """Gradients through the sorted-segment scatters and the query gather's custom gradient, against
    the XLA attention under the dense patch mask."""
    from fastblt.model.cross_attention import segment_attention

    rng = np.random.default_rng(5)
    b, n, p, kk, h, d = 2, 300, 70, 2, 2, 4
    ids = np.sort(rng.integers(0, p - 1, (b, n)), axis=1)
    q, g = (jnp.asarray(rng.normal(size=(b, p, kk, h, d)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(rng.normal(size=(b, n, h, d)), jnp.float32) for _ in range(2))
    mask = jnp.asarray(ids[:, None, :] == (np.arange(p * kk) // kk)[None, :, None])

    def seg(q, k, v):
        return jnp.sum(segment_attention(q, k, v, jnp.asarray(ids)) * g)

    def dense(q, k, v):
        out = attention(q.reshape(b, p * kk, h, d), k, v, mask, "xla").reshape(q.shape)
        return jnp.sum(out * g)

    got, want = jax.grad(seg, (0, 1, 2))(q, k, v), jax.grad(dense, (0, 1, 2))(q, k, v)
    for a, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(w), rtol=1e-4, atol=1e-5)


def test_packed_segments_hand_worked():
    from fastblt.model.attention import packed_segments

    docs = jnp.array([[0, 0, 0, 1, 1, 2, 2, 2], [0, 0, 0, 0, 0, 0, 0, 0]], jnp.int32)
    seqlen, offsets, fits = packed_segments(docs, 4)
    np.testing.assert_array_equal(np.asarray(seqlen), [[3, 2, 3, -1], [8, -1, -1, -1]])
    np.testing.assert_array_equal(np.asarray(offsets), [[0, 3, 5, -1, -1], [0, -1, -1, -1, -1]])
    assert bool(fits)
    assert not bool(packed_segments(docs, 2)[2])  # row 0 has 3 documents


@pytest.mark.parametrize("window", [None, 5, 40])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_fused_local_mask_path_agrees_with_reference_path(window, dtype, tol, monkeypatch):
    """A LocalMask on the fused path: causal and window as kernel masks, documents as cuDNN's packed
    segments (row 0: 3 documents), and a row with more documents than the packed layout holds (row 1)
    on the bias path; values and gradients against the XLA path on the dense mask. The kernels are
    CPU stand-ins computing what their arguments mean (tests/fused_stand_in.py)."""
    import fused_stand_in

    from fastblt.model.attention import LocalMask, packed_segments

    rng = np.random.default_rng(7)
    b, n, h, kv, d = 3, 24, 4, 2, 8
    q = jnp.asarray(rng.normal(size=(b, n, h, d)), dtype)
    k, v = (jnp.asarray(rng.normal(size=(b, n, kv, d)), dtype) for _ in range(2))
    tokens = rng.integers(3, 260, (b, n))
    tokens[0, [6, 15]] = 2  # 3 documents
    tokens[1, [2, 5, 9, 13]] = 2  # 5 documents: over max_segments=4
    pos = jnp.broadcast_to(jnp.arange(n), (b, n))
    docs = document_ids(jnp.asarray(tokens))
    g = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    calls = fused_stand_in.install(monkeypatch)

    def loss(mask, impl, q, k, v):
        return jnp.sum(attention(q, k, v, mask, impl).astype(jnp.float32) * g)

    # Jitted: op by op the six cases took 7.2 s of small compiles, jitted 5.3 s.
    grad = jax.jit(jax.value_and_grad(loss, argnums=(2, 3, 4)), static_argnums=(1,))
    # Which branch runs is decided per batch (every row must fit the packed layout): row 0 alone
    # (3 documents) runs packed, the whole batch (row 1 has 5) the bias path, and no documents the
    # kernel's own masks.
    assert bool(packed_segments(docs[:1], 4)[2]) and not bool(packed_segments(docs, 4)[2])
    for sl, row_docs in ((slice(0, 1), docs[:1]), (slice(None), docs), (slice(None), None)):
        mask = LocalMask(pos[sl], row_docs, window, max_segments=4)
        dense = causal_mask(pos[sl], pos[sl], window, row_docs, row_docs)
        ref, ref_grads = grad(dense, "xla", q[sl], k[sl], v[sl])
        got, grads = grad(mask, "cudnn", q[sl], k[sl], v[sl])
        np.testing.assert_allclose(float(got), float(ref), rtol=tol, atol=tol)
        for a, r in zip(grads, ref_grads, strict=True):
            np.testing.assert_allclose(
                np.asarray(a, np.float32), np.asarray(r, np.float32), atol=tol, rtol=tol
            )
    assert calls["packed"] >= 2 and calls["dense"] >= 2


@pytest.mark.parametrize("mode", ["static", "space"])
def test_rows_fit_packed_bounds_byte_and_patch_documents(mode):
    """Where the host check passes, every LocalMask of a BLT step fits the packed layout: the
    byte-level documents (document_ids) and the global model's patch-level ones, built as
    fastblt.model.blt builds them from the real patcher. A last-position EOS can open one more
    patch-level document; a check that misses it fails here."""
    from fastblt.config import PatcherConfig
    from fastblt.model import patcher as patching
    from fastblt.model.attention import packed_segments, rows_fit_packed
    from fastblt.model.blt import patch_has_eos

    rng = np.random.default_rng(9)
    n = 64
    rows = []
    for eos in ([], [5, 9, 20], [7, 63], [3, 11, 19, 27, 35, 43, 51, 63], list(range(0, 64, 2))):
        for shift in (0, 1):
            row = rng.integers(3, 259, n)
            row[rng.integers(0, n, 6)] = 36  # spaces (id 32 + 4) for the space patcher
            row[[min(i + shift, n - 1) for i in eos]] = 2
            rows.append(row)
    tokens = jnp.asarray(np.stack(rows))
    p = patching.patch(tokens, None, PatcherConfig(mode=mode, patch_size=3)).lengths
    patch_ids = patching.patch_ids_from_lengths(p, n)
    ends = patch_has_eos(tokens, patch_ids, p.shape[1]).astype(jnp.int32)
    pdocs = jnp.cumsum(ends, axis=-1) - ends
    docs = document_ids(tokens)
    for r in range(tokens.shape[0]):
        for m in (1, 2, 4, 8, 9, 33):
            if rows_fit_packed(np.asarray(tokens[r : r + 1]), m):
                assert bool(packed_segments(docs[r : r + 1], m)[2]), (r, m)
                assert bool(packed_segments(pdocs[r : r + 1], m)[2]), (r, m)
    # 7 EOS inside the row and one at its end: 8 byte-level documents, and (space patches) 9 at
    # the patch level; 8 slots are not enough.
    assert not rows_fit_packed(np.asarray(tokens[6:7]), 8)


def test_rows_checked_takes_the_packed_layout_without_a_conditional(monkeypatch):
    """Inside rows_checked(m) a LocalMask on the fused path traces no lax.cond, packs m segments per
    row, and gives the values of the per-call checked path and of the XLA reference (kernels
    replaced by CPU stand-ins), at the tier the host check picks (a row of 4 documents: 4) and at 8."""
    import fused_stand_in

    from fastblt.model import attention as lib

    fused_stand_in.install(monkeypatch)
    packed_widths = []
    real_packed = lib._cudnn_packed

    def recording(q, k, v, seqlen, offsets, window):
        packed_widths.append(seqlen.shape[1])
        return real_packed(q, k, v, seqlen, offsets, window)

    monkeypatch.setattr(lib, "_cudnn_packed", recording)
    rng = np.random.default_rng(3)
    b, n, h, d = 2, 32, 2, 8
    q, k, v = (jnp.asarray(rng.normal(size=(b, n, h, d)), jnp.float32) for _ in range(3))
    tokens = rng.integers(3, 259, (b, n))
    tokens[0, [4, 17, 25]] = 2  # 4 documents in row 0
    docs = document_ids(jnp.asarray(tokens))
    assert lib.segment_tier(tokens) == 4

    def run(q, docs):  # docs traced, as in a train step: the check cannot fold away
        return lib._cudnn_local(q, k, v, lib.LocalMask(jnp.broadcast_to(jnp.arange(n), (b, n)), docs, 8))

    mask = lib.LocalMask(jnp.broadcast_to(jnp.arange(n), (b, n)), docs, 8)
    want = attention(q, k, v, mask, "xla")
    checked, checked_jaxpr = jax.jit(run)(q, docs), str(jax.make_jaxpr(run)(q, docs))
    assert "cond[" in checked_jaxpr
    np.testing.assert_allclose(np.asarray(checked), np.asarray(want), atol=1e-5)
    for tier in (4, 8):

        def run_checked(q, docs, tier=tier):  # enters the context, jitted on its own (as Trainer)
            with lib.rows_checked(tier):
                return run(q, docs)

        packed_widths.clear()
        trusted, trusted_jaxpr = jax.jit(run_checked)(q, docs), str(jax.make_jaxpr(run_checked)(q, docs))
        assert "cond[" not in trusted_jaxpr and set(packed_widths) == {tier}
        np.testing.assert_allclose(np.asarray(trusted), np.asarray(want), atol=1e-5, err_msg=str(tier))


def test_self_ranges_take_local_masks_off_cudnn_in_a_gpu_step_on_one_device(monkeypatch):
    """GPU_SELF_RANGES: a LocalMask call the core would give cuDNN runs on the range kernel (here
    interpreted) with the XLA path's values; off, on several devices, or for another impl it does not."""
    from fastblt.model import range_attention

    rng = np.random.default_rng(9)
    b, n, h, d = 2, 40, 2, 16
    q, k, v = (jnp.asarray(rng.normal(size=(b, n, h, d)), jnp.float32) for _ in range(3))
    docs = jnp.asarray(np.cumsum(rng.random((b, n)) < 0.1, axis=1), jnp.int32)
    mask = attn_lib.LocalMask(jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n)), docs, 7)
    want = attn_lib.attention(q, k, v, mask, "xla")
    cudnn = []
    monkeypatch.setattr(attn_lib, "_cudnn_local", lambda *a: cudnn.append(1) or jnp.zeros_like(a[0]))
    monkeypatch.setattr(range_attention, "on_one_device", lambda: True)
    with attn_lib.target_platform("gpu"):
        attn_lib.attention(q, k, v, mask, "cudnn")  # the switch off: cuDNN
        assert cudnn == [1]
        monkeypatch.setattr(attn_lib, "GPU_SELF_RANGES", True)
        got = attn_lib.attention(q, k, v, mask, "cudnn")
        assert cudnn == [1]
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
        attn_lib.attention(q, k, v, mask, "xla")  # the XLA path asked for: unchanged
        monkeypatch.setattr(range_attention, "on_one_device", lambda: False)
        attn_lib.attention(q, k, v, mask, "cudnn")
        assert cudnn == [1, 1]
