"""BLT-D training (fastblt/train/blt_d.py, fastblt/model/block_rows.py) against naive loop-based oracles.

* block layout, padding cells and decoder masks vs loops over a random patching (overlapping blocks,
  blocks running past the row, padding patch slots, EOS inside rows, padding targets);
* the forward vs a float64 numpy decoder run over the concatenated N + K * B rows with the naive
  dense mask (tests/oracle.py pieces), on both attention paths;
* no leakage: clean bytes at or after a block's start never change that block's logits;
* with diffusion_weight 0 the loss and its gradient are plain BLT's next-byte loss;
* masked-cell counts and the 1/t weighting vs a hand computation;
* the ``objective`` config section's validation.

Sizes (comment asked by the issue): N = 16 clean rows, P = 8 slots (K = 7 blocks), B = 4: the decoder
sees 16 + 28 = 44 rows per example.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

try:
    import fused_stand_in
    import oracle
    from test_model_vs_oracle import init_params as oracle_init_params
except ImportError:  # pragma: no cover - when tests/ is a package
    from tests import fused_stand_in, oracle
    from tests.test_model_vs_oracle import init_params as oracle_init_params

from fastblt.config import (
    ConfigError,
    HashConfig,
    LocalModelConfig,
    ModelConfig,
    PatcherConfig,
    TransformerConfig,
    model_config_from_dict,
)
from fastblt.model import BLT, abstract_params
from fastblt.model.blt import blt_d_logits
from fastblt.train import blt_d as D
from fastblt.train.objectives import next_byte_loss

EOS = 2
N, P, B = 16, 8, 4
WINDOW = 8

CFG = ModelConfig(
    encoder=LocalModelConfig(dim=32, n_layers=1, n_heads=4, window=WINDOW),
    global_model=TransformerConfig(dim=48, n_layers=1, n_heads=4, n_kv_heads=2),
    decoder=LocalModelConfig(
        dim=32, n_layers=2, n_heads=4, n_kv_heads=2, window=WINDOW, cross_attn_all_layers=True
    ),
    entropy_model=None,
    patcher=PatcherConfig(mode="static"),
    hash=HashConfig(group_sizes=(2, 3), nb_functions=1, vocab=97),
    cross_attn_k=2,
    mask_embedding=True,
)


def init_params(config: ModelConfig = CFG, seed: int = 0) -> dict:
    """Random params with norm scales moved away from 1 (a dropped norm scale shows)."""
    return oracle_init_params(config, seed)


def make_batch(seed: int = 0):
    """Two rows: row 0 has an EOS (+ BOS) inside; row 1 ends in 3 padding bytes (mask 0).

    Patch lengths are random (1..5 bytes, B = 4: blocks overlap and run into later patches and past
    the row), in the reference convention (BOS patch of 1, sum N + 1, zero-padded to P slots).
    """
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, 260, (2, N)).astype(np.int32)
    tokens[:, 0] = 1
    tokens[0, 6], tokens[0, 7] = EOS, 1
    tokens[1, N - 3 :] = 0
    targets = np.concatenate([tokens[:, 1:], rng.integers(4, 260, (2, 1))], axis=1).astype(np.int32)
    mask = np.ones((2, N), np.float32)
    mask[1, N - 4 :] = 0
    lengths = np.zeros((2, P), np.int32)
    for b in range(2):
        while True:
            row, left = [1], N
            while left > 0:
                step = min(int(rng.integers(1, 6)), left)
                row.append(step)
                left -= step
            if len(row) <= P - (1 - b):  # row 0 fills every slot less one, row 1 may leave more
                break
        lengths[b, : len(row)] = row
    return tokens, targets, mask, lengths


# ---------------------------------------------------------------------------------------------------------
# Naive constructions.
# ---------------------------------------------------------------------------------------------------------


def naive_docs(tokens) -> np.ndarray:
    return oracle.document_ids(tokens)


def naive_blocks(tokens, targets, mask, lengths, block_size, document_masking=True):
    """Loops: per block q (patch q + 1): start, positions, cell bytes, validity."""
    batch, num = lengths.shape
    n = tokens.shape[1]
    starts = np.zeros((batch, num - 1), np.int64)
    positions = np.zeros((batch, num - 1, block_size), np.int64)
    cells = np.zeros((batch, num - 1, block_size), np.int64)
    valid = np.zeros((batch, num - 1, block_size), bool)
    for b in range(batch):
        for q in range(num - 1):
            s = int(sum(lengths[b, : q + 1]))
            starts[b, q] = s
            for k in range(block_size):
                j = s + k
                positions[b, q, k] = j
                ok = lengths[b, q + 1] > 0 and j <= n and mask[b, j - 1] > 0
                if ok and document_masking:
                    # no EOS between the prefix end s - 1 and the predicting row j - 1 (exclusive)
                    ok = all(int(tokens[b, p]) != EOS for p in range(s - 1, j - 1))
                valid[b, q, k] = ok
                cells[b, q, k] = targets[b, j - 1] if ok else 0
    return starts, positions, cells, valid


def naive_full_mask(tokens, starts, positions, valid, window, document_masking=True):
    """bool[b, N + R, N + R] over [clean rows ; block cells], by loops over (query, key) pairs."""
    batch, n = tokens.shape
    num, bs = positions.shape[1:]
    docs = naive_docs(tokens)
    clean = oracle.local_self_mask(tokens, window, document_masking)
    full = np.zeros((batch, n + num * bs, n + num * bs), bool)
    full[:, :n, :n] = clean
    for b in range(batch):
        for q in range(num):
            s = starts[b, q]
            if s > n:  # a padding slot: no real cell, rows left empty (not part of the contract)
                continue
            for k in range(bs):
                row = n + q * bs + k
                j = positions[b, q, k]
                for c in range(n):
                    vis = c < s and (window is None or j - c < window)
                    if vis and document_masking:
                        vis = docs[b, c] == docs[b, s - 1]
                    full[b, row, c] = vis
                for q2 in range(num):
                    for k2 in range(bs):
                        full[b, row, n + q2 * bs + k2] = q2 == q and valid[b, q2, k2]
    return full


def naive_decoder(params, config, h_enc, g, x_blocks, positions, read, mask):
    """float64 decoder over the concatenated rows [clean ; blocks] with a dense mask and positions."""
    dec = params["local_decoder"]
    cfg = config.decoder
    k = config.cross_attn_k
    slots = oracle.to_slots(oracle.dense(dec["patch_embedding_projection"], g), k)
    cross_mask = oracle.decoder_cross_mask(read, g.shape[1], k)
    h = np.concatenate([h_enc, x_blocks], axis=1)

    def self_attention(p, x):
        batch, length, _ = x.shape
        heads, kv_heads, hd = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        q = oracle.dense(p["wq"], x).reshape(batch, length, heads, hd)
        kk = oracle.dense(p["wk"], x).reshape(batch, length, kv_heads, hd)
        v = oracle.dense(p["wv"], x).reshape(batch, length, kv_heads, hd)
        out = np.zeros((batch, length, heads, hd))
        for b in range(batch):
            for hh in range(heads):
                kvh = hh // (heads // kv_heads)
                qh = oracle.rope(q[b, :, hh], positions[b], cfg.rope_theta)
                kh = oracle.rope(kk[b, :, kvh], positions[b], cfg.rope_theta)
                for i in range(length):
                    out[b, i, hh] = oracle._attend(qh[i], kh, v[b, :, kvh], mask[b, i])
        return oracle.dense(p["wo"], out.reshape(batch, length, heads * hd))

    for i in range(cfg.n_layers):
        if i == 0 or cfg.cross_attn_all_layers:
            c = dec[f"cross_attn_layers_{i}"]
            h = 2.0 * h + oracle.cross_attention(c, h, slots, cross_mask, cfg.cross_heads, cfg.norm_eps)
        p = dec[f"layers_{i}"]
        h = h + self_attention(p["attention"], oracle.rms_norm(p["attention_norm"], h, cfg.norm_eps))
        h = h + oracle.feed_forward(p["feed_forward"], oracle.rms_norm(p["ffn_norm"], h, cfg.norm_eps))
    return oracle.dense(dec["output"], oracle.rms_norm(dec["norm"], h, cfg.norm_eps))


# Compiled once per worker and shared by the tests below (jit caches on the static config and chunk
# size): the forward test's ("xla", None, None) case, the leakage test and the loss-by-hand test all
# run CFG's unchunked forward, and the gradient test and the fused-tiles test both need CFG's loss
# gradient. A BLT-D forward or gradient takes 10-20 s to compile on 2 busy cores; with the sharing,
# this file ran in 387 s instead of 669 s (one process, load ~15 on 2 cores, 2026-12-05). The
# "cudnn" programs are traced with the CPU stand-ins installed and stay cached here: only tests that
# install them may call these with attention_impl="cudnn".
_logits = jax.jit(blt_d_logits, static_argnums=(1, 5))


@functools.partial(jax.jit, static_argnums=(1, 2, 8))
def _loss_and_grad(params, config, obj, tokens, targets, mask, lengths, key, chunk_blocks=None):
    """((loss, metrics), gradient) of blt_d_loss: the float32 loss and metrics come with the gradient."""

    def loss(p):
        return D.blt_d_loss(p, config, obj, tokens, targets, mask, lengths, key, chunk_blocks)

    return jax.value_and_grad(loss, has_aux=True)(params)


def blocks_for(tokens, targets, mask, lengths, masked, config=CFG):
    layout = D.block_layout(jnp.asarray(lengths), tokens.shape[1], B)
    cells, valid = D.block_cells(layout, tokens, targets, mask, config.document_masking)
    return D.decoder_blocks(config, layout, jnp.asarray(tokens), cells, valid, jnp.asarray(masked) & valid)


# ---------------------------------------------------------------------------------------------------------
# Layout and masks.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("document_masking", [True, False])
def test_block_layout_and_cells_match_loops(document_masking):
    tokens, targets, mask, lengths = make_batch(1)
    starts, positions, cells, valid = naive_blocks(tokens, targets, mask, lengths, B, document_masking)
    # The case covers what it should: overlapping blocks, blocks past the row, padding slots.
    real = lengths[:, 1:] > 0
    assert (lengths[:, 1:][real] < B).any(), "some block must overlap the next patch"
    assert (positions[..., -1][real] > N).any(), "some block must run past the row"
    assert (~real).any(), "some patch slot must be padding"

    layout = D.block_layout(jnp.asarray(lengths), N, B)
    got_cells, got_valid = D.block_cells(layout, tokens, targets, mask, document_masking)
    np.testing.assert_array_equal(np.asarray(layout.starts)[real], starts[real])
    np.testing.assert_array_equal(np.asarray(layout.positions)[real], positions[real])
    np.testing.assert_array_equal(
        np.asarray(layout.read_patch), np.broadcast_to(np.arange(P - 1), (2, P - 1))
    )
    np.testing.assert_array_equal(np.asarray(got_valid), valid)
    np.testing.assert_array_equal(np.asarray(got_cells), cells)


@pytest.mark.parametrize("window", [WINDOW, 3, None])
def test_decoder_mask_matches_loops(window):
    tokens, targets, mask, lengths = make_batch(2)
    starts, positions, _, valid = naive_blocks(tokens, targets, mask, lengths, B)
    expected = naive_full_mask(tokens, starts, positions, valid, window)

    layout = D.block_layout(jnp.asarray(lengths), N, B)
    _, got_valid = D.block_cells(layout, tokens, targets, mask)
    start, ctx = D.context_mask(layout, jnp.asarray(tokens), window)
    assert ctx.shape[-1] == (N if window is None else window - 1)
    own = D.self_mask(got_valid)
    clean = jnp.asarray(oracle.local_self_mask(tokens, window, True))
    got = np.asarray(D.decoder_mask(clean, start, ctx, own))
    # The contract covers the rows of real cells (padding cells are never attended nor scored).
    rows = np.concatenate([np.ones((2, N), bool), valid.reshape(2, -1)], axis=1)
    assert rows[:, N:].sum() > 10
    for b in range(2):
        np.testing.assert_array_equal(got[b][rows[b]], expected[b][rows[b]])
    # No block row sees a clean row at or after its block's start, nor another block.
    for b in range(2):
        for q in range(P - 1):
            for k in range(B):
                if valid[b, q, k]:
                    row = got[b, N + q * B + k]
                    assert not row[starts[b, q] : N].any()
                    others = np.ones(P - 1, bool)
                    others[q] = False
                    assert not row[N:].reshape(P - 1, B)[others].any()


# ---------------------------------------------------------------------------------------------------------
# Forward.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "impl,chunk_blocks,max_len",
    [
        ("xla", None, None),
        ("xla", 2, 5),
        ("auto", 3, 2),
        ("cudnn", 2, 5),
        ("cudnn", 3, 2),
    ],
)
def test_forward_matches_dense_float64_decoder(impl, chunk_blocks, max_len, monkeypatch):
    """Clean rows on both attention paths; block rows in one chunk and in chunks of 2 or 3 blocks (7
    blocks: the last chunk is padded); with a patch-length bound the chunks read one shared key
    slice (patches are 1..5 long: a bound of 2 is broken, and on XLA those chunks take the gather
    path; the fused path has no fallback and returns NaN for the block rows).
    "cudnn": the fused path's layouts (packed documents; all tiles in one call of the attention
    core) with CPU stand-ins for the kernels (tests/fused_stand_in.py).

    Each case compiles its own forward (~18 s in the -n 2 suite), so cases that ran the same code
    on CPU were dropped: ("auto", 3, None) (auto is XLA on CPU: chunks of 3 through lax.map, gather
    path, padded last chunk) is all run by ("auto", 3, 2), whose broken bound sends two chunks to
    the gather path while the padded last one is tiled (asserted below); ("xla", None, 5) picked
    chunks of 1 (7 // 10 + 1) and ran the same lax.map / tiled branch as ("xla", 2, 5)."""
    if impl == "cudnn":
        fused_stand_in.install(monkeypatch)
    tokens, targets, mask, lengths = make_batch(3)
    params = init_params()
    masked = np.random.default_rng(4).random((2, P - 1, B)) < 0.5
    blocks = blocks_for(tokens, targets, mask, lengths, masked)
    config = CFG.replace(attention_impl=impl, patcher=PatcherConfig(mode="static", max_patch_length=max_len))
    clean, block = _logits(params, config, tokens, lengths, blocks, chunk_blocks)
    if max_len == 2:  # tiles of 3 blocks read C + 4 keys: the chunks take both branches of the cond
        start, seen = np.asarray(blocks.context_start), np.asarray(blocks.context_mask).any(axis=(-2, -1))
        fits = [
            bool(np.all((start[:, c : c + 3] - start[:, c : c + 1] <= 4) | ~seen[:, c : c + 3]))
            for c in range(0, P - 1, 3)
        ]
        assert fits == [False, False, True], fits

    p64 = jax.tree.map(np.asarray, params)
    inter: dict = {}
    expected_clean = oracle.blt_forward(p64, CFG, tokens, lengths, inter)
    starts, positions, cells, valid = naive_blocks(tokens, targets, mask, lengths, B)
    shown = ~np.asarray(blocks.masked)
    emb = p64["local_encoder"]["tok_embeddings"]["embedding"].astype(np.float64)[cells]
    mask_vec = p64["local_decoder"]["mask_embedding"].astype(np.float64)
    x_blocks = np.where(shown[..., None], emb, mask_vec).reshape(2, -1, CFG.decoder.dim)
    pos = np.concatenate([np.broadcast_to(np.arange(N), (2, N)), positions.reshape(2, -1)], axis=1)
    read = np.concatenate(
        [oracle.decoder_patch_ids(lengths, N), np.repeat(np.arange(P - 1)[None], 2, 0).repeat(B, 1)], axis=1
    )
    full = naive_full_mask(tokens, starts, positions, valid, WINDOW)
    out = naive_decoder(p64, CFG, inter["encoder_hidden"], inter["global_hidden"], x_blocks, pos, read, full)

    np.testing.assert_allclose(np.asarray(clean), expected_clean, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(clean), out[:, :N], atol=1e-4, rtol=0)
    if impl == "cudnn" and max_len < lengths[:, :-1].max():
        assert np.isnan(np.asarray(block)).all()
        with pytest.raises(ValueError, match="max_patch_length=2"):  # concrete lengths: checked
            blt_d_logits(params, config, tokens, lengths, blocks, chunk_blocks)
        return
    got = np.asarray(block)[valid]
    np.testing.assert_allclose(got, out[:, N:].reshape(2, P - 1, B, -1)[valid], atol=1e-4, rtol=0)


def test_no_leakage_from_bytes_at_or_after_block_start():
    """Rewriting every clean byte from a block's start on leaves that block's logits unchanged."""
    tokens, targets, mask, lengths = make_batch(5)
    params = init_params(seed=1)
    masked = np.random.default_rng(6).random((2, P - 1, B)) < 0.5
    blocks = blocks_for(tokens, targets, mask, lengths, masked)
    _, _, _, valid = naive_blocks(tokens, targets, mask, lengths, B)

    def run(params, config, tokens, lengths, blocks):
        return _logits(params, config, tokens, lengths, blocks, None)

    _, base = run(params, CFG, tokens, lengths, blocks)
    starts = np.asarray(blocks.positions)[..., 0]
    rng = np.random.default_rng(7)
    checked = 0
    for b in range(2):
        for q in range(P - 1):
            s = int(starts[b, q])
            if lengths[b, q + 1] == 0 or s >= N or not valid[b, q].any():
                continue
            changed = tokens.copy()
            changed[b, s:] = rng.integers(4, 260, N - s)
            _, after = run(params, CFG, changed, lengths, blocks)
            np.testing.assert_allclose(np.asarray(after)[b, q], np.asarray(base)[b, q], atol=1e-6, rtol=0)
            checked += 1
            # The test has teeth: the byte just before the block does reach it.
            before = tokens.copy()
            before[b, s - 1] = 4 + (int(tokens[b, s - 1]) + 77) % 256
            _, moved = run(params, CFG, before, lengths, blocks)
            assert float(np.abs(np.asarray(moved)[b, q] - np.asarray(base)[b, q]).max()) > 1e-4
    assert checked >= 6


# ---------------------------------------------------------------------------------------------------------
# Loss.
# ---------------------------------------------------------------------------------------------------------


@jax.jit
def _plain_loss_and_grad(params, tokens, targets, mask, lengths):
    """Plain BLT's next-byte loss and gradient: the same program for both normalizations below."""

    def plain(p):
        logits = BLT(CFG).apply({"params": p}, tokens, lengths)
        return next_byte_loss(logits, targets, mask)

    return jax.value_and_grad(plain, has_aux=True)(params)


@pytest.mark.parametrize("normalization", ["sum", "mean"])
def test_zero_diffusion_weight_is_next_byte_loss(normalization):
    tokens, targets, mask, lengths = make_batch(8)
    params = init_params(seed=2)
    obj = D.ObjectiveConfig(kind="blt_d", block_size=B, diffusion_weight=0.0, normalization=normalization)

    # Both programs take the batch as arguments (neither folds it in as constants).
    (loss, metrics), grads = _loss_and_grad(
        params, CFG, obj, tokens, targets, mask, lengths, jax.random.key(3), None
    )
    (ref, _), ref_grads = _plain_loss_and_grad(params, tokens, targets, mask, lengths)
    assert metrics["masked_cells"] > 0 and metrics["diffusion_loss"] > 0  # the block path did run
    assert float(loss) == float(ref)  # the clean rows run BLT's own code: bitwise the same loss
    assert float(metrics["next_byte_loss"]) == float(ref)
    mask_grad = grads["local_decoder"].pop("mask_embedding")
    assert not np.any(np.asarray(mask_grad))
    ref_grads["local_decoder"].pop("mask_embedding")
    for (path, g), r in zip(
        jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads), strict=True
    ):
        # Bitwise equal on jax 0.10.2 / CPU; allowed to differ by float32 summation order, which
        # another XLA may pick differently in the two programs.
        scale = float(np.abs(np.asarray(r)).max())
        np.testing.assert_allclose(
            np.asarray(g), np.asarray(r), rtol=1e-6, atol=1e-6 * scale, err_msg=str(path)
        )


