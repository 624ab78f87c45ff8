"""BLT-D / BLT-DV generation (fastblt.sampler.unmasking) against independent oracles.

* blt_d: a naive Python loop that, for every decoder pass, runs the non-cached BLT-D forward
  (``fastblt.model.blt.blt_d_logits``) on the whole prefix with one appended block (masked cells
  marked) and applies the reveal rule written with NumPy loops; greedy outputs must be equal.
* blt_dv: greedy output byte-identical to greedy ``ar`` decoding of the same model.
Tiny random-init BLT-D models (``mask_embedding`` on).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

try:
    from test_sampler_support import model, random_prompts
except ImportError:  # pragma: no cover - when tests/ is a package
    from tests.test_sampler_support import model, random_prompts

from fastblt.evaluation import parse_settings, plan
from fastblt.model import BLT
from fastblt.model.block_rows import DecoderBlocks
from fastblt.model.blt import blt_d_logits
from fastblt.sampler import encode_prompts, generate, rules
from fastblt.tokenizer import BOE, EOS

PAD = 64  # the oracle's one compiled shape; also the sampler's buffer
SHAPES = dict(buffer_bytes=PAD, prefill_chunk=4)


@functools.lru_cache(maxsize=4)
def d_model(name: str):
    config, params = model(name)
    config = config.replace(mask_embedding=True)
    params = jax.tree.map(lambda x: x, params)
    rng = np.random.default_rng(7)
    params["local_decoder"] = dict(params["local_decoder"])
    params["local_decoder"]["mask_embedding"] = jnp.asarray(
        rng.standard_normal(config.decoder.dim), jnp.float32
    )
    return config, params


def _with_global_output(fn, edit):
    """Runs ``fn()`` with the global transformer's output [b, P, D_g] passed through ``edit``."""

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and context.module.name == "global_transformer":
            return edit(out)
        return out

    with nn.intercept_methods(interceptor):
        return fn()


@functools.lru_cache(maxsize=4)
def _oracle_fns(config):
    def closed_latent(params, tokens, lengths, q):
        """Global output of patch ``q`` under patch ``lengths`` (the prefix's last patch closed)."""
        got = []
        _with_global_output(
            lambda: BLT(config).apply({"params": params}, tokens, lengths), lambda g: got.append(g) or g
        )
        return got[0][:, q]

    def block_logits(params, tokens, lengths, blocks, latent):
        """Block logits of the full BLT-D forward (clean rows patched as ``lengths``); the block
        reads patch slot P - 1, whose global output is replaced by ``latent``."""
        return _with_global_output(
            lambda: blt_d_logits(params, config, tokens, lengths, blocks),
            lambda g: g.at[:, -1].set(latent),
        )[1][0, 0]

    def patch_lengths(params, tokens):
        return BLT(config).apply({"params": params}, tokens, method=BLT.patch).lengths

    return jax.jit(closed_latent), jax.jit(block_logits), jax.jit(patch_lengths)


def np_reveal(logits, masked, rule, alpha, gamma):
    """The reveal rule with loops (logits float[B, V], masked bool[B]) -> list of cells to reveal."""
    x = np.asarray(logits, np.float64)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    cells = [j for j in range(len(masked)) if masked[j]]
    if rule == "one_step":
        return cells
    if rule == "leftmost":  # the rule test_a_rule_is_one_registry_entry adds
        return cells[:1]
    if rule == "alpha":
        conf = {j: p[j].max() for j in cells}
        out = [j for j in cells if conf[j] >= alpha]
        return out or [max(cells, key=lambda j: conf[j])]
    ent = {j: float(-(p[j] * np.log(np.maximum(p[j], 1e-300))).sum()) for j in cells}
    out, total = [], 0.0
    for j in sorted(cells, key=lambda j: ent[j]):
        total += ent[j]
        if total > gamma:
            break
        out.append(j)
    return out or [min(cells, key=lambda j: ent[j])]


