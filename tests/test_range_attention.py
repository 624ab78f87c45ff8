"""The key-range attention kernels (fastblt.model.range_attention) in Pallas interpret mode: output,
log-sum-exp and gradients (through both) against a float64 recomputation with a dense mask, and the
key-tile bookkeeping of the backward against a loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

try:
    from gpu_paths import cuda_text
except ImportError:  # pragma: no cover - when tests/ is a package
    from tests.gpu_paths import cuda_text

from fastblt.model import range_attention as ra


def _dense(q, k, v, lo, hi, vis=None):
    """float64 attention of each query over keys lo <= j < hi (or where ``vis`` bool[b, T, S] holds;
    grouped kv heads repeated); rows that see nothing give 0 and lse -1e30. Returns out [b, T, H, d],
    lse [b, T, H]."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    if vis is None:
        j = np.arange(k.shape[1])
        vis = (j >= np.asarray(lo)[..., None]) & (j < np.asarray(hi)[..., None])  # [b, T, S]
    s = np.einsum("bthd,bshd->bths", q, k) / np.sqrt(q.shape[-1])
    s = np.where(vis[:, :, None], s, -np.inf)
    top = np.max(s, axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    p = np.exp(s - top)
    den = p.sum(-1, keepdims=True)
    seen = den > 0
    out = np.einsum("bths,bshd->bthd", p / np.where(seen, den, 1.0), v)
    lse = np.where(seen[..., 0], top[..., 0] + np.log(np.where(seen[..., 0], den[..., 0], 1.0)), -1e30)
    return out, lse


def _dense_grads(q, k, v, vis, w_out, w_lse):
    """Gradients of q, k, v of ``sum(out * w_out) + sum(lse * w_lse)`` (lse only where w_lse != 0)
    for the float64 dense attention under ``vis`` bool[b, T, S]: JAX's autodiff of an independent
    formula (no online softmax, no tiles); finite differences would be slow."""
    with jax.enable_x64():
        vis64 = jnp.asarray(vis)

        def dense_loss(q, k, v):
            g = q.shape[2] // k.shape[2]
            kk, vv = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
            s = jnp.einsum("bthd,bshd->bths", q, kk) / np.sqrt(q.shape[-1])
            s = jnp.where(vis64[:, :, None], s, -1e300)
            lse = jax.nn.logsumexp(s, axis=-1)
            p = jnp.where(vis64[:, :, None], jnp.exp(s - lse[..., None]), 0.0)
            o = jnp.einsum("bths,bshd->bthd", p, vv)
            return jnp.sum(o * w_out) + jnp.sum(jnp.where(w_lse != 0, lse, 0.0) * w_lse)

        return jax.grad(dense_loss, argnums=(0, 1, 2))(*(jnp.asarray(x, jnp.float64) for x in (q, k, v)))


def _case(seed, b=2, t=70, s=90, h=4, kvh=2, d=16, dtype=jnp.float32, wide=False):
    """Random queries, keys, values and ranges; ``wide``: long ranges that drift with the row, so
    tiles of 16 queries see whole tiles of 16 keys."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, t, h, d)), dtype)
    k = jnp.asarray(rng.normal(size=(b, s, kvh, d)), dtype)
    v = jnp.asarray(rng.normal(size=(b, s, kvh, d)), dtype)
    if wide:
        i = np.arange(t)[None]
        lo = i - 30 + rng.integers(-3, 3, size=(b, t))
        hi = i + 40 + rng.integers(-3, 3, size=(b, t))
    else:
        lo = rng.integers(-5, s, size=(b, t))  # below 0: clipped
        hi = lo + rng.integers(0, 40, size=(b, t))  # past S: clipped; 0 long: empty
    hi[0, :3] = lo[0, :3]  # empty rows at the start of a tile
    hi[1, -1] = lo[1, -1] - 4  # hi < lo: empty
    return q, k, v, jnp.asarray(lo, jnp.int32), jnp.asarray(hi, jnp.int32)


def _clip(lo, hi, s):
    return np.clip(np.asarray(lo), 0, s), np.clip(np.asarray(hi), 0, s)


@pytest.mark.parametrize(
    "kvh,blocks,wide",
    [(2, (16, 16, 16), False), (4, (32, 16, 16), False), (1, (16, 32, 32), False), (2, (16, 16, 16), True)],
)
def test_output_lse_and_gradients_match_float64(kvh, blocks, wide):
    """Query and key lengths that are not multiples of the tiles, grouped heads, empty ranges,
    ranges past both ends, the dk/dv kernel's query tiles smaller than and as large as the others, and
    (wide) long ranges that whole query tiles see whole key tiles of; the loss uses the output and the
    log-sum-exp (rows that see something), so the backward's lse cotangent is checked too."""
    q, k, v, lo, hi = _case(kvh, kvh=kvh, wide=wide)
    bq, bk, bq_dkv = blocks
    tiles = {"block_q": bq, "block_k": bk, "block_q_dkv": bq_dkv}
    out, lse = ra.range_attention(q, k, v, lo, hi, **tiles, interpret=True)
    want_out, want_lse = _dense(q, k, v, *_clip(lo, hi, k.shape[1]))
    np.testing.assert_allclose(np.asarray(out), want_out, atol=2e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(lse), want_lse, atol=2e-5, rtol=1e-6)
    empty = np.asarray(hi) <= np.asarray(lo)
    assert empty.any() and np.all(np.asarray(out)[empty] == 0) and np.all(np.asarray(lse)[empty] == -1e30)

    rng = np.random.default_rng(7)
    w_out = rng.normal(size=out.shape)
    w_lse = np.where(empty[..., None], 0.0, rng.normal(size=lse.shape))

    def loss(q, k, v):
        o, s = ra.range_attention(q, k, v, lo, hi, **tiles, interpret=True)
        return jnp.sum(o * w_out) + jnp.sum(jnp.where(w_lse != 0, s, 0.0) * w_lse)

    got = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    l64, h64 = _clip(lo, hi, k.shape[1])
    j = np.arange(k.shape[1])
    want = _dense_grads(q, k, v, (j >= l64[..., None]) & (j < h64[..., None]), w_out, w_lse)
    for name, g, w in zip("qkv", got, want, strict=True):
        assert g.shape == w.shape and g.dtype == q.dtype, name
        w = np.asarray(w)
        np.testing.assert_allclose(np.asarray(g), w, atol=1e-4 * max(1.0, np.abs(w).max()), err_msg=name)


@pytest.mark.parametrize("kvh,blocks", [(2, (16, 16, 16)), (1, (32, 16, 16)), (4, (16, 32, 32))])
def test_two_key_sets_are_one_softmax_over_both_ranges(kvh, blocks):
    """A second key set (``extra``, BLT-D's own-block cells): output, log-sum-exp and the gradients of
    q and both sets' k and v equal one dense float64 softmax over the two sets concatenated, each
    query seeing its range in each; rows that see only one set, or neither, and whole query tiles that
    see only one set included. Key lengths are not multiples of the tiles, so the first set's last
    tile is partial; grouped kv heads."""
    q, k, v, lo, hi = _case(11, s=45, kvh=kvh)
    rng = np.random.default_rng(12)
    b, t, h, d = q.shape
    s2 = 70
    k2 = jnp.asarray(rng.normal(size=(b, s2, kvh, d)), jnp.float32)
    v2 = jnp.asarray(rng.normal(size=(b, s2, kvh, d)), jnp.float32)
    i = np.arange(t)[None]
    lo2 = np.broadcast_to(i // 4 * 4, (b, t)).copy()  # blocks of 4: each row sees its own block
    hi2 = lo2 + rng.integers(0, 5, size=(b, t))  # 0: none of its own block
    hi2[0, :3] = lo2[0, :3]  # row 0's first queries see set 1 only where _case gave them nothing
    lo_, hi_ = np.asarray(lo).copy(), np.asarray(hi).copy()
    hi_[1, 32:64] = lo_[1, 32:64]  # a whole tile (any of the tile sizes) sees only set 2
    hi2[0, 32:64] = lo2[0, 32:64]  # and one sees only set 1
    lo, hi = jnp.asarray(lo_, jnp.int32), jnp.asarray(hi_, jnp.int32)
    lo2, hi2 = jnp.asarray(lo2, jnp.int32), jnp.asarray(hi2, jnp.int32)
    tiles = dict(zip(("block_q", "block_k", "block_q_dkv"), blocks, strict=True))

    def ours(q, k, v, k2, v2):
        return ra.range_attention(q, k, v, lo, hi, extra=(k2, v2, lo2, hi2), **tiles, interpret=True)

    l1, h1 = _clip(lo, hi, k.shape[1])
    j = np.arange(k.shape[1] + s2)
    vis = ((j >= l1[..., None]) & (j < h1[..., None])) | (
        (j >= k.shape[1] + np.asarray(lo2)[..., None]) & (j < k.shape[1] + np.asarray(hi2)[..., None])
    )
    kc, vc = jnp.concatenate([k, k2], axis=1), jnp.concatenate([v, v2], axis=1)
    out, lse = ours(q, k, v, k2, v2)
    want_out, want_lse = _dense(q, kc, vc, None, None, vis)
    np.testing.assert_allclose(np.asarray(out), want_out, atol=2e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(lse), want_lse, atol=2e-5, rtol=1e-6)
    empty = ~vis.any(-1)
    only_own = ~((j < k.shape[1]) & vis).any(-1) & ~empty
    assert empty.any() and only_own.any() and np.all(np.asarray(out)[empty] == 0)

    w_out = rng.normal(size=out.shape)
    w_lse = np.where(empty[..., None], 0.0, rng.normal(size=lse.shape))

    def loss(*args):
        o, s = ours(*args)
        return jnp.sum(o * w_out) + jnp.sum(jnp.where(w_lse != 0, s, 0.0) * w_lse)

    got = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, k2, v2)
    dq, dkc, dvc = _dense_grads(q, kc, vc, vis, w_out, w_lse)
    n = k.shape[1]
    want = (dq, dkc[:, :n], dvc[:, :n], dkc[:, n:], dvc[:, n:])
    for name, g, w in zip(("q", "k", "v", "k2", "v2"), got, want, strict=True):
        w = np.asarray(w)
        assert g.shape == w.shape, name
        np.testing.assert_allclose(np.asarray(g), w, atol=1e-4 * max(1.0, np.abs(w).max()), err_msg=name)


def test_bf16_within_rounding():
    q, k, v, lo, hi = _case(3, dtype=jnp.bfloat16)
    out, lse = ra.range_attention(q, k, v, lo, hi, block_q=16, block_k=16, interpret=True)
    want_out, want_lse = _dense(q, k, v, *_clip(lo, hi, k.shape[1]))
    assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out, np.float64), want_out, atol=3e-2, rtol=0)
    np.testing.assert_allclose(np.asarray(lse), want_lse, atol=3e-2, rtol=1e-3)