def test_masked_terms_by_hand():
    rng = np.random.default_rng(9)
    logits = rng.normal(size=(2, 2, 3, 5)).astype(np.float32)
    cells = rng.integers(0, 5, (2, 2, 3)).astype(np.int32)
    masked = np.array([[[1, 0, 1], [0, 0, 1]], [[1, 1, 1], [0, 0, 0]]], bool)
    t = np.array([0.5, 0.25], np.float32)
    got = D.masked_diffusion_terms(
        jnp.asarray(logits), jnp.asarray(cells), jnp.asarray(masked), jnp.asarray(t)
    )
    weighted = nll_sum = correct = count = 0.0
    for b in range(2):
        for q in range(2):
            for k in range(3):
                if masked[b, q, k]:
                    row = logits[b, q, k].astype(np.float64)
                    nll = -(row[cells[b, q, k]] - math.log(np.exp(row).sum()))
                    weighted += nll / t[b]
                    nll_sum += nll
                    correct += float(np.argmax(row) == cells[b, q, k])
                    count += 1
    assert count == 6
    assert float(got["count"]) == count
    assert float(got["weighted_nll"]) == pytest.approx(weighted, rel=1e-5)
    assert float(got["nll"]) == pytest.approx(nll_sum, rel=1e-5)
    assert float(got["correct"]) == correct