def naive_blt_d(
    params, config, prompt, max_new, block, rule, alpha=0.7, gamma=0.0, anchor="forced", stats=None
):
    """Greedy BLT-D, every decoder pass a full non-cached forward over prefix + block.

    anchor="patch": where the patching of the row leaves the prefix's last patch open (no patch
    starts at byte n) and it holds fewer than ``block`` bytes and no EOS, the block starts at that
    patch's first byte, its known bytes given as cells, and reads the latent of the patch before
    it under the row's own patching (as a training block at that patch start would). ``stats``
    (a dict) receives the blocks run and how many of them started before byte n."""
    closed_latent, fwd, patch_lengths = _oracle_fns(config)
    seq = [int(t) for t in prompt]
    out = []
    window = config.decoder.window
    while len(out) < max_new:
        n = len(seq)
        tokens = np.full((1, PAD), BOE, np.int32)
        tokens[0, :n] = seq
        lengths = np.asarray(patch_lengths(params, jnp.asarray(tokens)))[0]
        assert lengths[-1] == 0, "the oracle needs a free patch slot"
        starts = np.cumsum(lengths) - lengths
        # Algorithm 1 re-patches the prefix alone, so its last patch (the one holding byte n - 1)
        # ends at n - 1; the block reads that patch's latent, o_M. Clean rows keep the patching of
        # the whole row (the cached prefix, as BLT generated it).
        q = int(np.sum((starts <= n - 1) & (lengths > 0))) - 1
        s = n  # the block's first position
        is_open = not np.any((starts == n) & (lengths > 0))
        if anchor == "patch" and is_open and n - starts[q] < block and EOS not in seq[starts[q] : n]:
            s = int(starts[q])
            if stats is not None:
                stats["back"] = stats.get("back", 0) + 1
            latent = closed_latent(params, jnp.asarray(tokens), jnp.asarray(lengths)[None], q - 1)
        else:
            closed = lengths.copy()
            closed[q] = n - starts[q]
            closed[q + 1] = PAD + 1 - n
            closed[q + 2 :] = 0
            latent = closed_latent(params, jnp.asarray(tokens), jnp.asarray(closed)[None], q)
        docs = np.cumsum(tokens[0] == EOS) - (tokens[0] == EOS)
        positions = s + np.arange(block)
        ctx = np.zeros((block, PAD), bool)
        for j in range(block):
            for c in range(s):
                ok = window is None or positions[j] - c < window
                ok &= (not config.document_masking) or docs[c] == docs[s - 1]
                ctx[j, c] = ok
        cells = np.zeros(block, np.int32)
        cells[: n - s] = seq[s:n]
        masked = np.arange(block) >= n - s
        while masked.any():
            blocks = DecoderBlocks(
                tokens=jnp.asarray(cells)[None, None],
                masked=jnp.asarray(masked)[None, None],
                positions=jnp.asarray(positions, jnp.int32)[None, None],
                read_patch=jnp.asarray([[len(lengths) - 1]], jnp.int32),
                context_start=jnp.zeros((1, 1), jnp.int32),
                context_mask=jnp.asarray(ctx)[None, None],
                self_mask=jnp.ones((1, 1, block, block), bool),
            )
            lg = np.asarray(fwd(params, jnp.asarray(tokens), jnp.asarray(lengths)[None], blocks, latent))
            for j in np_reveal(lg, masked, rule, alpha, gamma):
                cells[j] = int(np.argmax(lg[j]))
                masked[j] = False
        if stats is not None:
            stats["blocks"] = stats.get("blocks", 0) + 1
        for x in cells[n - s :]:
            if len(out) < max_new:
                out.append(int(x))
                seq.append(int(x))
        if EOS in out:
            out = out[: out.index(EOS) + 1]
            break
    return np.asarray(out, np.int32)


