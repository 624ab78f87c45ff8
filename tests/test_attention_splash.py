"""The "splash" attention path (JAX's Pallas TPU splash-attention kernel, run in Pallas interpret
mode on CPU) against the XLA reference path: values and gradients for causal, windowed, document,
grouped-query and ragged-length LocalMasks in float32 and bfloat16; the path under a mesh (shard_map
over batch and heads); the dispatch rules; and a tiny BLT's loss and gradients.

Sizes are small because interpret mode runs the kernel's grid as a loop: lengths of 128-384 rows give
1-3 blocks of 128 (the kernel's smallest key block), so windows and documents cross block edges.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastblt import sharding
from fastblt.config import HashConfig, LocalModelConfig, ModelConfig, PatcherConfig, TransformerConfig
from fastblt.model import BLT
from fastblt.model import attention as attn_lib
from fastblt.model.attention import LocalMask, attention, document_ids, resolve_impl, target_platform
from fastblt.train.objectives import next_byte_loss

EOS = 2


def _inputs(n: int, h: int, kv: int, d: int, docs: str | None, dtype, seed: int = 0):
    """q, k, v and a LocalMask's document ids for two rows of ``n`` positions.

    docs: None (no document masking) or "several" (row 0: EOS at irregular places, so documents
    start inside blocks; row 1: one document).
    """
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(2, n, h, d)), dtype)
    k = jnp.asarray(rng.normal(size=(2, n, kv, d)), dtype)
    v = jnp.asarray(rng.normal(size=(2, n, kv, d)), dtype)
    doc_ids = None
    if docs is not None:
        tokens = rng.integers(3, 260, (2, n))
        tokens[0, [5, n // 3, n // 3 + 1, n - 40]] = EOS  # a one-byte document, one ending near the end
        doc_ids = document_ids(jnp.asarray(tokens))
        assert int(doc_ids[0, -1]) == 4 and int(doc_ids[1, -1]) == 0
    return q, k, v, doc_ids


def _value_and_grads(impl: str, q, k, v, mask):
    """The output, and the gradient of a random projection of it with respect to q, k and v."""
    g = jnp.asarray(np.random.default_rng(7).normal(size=q.shape), jnp.float32)

    @jax.jit
    def run(q, k, v, mask):
        def loss(q, k, v):
            out = attention(q, k, v, mask, impl)
            return jnp.sum(out.astype(jnp.float32) * g), out

        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return out, grads

    return run(q, k, v, mask)


def _assert_close(got, want, tol: float) -> None:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, atol=tol, rtol=tol)


CASES = {
    # name: (length, heads, kv heads, head dim, window, docs, dtype, tolerance)
    "causal": (128, 2, 2, 16, None, None, jnp.float32, 2e-5),
    "window": (384, 2, 2, 16, 100, None, jnp.float32, 2e-5),  # 3 blocks, the window crosses edges
    "documents": (256, 2, 2, 16, None, "several", jnp.float32, 2e-5),
    "window_documents": (384, 2, 2, 16, 100, "several", jnp.float32, 2e-5),
    "gqa": (128, 4, 1, 16, None, "several", jnp.float32, 2e-5),
    "ragged": (200, 4, 2, 16, 48, "several", jnp.float32, 2e-5),  # padded to 256 and sliced back
    "bf16": (200, 4, 2, 16, 48, "several", jnp.bfloat16, 3e-2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_splash_matches_xla_values_and_gradients(case):
    n, h, kv, d, window, docs, dtype, tol = CASES[case]
    q, k, v, doc_ids = _inputs(n, h, kv, d, docs, dtype)
    mask = LocalMask(jnp.broadcast_to(jnp.arange(n), (2, n)), doc_ids, window)
    out, grads = _value_and_grads("splash", q, k, v, mask)
    ref, ref_grads = _value_and_grads("xla", q, k, v, mask)
    assert out.shape == q.shape and out.dtype == q.dtype
    _assert_close(out, ref, tol)
    for got, want in zip(grads, ref_grads, strict=True):
        assert got.dtype == want.dtype
        _assert_close(got, want, tol * 10 if dtype == jnp.bfloat16 else tol)


def test_splash_under_a_mesh_splits_batch_and_heads():
    """Inside the train step's mesh context the kernel runs in shard_map: same values and gradients."""
    n, h, kv, d = 128, 4, 2, 16
    q, k, v, doc_ids = _inputs(n, h, kv, d, "several", jnp.float32, seed=3)
    mask = LocalMask(jnp.broadcast_to(jnp.arange(n), (2, n)), doc_ids, 40)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]).reshape(2, 1, 2), ("data", "fsdp", "tensor"))

    ref, ref_grads = _value_and_grads("xla", q, k, v, mask)
    with sharding.activation_sharding(mesh):
        placed = sharding.activation_spec(("batch", None, "heads", None), q.shape)
        assert placed is not None and tuple(placed[1]) == (("data", "fsdp"), None, "tensor", None)
        out, grads = _value_and_grads("splash", q, k, v, mask)
    _assert_close(out, ref, 2e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        _assert_close(got, want, 2e-5)


def test_dispatch_rules(monkeypatch):
    q = jnp.zeros((1, 128, 2, 64), jnp.bfloat16)
    assert resolve_impl("splash", q, local=True) == "splash"
    assert resolve_impl("splash", q) == "xla"  # dense masks have no splash form
    assert resolve_impl("auto", q, local=True) == "xla"  # CPU
    with target_platform("tpu"):
        assert resolve_impl("auto", q, local=True) == "splash"
        assert resolve_impl("auto", q) == "xla"
        assert resolve_impl("auto", q[:, :8], local=True) == "xla"  # decode-sized calls
        assert resolve_impl("auto", q.astype(jnp.float32), local=True) == "splash"
    with target_platform("gpu"):
        assert resolve_impl("auto", q, local=True) == "cudnn"

    # Compiled for TPU the kernel is Mosaic's; anywhere else it is interpreted.
    seen = []
    monkeypatch.setattr(attn_lib, "splash_local", lambda *a, interpret: seen.append(interpret) or a[0])
    mask = LocalMask(jnp.zeros((1, 128), jnp.int32), None, None)
    attention(q, q, q, mask, "splash")
    with target_platform("tpu"):
        attention(q, q, q, mask, "auto")
    assert seen == [True, False]


def test_splash_with_a_dense_mask_is_the_xla_path():
    q, k, v, _ = _inputs(16, 2, 1, 8, None, jnp.float32)
    mask = jnp.asarray(np.random.default_rng(1).random((2, 16, 16)) < 0.5)
    np.testing.assert_array_equal(attention(q, k, v, mask, "splash"), attention(q, k, v, mask, "xla"))


TINY = ModelConfig(
    encoder=LocalModelConfig(dim=32, n_layers=1, n_heads=2, window=16),
    global_model=TransformerConfig(dim=48, n_layers=1, n_heads=4, n_kv_heads=2),
    decoder=LocalModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, window=16),
    entropy_model=None,
    patcher=PatcherConfig(mode="static", patch_size=4),
    hash=HashConfig(group_sizes=(2, 3), nb_functions=1, vocab=97),
    cross_attn_k=2,
)