@pytest.mark.parametrize("normalization", ["sum", "mean"])
def test_loss_by_hand_from_logits(normalization):
    """blt_d_loss == the paper's terms rebuilt by loops from the same noise and logits."""
    tokens, targets, mask, lengths = make_batch(10)
    params = init_params(seed=3)
    obj = D.ObjectiveConfig(
        kind="blt_d", block_size=B, diffusion_weight=1.3, next_byte_weight=0.7, normalization=normalization
    )
    rng = jax.random.key(11)
    loss, metrics = jax.jit(lambda p: D.blt_d_loss(p, CFG, obj, tokens, targets, mask, lengths, rng))(params)

    _, _, cells, valid = naive_blocks(tokens, targets, mask, lengths, B)
    t, masked = D.sample_noise(rng, jnp.asarray(valid), obj.noise_eps)  # the loss's own draw
    t, masked = np.asarray(t, np.float64), np.asarray(masked)
    blocks = blocks_for(tokens, targets, mask, lengths, masked)
    clean, block = _logits(params, CFG, tokens, lengths, blocks, None)
    clean, block = np.asarray(clean, np.float64), np.asarray(block, np.float64)

    def nll(row, target):
        return -(row[target] - math.log(np.exp(row - row.max()).sum()) - row.max())

    clean_sum = sum(nll(clean[b, i], targets[b, i]) for b in range(2) for i in range(N) if mask[b, i] > 0)
    n_clean = float(mask.sum())
    mask_sum, count = 0.0, 0
    for b in range(2):
        for q in range(P - 1):
            for k in range(B):
                assert not masked[b, q, k] or valid[b, q, k]
                if masked[b, q, k]:
                    mask_sum += nll(block[b, q, k], cells[b, q, k]) / t[b]
                    count += 1
    if normalization == "sum":
        expected = (0.7 * clean_sum + 1.3 * mask_sum) / n_clean
    else:
        expected = 0.7 * clean_sum / n_clean + 1.3 * mask_sum / valid.sum()
    assert count > 0
    assert float(metrics["masked_cells"]) == count
    assert float(metrics["block_cells"]) == valid.sum()
    assert float(metrics["noise_t"]) == pytest.approx(t.mean(), rel=1e-6)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(metrics["next_byte_loss"]) == pytest.approx(clean_sum / n_clean, rel=1e-5)