@pytest.mark.parametrize(
    "name,block,kw,rule",
    [
        ("base", 4, dict(alpha=0.2), "alpha"),
        ("variant", 3, dict(gamma=2.0), "gamma"),
        ("base", 4, dict(one_step=True), "one_step"),
        ("base", 4, dict(one_step=True, anchor="patch"), "one_step"),
        ("variant", 3, dict(alpha=0.2, anchor="patch"), "alpha"),
    ],
)
def test_blt_d_greedy_matches_naive_block_forward(name, block, kw, rule):
    config, params = d_model(name)
    prompts = random_prompts(1, [5, 11])
    max_new = 14
    res = generate(
        params, config, prompts, method="blt_d", block_size=block, max_bytes=max_new, **SHAPES, **kw
    )
    ids = encode_prompts(prompts)
    anchor = kw.get("anchor", "forced")
    c = res.counters
    for row, prompt in enumerate(ids):
        stats: dict = {}
        want = naive_blt_d(
            params,
            config,
            prompt,
            max_new,
            block,
            rule,
            kw.get("alpha", 0.7),
            kw.get("gamma", 0.0),
            anchor,
            stats,
        )
        np.testing.assert_array_equal(res.ids[row], want, err_msg=f"row {row}")
        assert c.rounds[row] == stats["blocks"], (row, c.rounds[row], stats)
        assert (stats.get("back", 0) > 0) == (anchor == "patch"), stats  # the anchor was exercised
    if anchor == "patch":
        return
    blocks = -(-c.generated // block)
    np.testing.assert_array_equal(c.rounds, blocks)
    np.testing.assert_array_equal(c.eg_passes, blocks)
    np.testing.assert_array_equal(c.clean_passes, blocks)  # each block's extend: one decoder pass
    assert np.all(c.decoder_passes >= blocks) and np.all(c.decoder_passes <= blocks * block)
    dec_read, _ = c.passes_read
    np.testing.assert_array_equal(dec_read, c.decoder_passes + blocks)
    if rule == "one_step":
        np.testing.assert_array_equal(c.decoder_passes, blocks)


@pytest.mark.parametrize(
    "name,block,kw",
    [
        ("base", 4, dict(alpha=0.3)),
        ("variant", 3, dict(one_step=True)),
        # No gamma case: blt_d and blt_dv share one block loop (unmasking.build_blt_d, verify=...)
        # and one rule function (rules.RULES), so a rule only changes which drafts the verifier sees;
        # gamma's reveal is checked against the naive oracle in the blt_d test above, the verifier
        # here with alpha and one_step. Its own blt_dv program cost ~17 s of the -n 2 suite.
        ("base", 4, dict(one_step=True, anchor="patch")),
    ],
)
def test_blt_dv_greedy_is_identical_to_ar(name, block, kw):
    """BLT-DV as the paper runs it: the AR byte, then a full block of B drafted bytes, verified; the
    output is ar's, and a round commits up to B + 1 bytes. With anchor="patch" a block holds the open
    patch's bytes (the AR byte among them), so a round drafts 1..B bytes."""
    config, params = d_model(name)
    prompts = random_prompts(2, [4, 9, 13])
    ar = generate(params, config, prompts, method="ar", max_bytes=20, **SHAPES)
    dv = generate(params, config, prompts, method="blt_dv", block_size=block, max_bytes=20, **SHAPES, **kw)
    for row in range(len(prompts)):
        np.testing.assert_array_equal(dv.ids[row], ar.ids[row], err_msg=f"row {row}")
    c = dv.counters
    if kw.get("anchor") == "patch":
        assert np.all(c.drafted <= c.rounds * block) and np.any(c.drafted < c.rounds * block)
        assert np.all(c.drafted >= c.rounds)
    else:
        np.testing.assert_array_equal(c.drafted, c.rounds * block)
    assert np.all(c.accepted <= c.drafted)
    # Each round commits its AR byte and its accepted drafts (the last round may be cut by the budget).
    assert np.all(c.generated <= c.rounds + c.accepted)
    assert np.all(c.generated >= np.minimum(c.rounds + c.accepted, 20) - block)
    assert np.all(c.eg_passes >= 1 + 2 * c.rounds) and np.all(c.eg_passes <= 1 + 3 * c.rounds)
    np.testing.assert_array_equal(c.paper_eg_passes, 1 + 2 * c.rounds)
    assert np.all(c.decoder_passes >= 1 + 3 * c.rounds)
    assert 0 <= c.acceptance_rate <= 1


def test_plain_blt_checkpoint_raises_clear_error():
    config, params = model("base")
    with pytest.raises(ValueError, match=r"model\.mask_embedding.*not trained with BLT-D"):
        generate(params, config, ["hi"], method="blt_d", max_bytes=4, **SHAPES)


def test_blt_d_sampling_is_seeded_per_row_and_tight_top_p_is_greedy():
    config, params = d_model("base")
    prompts = random_prompts(3, [6, 9, 4])
    kw = dict(method="blt_d", block_size=4, gamma=1.0, max_bytes=12, **SHAPES)
    greedy = generate(params, config, prompts, **kw)
    # top_p this small keeps only the most likely byte: sampling collapses to the argmax.
    tight = generate(params, config, prompts, temperature=1.0, top_p=1e-6, seed=5, **kw)
    for row in range(len(prompts)):
        np.testing.assert_array_equal(tight.ids[row], greedy.ids[row])
    a = generate(params, config, prompts, temperature=1.5, seed=1, **kw)
    again = generate(params, config, prompts, temperature=1.5, seed=1, **kw)
    other = generate(params, config, prompts, temperature=1.5, seed=2, **kw)
    for row in range(len(prompts)):
        np.testing.assert_array_equal(again.ids[row], a.ids[row])
    assert any(not np.array_equal(a.ids[r], other.ids[r]) for r in range(len(prompts)))
    assert any(not np.array_equal(a.ids[r], greedy.ids[r]) for r in range(len(prompts)))
    # Row 0's draws depend on its row index and positions only, not on the other rows.
    alone = generate(params, config, prompts[:1], temperature=1.5, seed=1, **kw)
    np.testing.assert_array_equal(alone.ids[0], a.ids[0])
    with pytest.raises(ValueError, match="blt_dv.*greedily"):
        generate(params, config, prompts, **{**kw, "method": "blt_dv", "gamma": None}, temperature=1.0)


def test_a_rule_is_one_registry_entry(monkeypatch):
    """Adding an unmasking rule is one entry of fastblt.sampler.rules.RULES: generate takes it by
    name and runs it (here: reveal the leftmost masked cell, checked against the naive oracle with
    the same rule), and fastblt eval offers it as a setting."""

    def leftmost(logits, masked, value):
        del logits, value
        return jnp.zeros_like(masked), jnp.argmax(masked, axis=-1)

    monkeypatch.setitem(rules.RULES, "leftmost", rules.Rule("leftmost", "the leftmost masked cell", leftmost))
    config, params = d_model("base")
    prompts = random_prompts(1, [5, 11])
    res = generate(
        params, config, prompts, method="blt_d", block_size=3, max_bytes=9, leftmost=True, **SHAPES
    )
    for row, prompt in enumerate(encode_prompts(prompts)):
        want = naive_blt_d(params, config, prompt, 9, 3, "leftmost")
        np.testing.assert_array_equal(res.ids[row], want, err_msg=f"row {row}")
    np.testing.assert_array_equal(res.counters.decoder_passes, res.counters.generated)  # one cell a pass
    assert plan(["blt_d"], parse_settings(["leftmost=true", "alpha=0.5"])) == [
        ("ar", {}),
        ("blt_d", {"alpha": 0.5}),
        ("blt_d", {"leftmost": True}),
    ]
    with pytest.raises(ValueError, match="give at most one of alpha, gamma, one_step, leftmost"):
        generate(params, config, prompts, method="blt_d", leftmost=True, alpha=0.5, **SHAPES)
    with pytest.raises(TypeError, match="unexpected keyword argument.*alpah"):
        generate(params, config, prompts, method="blt_d", alpah=0.5, **SHAPES)


@pytest.mark.parametrize(
    "anchor,buffer,lengths,max_new",
    [
        # The decoder's cache a ring of 19 slots (window 16 + 4 - 1), blocks that start inside the
        # committed prefix (forced blocks on a ring: test_block_logits_on_the_decode_kernel_...).
        ("patch", 64, [5, 11], 14),
        ("forced", 18, [3, 4], 8),  # a buffer shorter than the ring: the cache is the buffer
    ],
)
def test_blt_d_passes_on_the_decode_kernel_match_naive(monkeypatch, anchor, buffer, lengths, max_new):
    """Traced for a GPU with the decode kernel on (interpreted here), BLT-D's diffusion passes read
    the decoder's cache in place with the block's own keys beside it (decode_attention_extra, one
    call per layer and pass, no gather or concatenation); the greedy bytes are the naive block
    forward's."""
    from fastblt.model import attention as attn_lib
    from fastblt.model import decode_attention as decode_lib

    config, params = d_model("heads16")
    config = config.replace(attention_impl="auto")  # what a GPU run uses
    monkeypatch.setattr(attn_lib, "GPU_DECODE_KERNEL", "decode")
    calls = []
    real = decode_lib.decode_attention_extra
    monkeypatch.setattr(
        decode_lib, "decode_attention_extra", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    prompts = random_prompts(4, lengths)
    with attn_lib.target_platform("gpu"):
        res = generate(
            params,
            config,
            prompts,
            method="blt_d",
            block_size=4,
            max_bytes=max_new,
            buffer_bytes=buffer,
            prefill_chunk=4,
            alpha=0.2,
            anchor=anchor,
        )
    assert len(calls) == config.decoder.n_layers  # traced once per layer of the pass
    for row, prompt in enumerate(encode_prompts(prompts)):
        want = naive_blt_d(params, config, prompt, max_new, 4, "alpha", 0.2, 0.0, anchor, {})
        np.testing.assert_array_equal(res.ids[row], want, err_msg=f"row {row}")


@pytest.mark.parametrize("buffer,back", [(64, 0), (64, 2), (19, 0), (19, 2)])
def test_block_logits_on_the_decode_kernel_are_the_xla_paths(monkeypatch, buffer, back):
    """One diffusion pass after a prefill, its block starting at the prefix's end or ``back`` bytes
    inside it (anchor="patch"), on a ring (64-byte buffer: 19 slots) and on a cache that is the buffer
    (19 bytes): the logits with the cache read in place by the decode kernel (interpreted) are those
    of the XLA path, which gathers the window's rows and concatenates the block's keys."""
    from fastblt.model import attention as attn_lib
    from fastblt.model import decode_attention as decode_lib
    from fastblt.sampler.cached import Runner
    from fastblt.sampler.decoding import Prompts, prefill
    from fastblt.sampler.state import cache_slots, init_state
    from fastblt.sampler.unmasking import block_logits

    config, params = d_model("heads16")
    ids = encode_prompts(random_prompts(6, [9, 12]))
    prompt = np.zeros((2, buffer), np.int32)
    for i, x in enumerate(ids):
        prompt[i, : len(x)] = x
    lengths = jnp.array([len(x) for x in ids], jnp.int32)
    prompts = Prompts(jnp.asarray(prompt), lengths, jnp.full((2,), 8), jnp.asarray(True))
    rng = np.random.default_rng(2)
    cells = jnp.asarray(rng.integers(4, 200, (2, 4)), jnp.int32)
    masked = jnp.array([[False, True, True, True], [True, False, True, True]])
    monkeypatch.setattr(attn_lib, "GPU_DECODE_KERNEL", "decode")
    calls = []
    real = decode_lib.decode_attention_extra
    monkeypatch.setattr(
        decode_lib, "decode_attention_extra", lambda *a, **k: calls.append(1) or real(*a, **k)
    )

    def run(impl):
        cfg = config.replace(attention_impl=impl)

        @jax.jit
        def go(params):
            runner = Runner(cfg, params)
            st = init_state(cfg, 2, buffer, buffer + 1, ring_rows=4)
            st, _ = prefill(runner, st, prompts, 4)
            start = st.length - back
            return block_logits(runner, st, cells, masked, start, jnp.maximum(st.completed - 1, 0))

        return np.asarray(go(params))

    want = run("xla")
    assert not calls
    assert (cache_slots(init_state(config, 2, buffer, buffer + 1, ring_rows=4).dec_k) < buffer) == (
        buffer == 64
    )
    with attn_lib.target_platform("gpu"):
        got = run("auto")
    assert len(calls) == config.decoder.n_layers
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
