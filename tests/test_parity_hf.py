"""Parity of fastblt's BLT with the Hugging Face port (``transformers`` BltForCausalLM), fp32, CPU.

Random-init small HF models are converted with ``fastblt.io.huggingface.from_hf``; logits must agree
within 1e-4 for rows of 1..512 bytes, with patch lengths supplied to both sides and with each
side running its own entropy model + patcher. The HF port only runs with cross_attn_k=2; other
cases are covered against the naive oracle in test_model_vs_oracle.py.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fastblt.io import huggingface as convert  # noqa: E402
from fastblt.model import BLT  # noqa: E402

pytestmark = pytest.mark.parity

TOL = 1e-4
LENGTHS = (1, 2, 7, 64, 200, 512)


def _sub(h, layers, heads, inter, theta, **kw):
    return dict(
        hidden_size=h,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=inter,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
        **kw,
    )


# name: (enc all-layers cross, dec all-layers cross, hash functions, group sizes, De, Dg)
CASES = {
    "enc_last_dec_all_1fn": (False, True, 1, [3, 4, 5], 32, 64),
    "enc_all_dec_first_3fn": (True, False, 3, [4], 32, 64),
    "enc_all_dec_all_proj": (True, True, 1, [2, 3, 6, 8], 32, 48),
    "enc_last_dec_first_3fn_proj": (False, False, 3, [3, 5], 24, 40),
}


def _hf_model(case: str, seed: int = 0):
    enc_all, dec_all, fns, sizes, de, dg = CASES[case]
    torch.manual_seed(seed)
    local = dict(cross_attn_k=2, hidden_size_global=dg)
    cfg = transformers.BltConfig(
        vocab_size=260,
        patch_in_forward=True,
        patching_threshold=1.335442066192627,
        patch_size=4,
        cross_attn_k=2,
        encoder_hash_byte_group_size=sizes,
        encoder_hash_byte_group_vocab=257,
        encoder_hash_byte_group_nb_functions=fns,
        local_attention_window_len=512,
        encoder_config=_sub(de, 2 if enc_all else 1, 4, 64, 500000.0, cross_attn_all_layers=enc_all, **local),
        decoder_config=_sub(de, 2, 4, 64, 500000.0, cross_attn_all_layers=dec_all, **local),
        global_config=_sub(dg, 2, 4, 96, 500000.0),
        patcher_config=_sub(32, 2, 4, 64, 10000.0, sliding_window=512),
    )
    cfg._attn_implementation = "eager"
    model = transformers.BltForCausalLM(cfg).eval()
    with torch.no_grad():
        # Sharpen the random entropy model so that entropies spread over a wide range and the
        # patcher produces patches of many lengths instead of one byte each.
        model.model.patcher.lm_head.weight.mul_(40.0)
    return model


@pytest.fixture(scope="module", params=sorted(CASES))
def converted(request):
    model = _hf_model(request.param)
    config, params = convert.from_hf(model)
    return request.param, model, config, params


def _tokens(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    text = rng.choice(list(b"the quick brown fox jumps over a lazy dog, 0123456789. "), size=n - 1)
    return np.concatenate([[1], text.astype(np.int64) + 4])[None]


def _hf_logits(model, tokens, lengths=None):
    with torch.no_grad():
        kw = {} if lengths is None else {"patch_lengths": torch.tensor(lengths)}
        return model(torch.tensor(tokens), use_cache=False, **kw).logits.numpy()


def _jitted(config, method=None):
    """BLT(config).apply (or one of its methods) as one compiled program: run op by op, each new row
    length compiled ~240 primitives (10.7 of a call's 16 s on the 2-core dev machine, 2026-12-06),
    against one ~4 s compile of the whole forward."""
    blt = BLT(config)
    return jax.jit(functools.partial(blt.apply, method=method) if method else blt.apply)


def _threshold_between(entropies: np.ndarray) -> float:
    """A threshold in the widest gap among the middle entropies: no boundary flips on 1e-6 noise."""
    e = np.sort(entropies[1:])
    if e.size < 4:  # every byte starts a patch, including the unseen next one
        return float(e.min()) - 0.5 if e.size else 1.0
    lo, hi = e.size // 4, max(3 * e.size // 4, e.size // 4 + 1)
    gaps = np.diff(e[lo : hi + 1])
    i = int(np.argmax(gaps))
    return float((e[lo + i] + e[lo + i + 1]) / 2)


@pytest.mark.parametrize("n", LENGTHS)
def test_logits_with_supplied_patch_lengths(converted, n):
    _, model, config, params = converted
    tokens = _tokens(n, seed=n)
    with torch.no_grad():
        _, hf_lengths, _ = model.model.patcher(torch.tensor(tokens), patch_size=4, threshold=2.0)
    hf_lengths = hf_lengths.numpy()
    ref_lengths = hf_lengths.copy()
    ref_lengths[:, -1] += 1  # HF's trailing "next byte" patch is one shorter (sum N, not N + 1)
    assert len(set(hf_lengths[0].tolist())) > 1 or n < 8, "patching should vary"
    ours = _jitted(config)({"params": params}, jnp.asarray(tokens, jnp.int32), jnp.asarray(ref_lengths))
    np.testing.assert_allclose(np.asarray(ours), _hf_logits(model, tokens, hf_lengths), atol=TOL, rtol=0)


@pytest.mark.parametrize("n", LENGTHS)
def test_logits_with_own_patchers(converted, n):
    _, model, config, params = converted
    tokens = _tokens(n, seed=100 + n)
    with torch.no_grad():
        hf_entropies, _, _ = model.model.patcher(torch.tensor(tokens), patch_size=4, threshold=2.0)
    threshold = _threshold_between(hf_entropies.numpy()[0])
    config = config.replace(patcher=dataclasses.replace(config.patcher, threshold=threshold))
    ours = _jitted(config)({"params": params}, jnp.asarray(tokens, jnp.int32))
    saved, model.config.patching_threshold = model.config.patching_threshold, threshold
    try:
        expected_logits = _hf_logits(model, tokens)
    finally:
        model.config.patching_threshold = saved
    np.testing.assert_allclose(np.asarray(ours), expected_logits, atol=TOL, rtol=0)
    # Our patcher made the same boundaries as HF's (checked directly, not only through logits).
    with torch.no_grad():
        _, hf_lengths, _ = model.model.patcher(torch.tensor(tokens), patch_size=4, threshold=threshold)
    got = _jitted(config, BLT.patch)({"params": params}, jnp.asarray(tokens, jnp.int32))
    expected = hf_lengths.numpy()[0].copy()
    expected[-1] += 1
    count = int(got.count[0])
    np.testing.assert_array_equal(np.asarray(got.lengths[0, :count]), expected)


def test_entropy_model_logits_match(converted):
    _, model, config, params = converted
    tokens = _tokens(300, seed=7)
    with torch.no_grad():
        _, _, hf = model.model.patcher(torch.tensor(tokens), patch_size=4, threshold=2.0)
    from fastblt.model import EntropyModel

    ours = EntropyModel(config.entropy_model).apply(
        {"params": params["entropy_model"]}, jnp.asarray(tokens, jnp.int32)
    )
    np.testing.assert_allclose(np.asarray(ours), hf.numpy(), atol=TOL * 10, rtol=1e-5)


def test_round_trip_through_hf_directory(converted, tmp_path):
    _, model, config, params = converted
    out = tmp_path / "hf"
    convert.to_hf(config, params, str(out))
    reloaded = transformers.BltForCausalLM.from_pretrained(str(out)).eval()
    reloaded.config._attn_implementation = "eager"
    tokens = _tokens(90, seed=3)
    np.testing.assert_allclose(_hf_logits(reloaded, tokens), _hf_logits(model, tokens), atol=TOL, rtol=0)
    # And back: the directory converts to the same fastblt params.
    config2, params2 = convert.from_hf(str(out))
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params2, params)