def test_sample_noise_rate_and_range():
    valid = jnp.ones((4, 100, 100), bool).at[:, :, 90:].set(False)
    t, masked = D.sample_noise(jax.random.key(0), valid, 0.2)
    t, masked = np.asarray(t), np.asarray(masked)
    assert ((t >= 0.2) & (t < 1.0)).all() and len(set(t.tolist())) == 4
    assert not masked[:, :, 90:].any()
    np.testing.assert_allclose(masked[:, :, :90].mean(axis=(1, 2)), t, atol=0.02)


# ---------------------------------------------------------------------------------------------------------
# Config.
# ---------------------------------------------------------------------------------------------------------


def test_mask_embedding_only_when_enabled():
    plain = abstract_params(CFG.replace(mask_embedding=False))
    assert "mask_embedding" not in plain["local_decoder"]
    assert abstract_params(CFG)["local_decoder"]["mask_embedding"].shape == (CFG.decoder.dim,)
    with pytest.raises(ConfigError, match=r"model\.mask_embedding"):
        model_config_from_dict(dict(CFG.replace(mask_embedding="yes").to_dict()))


def test_objective_section_defaults_and_overrides():
    section = D.objective_section(kind="blt_d", block_size=8)
    assert isinstance(section, ml_collections.ConfigDict)
    cfg = D.objective_config(section, CFG)
    assert cfg == D.ObjectiveConfig(kind="blt_d", block_size=8)
    assert D.objective_config(None, CFG).kind == "next_byte"
    assert dataclasses.asdict(D.objective_config(D.objective_section(), CFG)) == dataclasses.asdict(
        D.ObjectiveConfig()
    )
    with pytest.raises(ConfigError, match=r"objective\.blocks"):
        D.objective_section(blocks=4)