def test_tiny_blt_loss_and_gradients_match_xla():
    """Every LocalMask of a BLT forward (encoder and decoder windows, the global model's patch
    documents, GQA) on the splash path: the loss and every parameter's gradient agree with XLA's."""
    rng = np.random.default_rng(0)
    n = 48
    tokens = rng.integers(4, 260, (2, n)).astype(np.int32)
    tokens[:, 0] = 1
    tokens[0, 17], tokens[0, 18] = EOS, 1  # two documents in row 0
    targets = np.concatenate([tokens[:, 1:], rng.integers(4, 260, (2, 1))], axis=1).astype(np.int32)
    weights = np.ones((2, n), np.float32)
    lengths = np.asarray([[1] + [4] * 12, [1] + [4] * 12], np.int32)
    params = jax.jit(BLT(TINY).init)(jax.random.key(0), jnp.asarray(tokens), jnp.asarray(lengths))["params"]

    def loss_and_grads(impl):
        model = BLT(TINY.replace(attention_impl=impl))

        def loss(p):
            logits = model.apply({"params": p}, jnp.asarray(tokens), jnp.asarray(lengths))
            return next_byte_loss(logits, jnp.asarray(targets), jnp.asarray(weights))[0]

        return jax.jit(jax.value_and_grad(loss))(params)

    loss, grads = loss_and_grads("splash")
    ref, ref_grads = loss_and_grads("xla")
    np.testing.assert_allclose(float(loss), float(ref), rtol=1e-6)
    flat, flat_ref = jax.tree.leaves_with_path(grads), jax.tree.leaves(ref_grads)
    for (path, got), want in zip(flat, flat_ref, strict=True):
        scale = float(jnp.max(jnp.abs(want))) + 1e-12
        err = float(jnp.max(jnp.abs(got - want)))
        assert err <= 1e-4 * scale, (jax.tree_util.keystr(path), err, scale)
