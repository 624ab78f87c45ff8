"""fastblt's BLT against the naive float64 loop oracle (tests/oracle.py) in the cases the Hugging
Face port cannot check: cross_attn_k != 2, rows longer than the local window, EOS inside a row
(document masking), batches with unequal patch counts, the reference's pool-once encoder, GQA."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

try:
    import oracle
except ImportError:  # pragma: no cover - when tests/ is a package
    from tests import oracle

from fastblt.config import EntropyModelConfig, HashConfig, LocalModelConfig, ModelConfig, TransformerConfig
from fastblt.model import BLT, EntropyModel

TOL = 1e-4


def small_config(k: int = 2, enc_all: bool = False, dec_all: bool = True, **changes) -> ModelConfig:
    base = ModelConfig(
        encoder=LocalModelConfig(dim=32, n_layers=2, n_heads=4, window=16, cross_attn_all_layers=enc_all),
        global_model=TransformerConfig(dim=48, n_layers=2, n_heads=4, n_kv_heads=2),
        decoder=LocalModelConfig(dim=32, n_layers=2, n_heads=4, window=16, cross_attn_all_layers=dec_all),
        entropy_model=EntropyModelConfig(dim=32, n_layers=2, n_heads=2, window=12),
        hash=HashConfig(group_sizes=(2, 3, 5), nb_functions=2, vocab=97),
        cross_attn_k=k,
    )
    return dataclasses.replace(base, **changes)


def init_params(config: ModelConfig, seed: int = 0) -> dict:
    """Random params with every norm scale perturbed away from 1 (so a dropped scale shows)."""
    tokens = jnp.ones((1, 8), jnp.int32)
    lengths = jnp.array([[1, 8]], jnp.int32)
    params = nn.meta.unbox(BLT(config).init(jax.random.key(seed), tokens, lengths)["params"])
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    rng = np.random.default_rng(seed)
    out = []
    for path, leaf in leaves:
        if jax.tree_util.keystr(path).endswith("['scale']"):
            leaf = leaf + jnp.asarray(rng.normal(0, 0.3, leaf.shape), leaf.dtype)
        out.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, out)


def random_lengths(rng: np.random.Generator, n: int, max_len: int = 6) -> list[int]:
    """Reference-convention lengths: [1, ...], summing to n + 1."""
    lengths, left = [1], n - 1  # bytes 1..n-1 after the BOS patch
    while left > 0:
        step = int(rng.integers(1, max_len + 1))
        step = min(step, left)
        lengths.append(step)
        left -= step
    if rng.random() < 0.5:  # the "next byte opens a new patch" case: a 1-long patch of no real byte
        lengths.append(1)
    else:
        lengths[-1] += 1
    return lengths


def batch(rng, rows: list[int], eos_at: dict[int, list[int]] | None = None):
    n = max(rows)
    tokens = np.zeros((len(rows), n), np.int32)
    all_lengths = []
    for b in range(len(rows)):
        row = rng.integers(4, 260, n)
        row[0] = 1
        for pos in (eos_at or {}).get(b, []):
            row[pos] = 2
            if pos + 1 < n:
                row[pos + 1] = 1
        tokens[b] = row
        all_lengths.append(random_lengths(rng, n))
    p = max(len(x) for x in all_lengths)
    lengths = np.zeros((len(rows), p), np.int32)
    for b, x in enumerate(all_lengths):
        lengths[b, : len(x)] = x
    return tokens, lengths


def check(config: ModelConfig, tokens, lengths, seed: int = 0):
    params = init_params(config, seed)
    ours = jax.jit(BLT(config).apply)({"params": params}, jnp.asarray(tokens), jnp.asarray(lengths))
    expected = oracle.blt_forward(jax.tree.map(np.asarray, params), config, tokens, lengths)
    np.testing.assert_allclose(np.asarray(ours), expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("k", [1, 3, 4])
def test_cross_attn_k(k):
    rng = np.random.default_rng(k)
    check(small_config(k=k), *batch(rng, [40]))


@pytest.mark.parametrize(
    "enc_all,dec_all,repool", [(True, True, False), (True, False, True), (False, False, False)]
)
def test_cross_attention_layouts(enc_all, dec_all, repool):
    rng = np.random.default_rng(3)
    config = small_config(k=2, enc_all=enc_all, dec_all=dec_all, encoder_repool_every_layer=repool)
    check(config, *batch(rng, [33]))


def test_rows_longer_than_window_and_global_projection():
    rng = np.random.default_rng(5)
    config = small_config(k=1)  # k * De = 32 != Dg = 48: the global input projection is used
    assert config.needs_global_projection
    check(config, *batch(rng, [80]))


def test_eos_inside_rows_document_masking():
    rng = np.random.default_rng(6)
    check(small_config(k=2), *batch(rng, [60, 60], eos_at={0: [20], 1: [7, 41]}))


def test_batch_with_unequal_patch_counts():
    rng = np.random.default_rng(8)
    tokens, lengths = batch(rng, [50, 50, 50])
    counts = (lengths > 0).sum(1)
    assert len(set(counts.tolist())) > 1
    check(small_config(k=4), tokens, lengths)


def test_without_document_masking():
    rng = np.random.default_rng(9)
    check(small_config(k=2, document_masking=False), *batch(rng, [48], eos_at={0: [10]}))


def test_entropy_model_window_and_documents():
    config = EntropyModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, window=8)
    rng = np.random.default_rng(10)
    tokens = rng.integers(4, 260, (2, 40)).astype(np.int32)
    tokens[:, 0] = 1
    tokens[1, 17] = 2
    model = EntropyModel(config)
    params = nn.meta.unbox(model.init(jax.random.key(1), jnp.asarray(tokens))["params"])
    ours = model.apply({"params": params}, jnp.asarray(tokens))
    expected = oracle.entropy_model_forward(jax.tree.map(np.asarray, params), config, tokens)
    np.testing.assert_allclose(np.asarray(ours), expected, atol=TOL, rtol=0)


def test_no_nan_for_empty_patches_and_batch_padding():
    """Empty slots (the next-byte patch, zero-length padding) never produce NaN, in value or grad."""
    config = small_config(k=2)
    params = init_params(config)
    tokens = jnp.asarray(np.r_[1, np.arange(10, 19)][None], jnp.int32)
    lengths = jnp.asarray([[1, 3, 3, 3, 1, 0, 0]], jnp.int32)

    def loss(p):
        return BLT(config).apply({"params": p}, tokens, lengths).sum()

    value, grads = jax.jit(jax.value_and_grad(loss))(params)  # one compile, not one per op
    assert np.isfinite(float(value))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_bf16_compute_close_to_fp32():
    rng = np.random.default_rng(11)
    config = small_config(k=2)
    tokens, lengths = batch(rng, [64])
    params = init_params(config)
    f32 = jax.jit(BLT(config).apply)({"params": params}, tokens, lengths)
    bf16 = jax.jit(BLT(config.replace(dtype="bfloat16")).apply)({"params": params}, tokens, lengths)
    assert bf16.dtype == jnp.float32  # logits are always float32
    assert float(jnp.max(jnp.abs(bf16 - f32))) < 0.1


@pytest.mark.parametrize(
    "changes",
    [
        dict(remat=True),
        dict(remat=True, remat_policy="minimal"),
        dict(scan_layers=True),
        dict(scan_layers=True, remat=True, remat_policy="minimal"),
    ],
)
def test_remat_and_scan_change_nothing_but_memory_and_compile_time(changes):
    rng = np.random.default_rng(12)
    config = small_config(k=2, global_model=TransformerConfig(dim=48, n_layers=3, n_heads=4, n_kv_heads=2))
    tokens, lengths = batch(rng, [40])
    params = init_params(config)

    def loss(c, p):
        return BLT(c).apply({"params": p}, tokens, lengths).sum()

    # Jitted: one compile per program instead of one per operation.
    v0, g0 = jax.jit(jax.value_and_grad(lambda p: loss(config, p)))(params)
    v1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(config.replace(**changes), p)))(params)
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-6)

    # Scanned layers, and remat's recomputed forward, fuse differently: float32 rounding, not a
    # different function (remat alone: 6 of 1 152 gradient entries of one leaf off by up to 1.1e-6,
    # 1e-4 relative, under XLA's older CPU fusion generator of tests/conftest.py; a wrong recompute
    # moves gradients by far more).
    def close(a, b):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6 * float(np.abs(b).max()))

    jax.tree.map(close, g1, g0)
    if changes.get("remat"):
        # What the backward keeps, per jax's own account of the saved residuals: "full" keeps no
        # product of a block, "minimal" keeps the projections but not attention's batched products.
        def kept_elements(c):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                print_saved_residuals(lambda p: loss(c, p), params)
            return sum(
                math.prod(map(int, filter(None, shape.split(","))))
                for shape in re.findall(r"^\w+\[([\d,]*)\]", out.getvalue(), re.M)
            )

        plain, kept = kept_elements(config.replace(remat=False)), kept_elements(config.replace(**changes))
        full = kept_elements(config.replace(**{**changes, "remat_policy": "full"}))
        assert plain > kept > full if changes.get("remat_policy") == "minimal" else plain > full
        if changes.get("remat_policy") == "minimal":
            # Every layer keeps as much, scanned or not: the scan's checkpoint honours the policy too.
            other = {**changes, "scan_layers": not changes.get("scan_layers", False)}
            extra = kept_elements(config.replace(**other)) - kept_elements(
                config.replace(**{**other, "remat_policy": "full"})
            )
            assert kept - full == extra
    if changes.get("scan_layers"):  # one block in the program, not three
        hlo = jax.jit(lambda p: loss(config.replace(**changes), p)).lower(params).as_text()
        assert "while" in hlo


def test_scanned_layers_in_bfloat16_take_cast_kernels_and_change_nothing():
    """In bfloat16 the scan stacks the products' kernels already cast (the norms' scales stay float32),
    so no step of the loop casts a weight; the loss and every float32 gradient equal the unrolled
    layers' (each Dense casts its kernel the same way, and its gradient comes back through the same
    cast; bf16 products fused differently)."""
    rng = np.random.default_rng(5)
    config = small_config(
        k=2, global_model=TransformerConfig(dim=48, n_layers=3, n_heads=4, n_kv_heads=2), dtype="bfloat16"
    )
    tokens, lengths = batch(rng, [40])
    params = init_params(config)

    def loss(c, p):
        return BLT(c).apply({"params": p}, tokens, lengths).sum()

    scanned = config.replace(scan_layers=True, remat=True)
    v0, g0 = jax.jit(jax.value_and_grad(lambda p: loss(config, p)))(params)
    v1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(scanned, p)))(params)
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-2)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g1)[0], jax.tree.leaves(g0), strict=True):
        assert a.dtype == b.dtype == jnp.float32, jax.tree_util.keystr(path)
        scale = float(np.abs(b).max()) or 1.0
        np.testing.assert_allclose(a, b, atol=2e-2 * scale, err_msg=jax.tree_util.keystr(path))

    def eqns(jaxpr):  # every equation, nested ones (inside jit, custom_vjp, ...) too
        for e in jaxpr.eqns:
            yield e
            for sub in jax.extend.core.jaxprs_in_params(e.params):
                yield from eqns(sub)

    jaxpr = jax.make_jaxpr(lambda p: loss(scanned, p))(params).jaxpr
    (scan,) = [e for e in eqns(jaxpr) if e.primitive.name == "scan"]
    xs = scan.invars[scan.params["num_consts"] + scan.params["num_carry"] :]
    stacked = {(str(v.aval.dtype), v.aval.ndim) for v in xs if v.aval.shape[:1] == (3,)}
    assert ("bfloat16", 3) in stacked and ("float32", 3) not in stacked  # kernels [L, in, out] in bf16
    assert ("float32", 2) in stacked  # the norms' scales [L, dim] stay float32


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_swiglu_forward_is_the_reference_op_and_its_gradient_autodiffs(dtype):
    """layers.swiglu: the forward is silu(gate) * up exactly; the one-pass gradient equals autodiff of
    that expression (float64 on the host as the oracle), to float32 rounding, and to bf16 rounding in
    bf16 (with float32 inside, it is at least as close as autodiff in bf16)."""
    from fastblt.model.layers import swiglu

    rng = np.random.default_rng(3)
    gate, up, g = (jnp.asarray(rng.normal(scale=3.0, size=(4, 64)), dtype) for _ in range(3))
    want_out = np.asarray(jax.nn.silu(gate) * up)
    np.testing.assert_array_equal(np.asarray(swiglu(gate, up)), want_out)
    d_gate, d_up = jax.vjp(swiglu, gate, up)[1](g)
    a, b, c = (np.asarray(x, np.float64) for x in (gate, up, g))
    s = 1.0 / (1.0 + np.exp(-a))
    want_gate, want_up = c * b * (s + a * s * (1.0 - s)), c * a * s
    auto_gate, auto_up = jax.vjp(lambda x, y: jax.nn.silu(x) * y, gate, up)[1](g)
    cases = [(d_gate, auto_gate, want_gate), (d_up, auto_up, want_up)]
    for got, auto, want in cases:
        got_err = np.abs(np.asarray(got, np.float64) - want).max()
        auto_err = np.abs(np.asarray(auto, np.float64) - want).max()
        scale = np.abs(want).max()
        assert got_err <= (1e-6 if dtype == jnp.float32 else 1e-2) * scale
        assert got_err <= auto_err * 1.01 + 1e-6 * scale


def test_rope_is_the_oracles_pair_rotation():
    """layers.rope (one pass over the head with the pairs swapped) against the float64 oracle's
    rotation of each interleaved pair (positions under 500: float32 angles are exact to ~3e-5 rad
    there), and its gradient the transposed rotation."""
    from fastblt.model.layers import rope

    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 9, 3, 16)).astype(np.float32)
    positions = rng.integers(0, 500, size=(2, 9))
    got = np.asarray(rope(jnp.asarray(x), jnp.asarray(positions, jnp.int32), 500000.0))
    for b in range(2):
        for h in range(3):
            want = oracle.rope(x[b, :, h].astype(np.float64), positions[b], 500000.0)
            np.testing.assert_allclose(got[b, :, h], want, rtol=0, atol=1e-4 * np.abs(want).max())
    g = rng.normal(size=x.shape).astype(np.float32)
    grad = np.asarray(
        jax.vjp(lambda v: rope(v, jnp.asarray(positions, jnp.int32), 500000.0), jnp.asarray(x))[1](
            jnp.asarray(g)
        )[0]
    )
    back = np.asarray(
        rope(jnp.asarray(grad), jnp.asarray(positions, jnp.int32), 500000.0)
    )  # rotating back...
    np.testing.assert_allclose(np.sum(back * back), np.sum(g * g), rtol=1e-5)  # ...keeps the norm
    np.testing.assert_allclose(np.sum(grad * x), np.sum(g * got), rtol=1e-4)  # <J^T g, x> = <g, J x>