@pytest.mark.parametrize(
    "change,key",
    [
        ({"kind": "mdlm"}, r"objective\.kind"),
        ({"block_size": 0}, r"objective\.block_size"),
        ({"block_size": WINDOW + 1}, r"objective\.block_size"),
        ({"block_size": 4.0}, r"objective\.block_size"),
        ({"noise_eps": 0.0}, r"objective\.noise_eps"),
        ({"noise_eps": 1.0}, r"objective\.noise_eps"),
        ({"diffusion_weight": -1.0}, r"objective\.diffusion_weight"),
        ({"next_byte_weight": True}, r"objective\.next_byte_weight"),
        ({"diffusion_weight": 0.0, "next_byte_weight": 0.0}, r"objective\.diffusion_weight"),
        ({"normalization": "token"}, r"objective\.normalization"),
        ({"steps": 3}, r"objective\.steps"),
    ],
)
def test_objective_config_errors_name_the_key(change, key):
    values = {**dataclasses.asdict(D.ObjectiveConfig(kind="blt_d")), **change}
    with pytest.raises(ConfigError, match=key):
        D.objective_config(values, CFG)


def test_blt_d_needs_the_mask_embedding():
    with pytest.raises(ConfigError, match=r"model\.mask_embedding"):
        D.objective_config({"kind": "blt_d"}, CFG.replace(mask_embedding=False))
    assert D.objective_config({"kind": "next_byte"}, CFG.replace(mask_embedding=False)).kind == "next_byte"


