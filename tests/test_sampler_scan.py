"""Scanned layers in the sampler (``model.scan_decode_layers``): the entropy model's, the global model's and
the decoder's layers run as one ``lax.scan`` each over stacked weights and caches. Outputs stay the
oracles' (the naive no-cache loop, the naive BLT-D block forward, ``ar`` for the lossless methods),
and the program holds one copy of each stack whatever its depth."""

from __future__ import annotations

import dataclasses
import re

import jax
import numpy as np
import pytest

try:
    from naive_sampler import naive_generate
    from test_sampler_support import model, random_params, random_prompts
    from test_sampler_unmasking import d_model, naive_blt_d
except ImportError:  # pragma: no cover - when tests/ is a package
    from tests.naive_sampler import naive_generate
    from tests.test_sampler_support import model, random_params, random_prompts
    from tests.test_sampler_unmasking import d_model, naive_blt_d

from fastblt.sampler import api, encode_prompts, generate
from fastblt.sampler.state import scanned_stacks

PAD = 64
SHAPES = dict(buffer_bytes=PAD, prefill_chunk=4)
pytestmark = pytest.mark.slow


def _scanned(config):
    return config.replace(scan_decode_layers=True)


@pytest.mark.parametrize("name", ["base", "variant"])
def test_scanned_ar_matches_naive(name):
    config, params = model(name)
    config = _scanned(config)
    # base: all three stacks scanned; variant: its decoder (cross-attention before layer 0 only) is not.
    assert scanned_stacks(config) == (
        {"entropy", "global", "decoder"} if name == "base" else {"entropy", "global"}
    )
    prompts = random_prompts(1, [3, 11, 6])
    result = generate(params, config, prompts, max_bytes=24, record_logits=True, **SHAPES)
    ids, logits = naive_generate(params, config, encode_prompts(prompts), 24, pad_to=PAD)
    for row in range(len(prompts)):
        np.testing.assert_array_equal(result.ids[row], ids[row], err_msg=f"row {row}")
        np.testing.assert_allclose(result.logits[row], logits[row], atol=1e-4, rtol=0, err_msg=f"row {row}")


def test_scanned_lossless_methods_are_identical_to_naive_ar():
    config, params = d_model("base")
    config = _scanned(config)
    prompts = random_prompts(10, [5, 1, 12])
    want, _ = naive_generate(params, config, encode_prompts(prompts), 30, pad_to=PAD)
    spec = generate(params, config, prompts, method="blt_s", draft=4, max_bytes=30, **SHAPES)
    dv = generate(params, config, prompts, method="blt_dv", block_size=4, alpha=0.3, max_bytes=30, **SHAPES)
    for row in range(len(prompts)):
        np.testing.assert_array_equal(spec.ids[row], want[row], err_msg=f"blt_s row {row}")
        np.testing.assert_array_equal(dv.ids[row], want[row], err_msg=f"blt_dv row {row}")
    assert 0 < spec.counters.accepted.sum() < spec.counters.drafted.sum()


def test_scanned_blt_d_matches_naive_block_forward():
    config, params = d_model("base")
    config = _scanned(config)
    prompts = random_prompts(1, [5, 11])
    res = generate(params, config, prompts, method="blt_d", block_size=4, alpha=0.2, max_bytes=14, **SHAPES)
    for row, prompt in enumerate(encode_prompts(prompts)):
        want = naive_blt_d(params, config, prompt, 14, 4, "alpha", 0.2, 0.0)
        np.testing.assert_array_equal(res.ids[row], want, err_msg=f"row {row}")


def _lowered_dots(monkeypatch, config, params, method: str) -> int:
    """dot_general ops in the StableHLO of ``method``'s program (lowered, not compiled)."""
    seen = {}

    def capture(key, fn, args):
        seen["text"] = jax.jit(fn).lower(*args).as_text()
        return None, 0.0

    monkeypatch.setattr(api, "_compiled", capture)
    api.prepare(params, config, [b"abc"], method=method, max_bytes=8, compilation_cache=False, **SHAPES)
    return len(re.findall(r"stablehlo\.dot_general", seen["text"]))


@pytest.mark.parametrize("method", ["ar", "blt_d"])
def test_a_scanned_program_does_not_grow_with_depth(monkeypatch, method):
    """Unrolled, each extra layer of the three stacks adds its products to the program; scanned, a
    deeper model lowers to the same number of products."""
    base, _ = d_model("base")

    def deeper(config, n):
        layers = lambda c: dataclasses.replace(c, n_layers=n)  # noqa: E731
        return config.replace(
            global_model=layers(config.global_model),
            decoder=layers(config.decoder),
            entropy_model=layers(config.entropy_model),
        )

    dots = {}
    for scan in (False, True):
        for n in (2, 4):
            config = deeper(base, n).replace(scan_decode_layers=scan)
            params = random_params(config, np.random.default_rng(0))  # shapes only matter
            dots[scan, n] = _lowered_dots(monkeypatch, config, params, method)
    assert dots[False, 4] > dots[False, 2]
    assert dots[True, 4] == dots[True, 2] < dots[False, 2]


def test_unrolled_layers_are_traced_once_per_stack(monkeypatch):
    """cached.TRACE_LAYERS_ONCE: an unrolled stack's layers (entropy model, encoder, global model) are
    calls of one jitted layer, so a deeper model traces the layer no more often; a second program
    traces its layers again (a trace made under one program's switches is not handed to another);
    with the switch off every layer is traced inline, so three more layers per stack (entropy and
    global models) trace the layer three more times per call site. (The bytes are the naive oracle's in
    the tests above and in test_sampler_ar.py, which run with the switch on.)"""
    from fastblt.sampler import cached

    base, _ = model("base")
    real = cached._cached_layer

    def count(n: int, once: bool) -> list:
        """The layer config (which stack) of each trace of _cached_layer, lowering ar at depth n."""
        traces = []

        def counted(*args):
            traces.append(args[1])
            return real(*args)

        monkeypatch.setattr(cached, "_cached_layer", counted)
        monkeypatch.setattr(cached, "TRACE_LAYERS_ONCE", once)
        layers = lambda c: dataclasses.replace(c, n_layers=n)  # noqa: E731
        config = base.replace(
            global_model=layers(base.global_model), entropy_model=layers(base.entropy_model)
        )
        _lowered_dots(monkeypatch, config, random_params(config, np.random.default_rng(0)), "ar")
        return traces

    shallow, deep, again = count(2, True), count(5, True), count(5, True)
    assert len(shallow) == len(deep) == len(again) > 0
    assert len(set(shallow)) == 3  # entropy model, encoder, global model
    # Traced once, each call site of a stack traces one layer; inline, every layer of the stack.
    deep_sites = sum(c.n_layers == 5 for c in deep)  # call sites of the entropy and global models
    assert deep_sites > 0
    assert len(count(5, False)) - len(count(2, False)) == 3 * deep_sites
