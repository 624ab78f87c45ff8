"""BLT-S (self-speculation) greedy output is byte-identical to greedy cached ``ar`` (itself checked
against the naive oracle in test_sampler_ar.py), on random tiny models and prompts, batch 1 and 3."""

from __future__ import annotations

import numpy as np
import pytest

try:
    from test_sampler_support import model, random_prompts
except ImportError:  # pragma: no cover - when tests/ is a package
    from tests.test_sampler_support import model, random_prompts

from fastblt.sampler import generate

SHAPES = dict(buffer_bytes=64, prefill_chunk=4)


def _same_as_ar(name, prompts, draft, max_bytes, **kw):
    config, params = model(name)
    ar = generate(params, config, prompts, method="ar", max_bytes=max_bytes, **SHAPES, **kw)
    spec = generate(params, config, prompts, method="blt_s", draft=draft, max_bytes=max_bytes, **SHAPES, **kw)
    for row in range(len(prompts)):
        np.testing.assert_array_equal(spec.ids[row], ar.ids[row], err_msg=f"row {row}")
    np.testing.assert_array_equal(spec.counters.generated, ar.counters.generated)
    return ar, spec


@pytest.mark.parametrize("name,draft", [("base", 4), ("variant", 3)])
def test_greedy_batch_of_three_is_identical_to_ar(name, draft):
    ar, spec = _same_as_ar(name, random_prompts(10, [5, 1, 12]), draft, max_bytes=40)
    c = spec.counters
    # Drafts were both accepted and rejected, so both paths of the verifier ran.
    assert 0 < c.accepted.sum() < c.drafted.sum()
    assert (c.rounds < ar.counters.decoder_passes).all()  # more than one byte per round on average


def test_greedy_batch_of_one_with_eos_stop_is_identical_to_ar():
    """Batch 1; a decoder biased towards EOS so that an EOS lands inside a verified draft."""
    from fastblt.tokenizer import EOS

    config, params = model("base")
    biased = {**params, "local_decoder": dict(params["local_decoder"])}
    out = dict(biased["local_decoder"]["output"])
    kernel = np.array(out["kernel"])
    kernel[:, EOS] += 0.35 * np.abs(kernel).max()
    out["kernel"] = kernel
    biased["local_decoder"]["output"] = out
    for seed in (11, 12, 13):
        prompts = random_prompts(seed, [6])
        ar = generate(biased, config, prompts, method="ar", max_bytes=30, **SHAPES)
        spec = generate(biased, config, prompts, method="blt_s", draft=4, max_bytes=30, **SHAPES)
        np.testing.assert_array_equal(spec.ids[0], ar.ids[0])


def test_generation_fills_the_buffer_exactly():
    """Budget larger than the buffer: both methods stop at the last buffer slot, drafts past the end
    of the buffer are dropped."""
    config, params = model("base")
    prompts = random_prompts(14, [9, 30, 2])
    ar = generate(params, config, prompts, method="ar", max_bytes=62, **SHAPES)
    spec = generate(params, config, prompts, method="blt_s", draft=4, max_bytes=62, **SHAPES)
    for row, p in enumerate(prompts):
        assert len(ar.ids[row]) == min(62, 64 - (len(p) + 1))  # BOS + prompt + generated <= 64
        np.testing.assert_array_equal(spec.ids[row], ar.ids[row])


@pytest.mark.parametrize("method", ["ar", "blt_s"])
def test_rows_stop_when_the_patch_slots_run_out(method):
    """With few patch slots a row stops early; what it generated is the unlimited run's prefix."""
    config, params = model("base")
    prompts = random_prompts(15, [3, 10, 5])
    full = generate(params, config, prompts, method=method, draft=3, max_bytes=40, **SHAPES)
    short = generate(params, config, prompts, method=method, draft=3, max_bytes=40, max_patches=20, **SHAPES)
    assert any(len(s) < len(f) for s, f in zip(short.ids, full.ids, strict=True))
    for s, f in zip(short.ids, full.ids, strict=True):
        assert len(s) >= 1
        np.testing.assert_array_equal(s, f[: len(s)])
    with pytest.raises(ValueError, match="max_patches=8 is too small"):
        generate(params, config, [b"a prompt of 14"], method=method, max_patches=8, **SHAPES)


def test_rows_that_fill_the_buffer_mid_round_stay_identical_to_ar():
    """A verify chunk that reaches past the end of the buffer appends only the bytes that fit: the
    last bytes of a full row are still ar's (rows of different lengths reach the end in different
    rounds)."""
    config, params = model("base")
    prompts = random_prompts(11, [5, 20, 33])
    kw = dict(buffer_bytes=64, max_bytes=80, stop_at_eos=False)
    ar = generate(params, config, prompts, method="ar", **kw)
    spec = generate(params, config, prompts, method="blt_s", draft=5, **kw)
    for row, p in enumerate(prompts):
        assert len(ar.ids[row]) == 64 - (len(p) + 1)
        np.testing.assert_array_equal(spec.ids[row], ar.ids[row])