def test_gradients_reach_the_block_path_and_bf16_runs():
    tokens, targets, mask, lengths = make_batch(12)
    params = init_params(seed=4)
    obj = D.ObjectiveConfig(kind="blt_d", block_size=B)
    args = (tokens, targets, mask, lengths, jax.random.key(5))

    # The float32 loss and metrics come with the gradient (one compile fewer than a separate
    # forward: 42 s for this test in the -n 2 suite); the program is shared with the next test.
    (f32, m32), grad = _loss_and_grad(params, CFG, obj, *args, None)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grad))
    # Chunked block attention (checkpointed lax.map) and model.remat change memory, not values.
    _, chunked = _loss_and_grad(params, CFG.replace(remat=True), obj, *args, 2)
    for g, c in zip(jax.tree.leaves(grad), jax.tree.leaves(chunked), strict=True):
        np.testing.assert_allclose(np.asarray(c), np.asarray(g), rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(grad["local_decoder"]["mask_embedding"]).max()) > 0
    assert float(jnp.abs(grad["local_encoder"]["tok_embeddings"]["embedding"]).max()) > 0

    bf16, m16 = jax.jit(D.blt_d_loss, static_argnums=(1, 2))(
        params, CFG.replace(dtype="bfloat16"), obj, *args
    )
    assert np.isfinite(float(bf16)) and np.isfinite(float(f32))
    assert abs(float(m16["diffusion_loss"]) - float(m32["diffusion_loss"])) < 0.1 * float(
        m32["diffusion_loss"]
    )


@pytest.mark.parametrize("chunk_blocks", [2])
def test_fused_tiles_gradient_matches_gather_path(chunk_blocks, monkeypatch):
    """The one-call tiles (overlapping key slices, their gradient summed by lookup.add_windows)
    against the XLA gather path without a patch bound: same loss gradient. Patches of 1..5 bytes
    with a bound of 5: every tile of 1 or 2 blocks fits its span (3 would not be tiled)."""
    fused_stand_in.install(monkeypatch)
    tokens, targets, mask, lengths = make_batch(13)
    params = init_params(seed=6)
    obj = D.ObjectiveConfig(kind="blt_d", block_size=B)
    tiled = CFG.replace(attention_impl="cudnn", patcher=PatcherConfig(mode="static", max_patch_length=5))

    def grad(config, chunks):
        return _loss_and_grad(params, config, obj, tokens, targets, mask, lengths, jax.random.key(2), chunks)[
            1
        ]

    # want: the same compiled program as the previous test's float32 gradient (same config, shapes).
    got, want = grad(tiled, chunk_blocks), grad(CFG, None)
    for path, g in jax.tree_util.tree_leaves_with_path(got):
        ref = want
        for key in path:
            ref = ref[key.key]
        np.testing.assert_allclose(np.asarray(g), np.asarray(ref), rtol=2e-4, atol=2e-6, err_msg=str(path))