@pytest.mark.parametrize("window", [9, None])
def test_causal_window_ranges_are_the_local_mask(window):
    """local_ranges (a causal sliding window within documents) give the dense LocalMask's attention
    of the XLA reference path (fastblt.model.attention)."""
    from fastblt.model import attention as attn_lib

    rng = np.random.default_rng(5)
    b, n, h, d = 2, 64, 2, 16
    q, k, v = (jnp.asarray(rng.normal(size=(b, n, h, d)), jnp.float32) for _ in range(3))
    docs = np.cumsum(rng.random((b, n)) < 0.08, axis=1).astype(np.int32)
    lo, hi = ra.local_ranges(jnp.asarray(docs), n, window)
    got, _ = ra.range_attention(q, k, v, lo, hi, block_q=16, block_k=16, interpret=True)
    pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    mask = attn_lib.LocalMask(pos, jnp.asarray(docs), window)
    want = attn_lib.attention(q, k, v, mask.dense(), "xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=0)


def test_query_tiles_per_key_tile_cover_every_touching_pair():
    """Each key tile's [first, last) holds every query tile with a row whose range touches it (a
    loop over rows), and is empty for a key tile no row touches."""
    rng = np.random.default_rng(2)
    bq, bk, t, s = 8, 16, 48, 100
    lo = rng.integers(0, s, size=(2, t))
    hi = lo + rng.integers(0, 12, size=(2, t))
    lo[1, 8:16] = hi[1, 8:16] = 50  # an empty query tile
    lo[0, :], hi[0, :] = 0, 0
    lo[0, 20], hi[0, 20] = 17, 30  # row 0 touches key tiles 1 alone
    n_tiles = -(-s // bk)
    first, last = ra.query_tiles_per_key_tile(jnp.asarray(lo), jnp.asarray(hi), bq, bk, n_tiles)
    first, last = np.asarray(first), np.asarray(last)
    for row in range(2):
        for c in range(n_tiles):
            touching = {
                i // bq
                for i in range(t)
                if hi[row, i] > lo[row, i] and lo[row, i] < (c + 1) * bk and hi[row, i] > c * bk
            }
            assert touching <= set(range(first[row, c], last[row, c])), (row, c)
            if not touching:
                assert first[row, c] >= last[row, c], (row, c)
    assert (first[0, 1], last[0, 1]) == (2, 3)


def test_unsupported_head_dim_names_the_fallback():
    q = jnp.zeros((1, 16, 2, 24))
    k = jnp.zeros((1, 16, 2, 24))
    lo = jnp.zeros((1, 16), jnp.int32)
    with pytest.raises(ValueError, match="power-of-two head dim"):
        ra.range_attention(q, k, k, lo, lo, interpret=True)


@pytest.mark.parametrize("own_block", [False, True])
def test_kernels_lower_for_cuda_forward_and_backward(own_block):
    """Triton takes the kernels as written (block shapes, dynamic loop bounds, 1-D row loads): BLT-D-4's
    block rows at blt_mid (16 x 4 100 queries, 8 heads of 64, over 4 096 clean keys) lower for CUDA to
    three kernels: the forward, dq, and dk with dv; with their own block's cells as a second key set,
    to four (dk with dv once per set)."""
    q = jnp.ones((16, 4100, 8, 64), jnp.bfloat16)
    k = jnp.ones((16, 4096, 8, 64), jnp.bfloat16)
    lo = jnp.zeros((16, 4100), jnp.int32)
    own = jnp.broadcast_to(jnp.arange(4100, dtype=jnp.int32) // 4 * 4, lo.shape)
    extra = (q, q, own, own + 4) if own_block else None

    def loss(q, k, v):
        out, lse = ra.range_attention(q, k, v, lo, lo + 511, extra=extra, interpret=False)
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)

    text = cuda_text(jax.grad(loss, argnums=(0, 1, 2)), q, k, k)
    assert text.count("xla.gpu.triton") == (4 if own_block else 3)


def test_cross_attentions_lower_for_cuda_at_blt_mid():
    """Both cross-attentions on the kernel at blt_mid's shapes (4-byte patches: 1 026 patches of 2
    slots), whose key and query counts are not powers of two: three kernels each."""
    from fastblt.model import cross_attention as cross

    n, p = 4096, 1026
    rows = jnp.ones((16, n, 8, 64), jnp.bfloat16)
    slots = jnp.ones((16, p, 2, 8, 64), jnp.bfloat16)
    ids = (jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (16, n)) + 3) // 4

    def decoder(q, k):
        return jnp.sum(cross.latent_ranges(q, k, k, ids, interpret=False).astype(jnp.float32))

    def encoder(q, k):
        return jnp.sum(cross.segment_ranges(q, k, k, ids, interpret=False).astype(jnp.float32))

    for fn, args in ((decoder, (rows, slots)), (encoder, (slots, rows))):
        assert cuda_text(jax.grad(fn, argnums=(0, 1)), *args).count("xla.gpu.triton") == 3, fn.__name__


@pytest.mark.slow
def test_range_check_script_passes_the_kernel_and_flags_a_wrong_one(monkeypatch):
    """experiments/benchmarks/range_check.py (interpreted, small shapes): the kernel agrees with the XLA
    reference on block rows, both cross-attentions and windowed rows within documents; ranges
    one key short are reported as a mismatch."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments", "benchmarks"))
    import range_check

    rows = range_check.check(range_check.SMALL, interpret=True, repeats=1)
    paths = ["xla", "ranged", "ranged_own", "ranged, key counts"]
    assert [r["path"] for r in rows] == paths and all(r["ok"] for r in rows)
    assert rows[3]["max_keys"] > 20 and rows[3]["lse_max_abs_error"] < 1e-5
    local = range_check.check_local(range_check.LOCAL_SMALL[0], interpret=True, repeats=1)
    assert [r["path"] for r in local] == ["xla", "ranged"] and all(r["ok"] for r in local)
    cross = range_check.check_cross(range_check.CROSS_SMALL, interpret=True, repeats=1)
    assert [r["path"] for r in cross] == ["reference", "ranged"] * 2 and all(r["ok"] for r in cross)
    real = ra.range_attention
    monkeypatch.setattr(ra, "range_attention", lambda q, k, v, lo, hi, **kw: real(q, k, v, lo, hi - 1, **kw))
    rows = range_check.check(range_check.SMALL, interpret=True, repeats=1)
    assert not rows[1]["ok"] and rows[1]["out_rel_error"] > 0.05
    assert not rows[2]["ok"] and rows[2]["out_rel_error"] > 0.05
    assert not rows[3]["ok"] and rows[3]["lse_max_abs_error"] > 1e-3
    cross = range_check.check_cross(range_check.CROSS_SMALL, interpret=True, repeats=1)
    assert not cross[1]["ok"] and not cross[3]["ok"]


def test_range_check_winners_picks_only_switches_faster_than_todays_path(tmp_path, capsys):
    """range_check.py --winners: a switch is on where its kernel rows sum to less time than the path
    without it, off where they do not or a row failed or is missing (hand-built rows)."""
    import json
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments", "benchmarks"))
    import range_check

    def row(path, ms, call=None, ok=True):
        return {"path": path, "fwd_bwd_ms": ms, "ok": ok, **({"call": call} if call else {})}

    rows = [row("xla", 9.0), row("ranged", 2.0), row("tiles", 3.0), row("ranged 64x64x64, dkv 64", 1.0)]
    rows += [row(p, ms, "decoder cross-attention") for p, ms in (("reference", 1.0), ("ranged", 0.5))]
    rows += [row(p, ms, "encoder cross-attention") for p, ms in (("reference", 1.0), ("ranged", 1.6))]
    rows += [row(p, ms, "decoder") for p, ms in (("xla", 5.0), ("cudnn", 1.0), ("ranged", 0.9))]
    rows += [row(p, ms, "global") for p, ms in (("xla", 5.0), ("cudnn", 1.0), ("ranged", 1.2))]
    # block rows 2 < 3; cross 2.1 > 2.0; self 2.1 > 2.0
    assert range_check.winners(rows) == ["--range-kernel", "--no-cross-ranges", "--no-self-ranges"]
    rows[-1]["fwd_bwd_ms"] = 1.0  # self 1.9 < 2.0
    assert range_check.winners(rows) == ["--range-kernel", "--no-cross-ranges", "--self-ranges"]
    rows[1]["ok"] = False
    assert range_check.winners(rows) == ["--no-range-kernel", "--no-cross-ranges", "--self-ranges"]
    off = ["--no-range-kernel", "--no-cross-ranges", "--no-self-ranges"]
    assert range_check.winners(rows[4:8]) == off  # cross slower; block and self rows missing
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert range_check.main(["--winners", str(path)]) == 0
    assert capsys.readouterr().out.split() == ["--no-range-kernel", "--no-cross-ranges", "--self-ranges"]


def test_every_sweep_setting_lowers_for_cuda_and_is_restored():
    """range_check.py's SWEEP: under each setting (tiles, warps, stages) the three kernels lower for
    CUDA with the setting's warps and stages, settings that differ give different kernels, and the
    module's own settings come back afterwards."""
    import os
    import re
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments", "benchmarks"))
    import range_check

    before = [getattr(ra, name) for name in ra.TUNABLES]
    q = jnp.ones((2, 1000, 4, 64), jnp.bfloat16)
    lo = jnp.zeros((2, 1000), jnp.int32)

    def loss(q, k, v):
        out, lse = ra.range_attention(q, k, v, lo, lo + 300, interpret=False)
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)

    kernels = {}
    for values in range_check.SWEEP:
        with range_check.kernel_settings(values):
            assert [getattr(ra, name) for name in ra.TUNABLES] == list(values)
            text = cuda_text(jax.grad(loss, argnums=(0, 1, 2)), q, q, q)
        assert [getattr(ra, name) for name in ra.TUNABLES] == before
        assert ra.settings() == dict(zip((n.lower() for n in ra.TUNABLES), before, strict=True))
        assert text.count("xla.gpu.triton") == 3, values
        assert text.count(f"num_warps = {values[3]} : i32") == 3, values
        assert text.count(f"num_stages = {values[4]} : i32") == 3, values
        kernels[values] = re.findall(r'ir = "[^"]*"', text)
    assert kernels[range_check.SWEEP[0]] != kernels[range_check.SWEEP[1]]