@pytest.mark.slow
def test_range_kernel_gradient_matches_gather_path(monkeypatch):
    """block_rows.GPU_RANGE_KERNEL, cross_attention.GPU_CROSS_RANGES and attention.GPU_SELF_RANGES in
    a GPU step (traced for the GPU, the kernels interpreted): the block rows' context on
    fastblt.model.range_attention with their own block's cells as its second key set
    (block_rows.OWN_BLOCK_IN_KERNEL, the default; the merged form is checked alone in
    test_ranged_block_attention_is_the_xla_block_attention), the decoder's cross-attention (clean and
    block rows) as key ranges of the patch slots, the encoder's as runs of bytes, and the local
    stacks' windowed self-attention within documents, against the XLA path: the same loss and
    gradients, with documents, a window, random patch lengths and padding cells (the fused stand-in
    runs the clean rows' self-attention)."""
    from fastblt.model import attention as attn_lib
    from fastblt.model import block_rows, range_attention
    from fastblt.model import cross_attention as cross

    fused_stand_in.install(monkeypatch)
    monkeypatch.setattr(block_rows, "GPU_RANGE_KERNEL", True)
    monkeypatch.setattr(cross, "GPU_CROSS_RANGES", True)
    monkeypatch.setattr(attn_lib, "GPU_SELF_RANGES", True)
    monkeypatch.setattr(range_attention, "on_one_device", lambda: True)  # the suite's CPU has 8
    calls = {"blocks": 0, "latent": 0, "segment": 0, "local": 0}
    real_blocks, real_latent = block_rows.ranged_block_attention, cross.latent_ranges
    real_segment = cross.segment_ranges

    def count(name, fn):
        def counted(*a):
            calls[name] += 1
            return fn(*a)

        return counted

    monkeypatch.setattr(block_rows, "ranged_block_attention", count("blocks", real_blocks))
    monkeypatch.setattr(cross, "latent_ranges", count("latent", real_latent))
    monkeypatch.setattr(cross, "segment_ranges", count("segment", real_segment))
    monkeypatch.setattr(range_attention, "local_ranges", count("local", range_attention.local_ranges))
    tokens, targets, mask, lengths = make_batch(13)
    # The kernel's head dim is a power of two >= 16: two heads of 16 (the decoder's sharing one kv head).
    config = CFG.replace(
        encoder=dataclasses.replace(CFG.encoder, n_heads=2),
        decoder=dataclasses.replace(CFG.decoder, n_heads=2, n_kv_heads=1),
    )
    params = init_params(config, seed=6)
    obj = D.ObjectiveConfig(kind="blt_d", block_size=B)
    ranged = config.replace(attention_impl="cudnn", patcher=PatcherConfig(mode="static", max_patch_length=5))
    args = (tokens, targets, mask, lengths, jax.random.key(2))
    with attn_lib.target_platform("gpu"):
        (loss, _), got = _loss_and_grad(params, ranged, obj, *args)
        # Traced once per layer: block rows' self-attention and both streams' cross-attention in the
        # decoder's two layers, the encoder's one cross-attention, the clean rows' self-attention in
        # the encoder's and the decoder's layers (the global model's head dim, 12, is not the kernel's).
        want_calls = {"blocks": 2, "latent": 4, "segment": 1, "local": 3}
        assert calls == want_calls, calls
        monkeypatch.setattr(range_attention, "on_one_device", lambda: False)
        jax.eval_shape(lambda p: _loss_and_grad(p, ranged, obj, *args), params)  # several devices
        assert calls == want_calls, calls  # several devices: the tiles, gathers and cuDNN instead
    (want_loss, _), want = _loss_and_grad(params, config, obj, *args)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
    for path, g in jax.tree_util.tree_leaves_with_path(got):
        ref = want
        for key in path:
            ref = ref[key.key]
        np.testing.assert_allclose(np.asarray(g), np.asarray(ref), rtol=2e-4, atol=2e-6, err_msg=str(path))


@pytest.mark.parametrize("blocks,cells", [(7, 4), (3, 16)])
def test_own_block_attention_matches_a_dense_oracle(blocks, cells):
    """own_block_cells against one dense masked softmax over all R rows: outputs, log-sum-exps, and
    (jax.grad) the gradients of q, k and v against the dense form's; a cell that sees no cell gives 0
    and _NEG."""
    from fastblt.model import block_rows

    rng = np.random.default_rng(blocks)
    b, h, kvh, d = 2, 4, 2, 8
    r = blocks * cells
    q = jnp.asarray(rng.normal(size=(b, r, h, d)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, r, kvh, d)), jnp.float32) for _ in range(2))
    self_mask = rng.random((b, blocks, cells, cells)) < 0.5
    self_mask[0, 0, 1] = False  # a cell that sees nothing
    dense = np.zeros((b, r, r), bool)  # [b, query row, key row]
    for x in range(blocks):
        dense[:, x * cells : (x + 1) * cells, x * cells : (x + 1) * cells] = self_mask[:, x]

    def oracle(q, k, v):
        kk, vv = (jnp.repeat(t, h // kvh, axis=2) for t in (k, v))
        s = jnp.einsum("bihd,bjhd->bhij", q, kk) / np.sqrt(d)
        m = jnp.asarray(dense)[:, None]
        s = jnp.where(m, s, -1e30)  # masked scores out before exp: no inf, no NaN gradient
        top = jnp.max(s, -1, keepdims=True)
        e = jnp.where(m, jnp.exp(s - top), 0.0)
        den = e.sum(-1)
        out = jnp.einsum("bhij,bjhd->bihd", e / jnp.where(den > 0, den, 1.0)[..., None], vv)
        lse = jnp.where(den > 0, jnp.log(jnp.where(den > 0, den, 1.0)) + top[..., 0], -1e30)
        return out, jnp.moveaxis(lse, 1, 2)

    # Jitted: op by op the two cases took 5.6 s of small compiles, jitted 1.0 s.
    want_out, want_lse = jax.jit(oracle)(q, k, v)
    assert float(want_lse[0, 1, 0]) == np.float32(-1e30) and not np.asarray(want_out[0, 1]).any()

    def loss(fn):
        def f(q, k, v):
            out, lse = fn(q, k, v)
            return jnp.sum(out * jnp.cos(out)) + jnp.sum(jnp.where(lse > -1e29, jnp.sin(lse), 0.0))

        return f

    want_grad = jax.jit(jax.grad(loss(oracle), argnums=(0, 1, 2)))(q, k, v)
    mask = jnp.asarray(self_mask)
    out, lse = jax.jit(block_rows.own_block_cells)(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(want_lse), rtol=1e-5, atol=1e-6)
    got = jax.jit(
        jax.grad(loss(lambda q, k, v: block_rows.own_block_cells(q, k, v, mask)), argnums=(0, 1, 2))
    )(q, k, v)
    for g, w in zip(got, want_grad, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("own_in_kernel,tile", [(False, None), (True, None), (True, 16)])
def test_ranged_block_attention_is_the_xla_block_attention(own_in_kernel, tile, monkeypatch):
    """ranged_block_attention (each cell's context range on the key-range kernel, interpreted, and its
    own block's cells merged by log-sum-exp, or with OWN_BLOCK_IN_KERNEL as the kernel's second key
    set in one softmax) against block_attention's XLA path (gathered context and own block scores,
    one softmax): outputs, and the gradients of the block rows' q, k, v and the clean rows' k, v;
    documents, padding cells, cells that see only their own block and cells that see nothing; with
    tiles of 16, the 28 block rows span two query tiles and their own cells two key tiles."""
    from fastblt.model import block_rows, range_attention

    monkeypatch.setattr(block_rows, "OWN_BLOCK_IN_KERNEL", own_in_kernel)
    if tile:
        for name in ("BLOCK_Q", "BLOCK_K", "BLOCK_Q_DKV"):
            monkeypatch.setattr(range_attention, name, tile)

    tokens, targets, mask, lengths = make_batch(5)
    masked = np.random.default_rng(6).random((2, P - 1, B)) < 0.5
    blocks = blocks_for(tokens, targets, mask, lengths, masked)
    own = np.asarray(blocks.self_mask).any(-1)  # [b, K, B]
    context = np.asarray(blocks.context_mask).copy()
    context[0, 1] = False  # block 1 of row 0 sees only its own cells
    empty = np.argwhere(~own.any(-1))[0]  # a padding block (no real cell) sees nothing at all
    context[tuple(empty)] = False
    seen = context.any(-1)
    assert (~seen & own).any() and (~seen & ~own).any() and (seen & own).any()
    rng = np.random.default_rng(1)
    r, h, kvh, d = (P - 1) * B, 4, 2, 16
    q = jnp.asarray(rng.normal(size=(2, r, h, d)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, r, kvh, d)), jnp.float32) for _ in range(2))
    kc, vc = (jnp.asarray(rng.normal(size=(2, N, kvh, d)), jnp.float32) for _ in range(2))
    w = jnp.asarray(rng.normal(size=(2, r, h, d)), jnp.float32)
    masks = (blocks.context_start, jnp.asarray(context), blocks.self_mask)

    def ranged(*args):
        return jnp.sum(block_rows.ranged_block_attention(*args, *masks, interpret=True) * w)

    def xla(*args):
        return jnp.sum(block_rows.block_attention(*args, *masks, impl="xla") * w)

    args = (q, k, v, kc, vc)
    got = block_rows.ranged_block_attention(*args, *masks, interpret=True)
    want = block_rows.block_attention(*args, *masks, impl="xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    for name, g, w_ in zip(
        ("q", "k", "v", "k_ctx", "v_ctx"),
        jax.grad(ranged, argnums=range(5))(*args),
        jax.grad(xla, argnums=range(5))(*args),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w_), rtol=1e-4, atol=1e-5, err_msg=name)


def test_context_ranges_and_a_mask_that_is_not_one(monkeypatch):
    """context_ranges against a loop over cells; a context mask with a gap is flagged, and the ranged
    attention then returns NaN rather than attend the gap; with OWN_BLOCK_IN_KERNEL, so does an own
    block mask with a gap."""
    from fastblt.model import block_rows

    tokens, targets, mask, lengths = make_batch(3)
    masked = np.random.default_rng(4).random((2, P - 1, B)) < 0.5
    blocks = blocks_for(tokens, targets, mask, lengths, masked)
    start, cm = np.asarray(blocks.context_start), np.asarray(blocks.context_mask)
    lo, hi, ok = block_rows.context_ranges(blocks.context_start, blocks.context_mask)
    assert bool(ok)
    for b_, q, i in np.ndindex(cm.shape[:3]):
        rows = start[b_, q] + np.flatnonzero(cm[b_, q, i])
        want = (rows.min(), rows.max() + 1) if rows.size else (0, 0)
        assert (int(lo[b_, q, i]), int(hi[b_, q, i])) == want, (b_, q, i)
    assert (np.asarray(hi) - np.asarray(lo) >= 3).any()

    seen = np.argwhere(cm.sum(-1) >= 3)[0]
    gap = cm.copy()
    gap[tuple(seen)][np.flatnonzero(cm[tuple(seen)])[1]] = False
    assert not bool(block_rows.context_ranges(blocks.context_start, jnp.asarray(gap))[2])
    rng = np.random.default_rng(0)
    r, h, d = (P - 1) * B, 2, 16
    q, k, v = (jnp.asarray(rng.normal(size=(2, r, h, d)), jnp.float32) for _ in range(3))
    kc, vc = (jnp.asarray(rng.normal(size=(2, N, h, d)), jnp.float32) for _ in range(2))
    out = block_rows.ranged_block_attention(
        q, k, v, kc, vc, blocks.context_start, jnp.asarray(gap), blocks.self_mask, interpret=True
    )
    assert np.isnan(np.asarray(out)).all()
    # The same for a cell whose own block's visible cells have a gap (a loss mask with a hole inside
    # a block): the kernel reads one range of them.
    monkeypatch.setattr(block_rows, "OWN_BLOCK_IN_KERNEL", True)
    own_gap = np.asarray(blocks.self_mask).copy()
    own_gap[0, 0, 0, :3] = (True, False, True)
    assert not bool(block_rows.context_ranges(blocks.context_start, jnp.asarray(own_gap))[2])
    out = block_rows.ranged_block_attention(
        q, k, v, kc, vc, blocks.context_start, blocks.context_mask, jnp.asarray(own_gap), interpret=True
    )
    assert np.isnan(np.asarray(out)).all()
