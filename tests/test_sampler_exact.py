"""The exact mode (``exact=True``): greedy ``blt_s`` and ``blt_dv`` byte-identical to ``ar`` in bf16.

In bfloat16 the default mode computes a byte's logits in ``ar``'s one-byte step and in a verification
pass over a chunk with different shapes; where the two best bytes are within rounding the argmax can
flip (on these tiny random models: 3 of 8 rows part ways within 20 bytes, seen on CPU with jax 0.10.2).
The exact mode runs every step at one width, so the oracle here is ``ar`` itself in the same mode.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from test_sampler_support import model, random_prompts
from test_sampler_unmasking import d_model

from fastblt.sampler import generate

SHAPES = dict(buffer_bytes=128, prefill_chunk=4, max_bytes=48)
PROMPTS = random_prompts(3, [5, 9, 13, 7, 11, 6, 8, 10])


def bf16(config_params):
    config, params = config_params
    e = dataclasses.replace(config.entropy_model, dtype="bfloat16")
    return config.replace(dtype="bfloat16", entropy_model=e), params


@pytest.mark.slow
def test_exact_mode_blt_s_and_blt_dv_equal_ar_in_bf16(monkeypatch):
    from fastblt.sampler import decoding

    slots = []  # the decoder cache's slots per generation: one ring size for every method

    def spy(*args, **kw):
        st = decoding_init(*args, **kw)
        slots.append(st.dec_k[0].shape[1])
        return st

    decoding_init = decoding.init_state
    monkeypatch.setattr(decoding, "init_state", spy)
    config, params = bf16(d_model("base"))
    ar = generate(params, config, PROMPTS, method="ar", exact=True, exact_width=8, **SHAPES)
    runs = {
        "blt_s draft 3": generate(
            params, config, PROMPTS, method="blt_s", draft=3, exact=True, exact_width=8, **SHAPES
        ),
        "blt_dv block 4": generate(
            params,
            config,
            PROMPTS,
            method="blt_dv",
            block_size=4,
            alpha=0.3,
            exact=True,
            exact_width=8,
            **SHAPES,
        ),
        "blt_dv block 4 anchor patch": generate(
            params,
            config,
            PROMPTS,
            method="blt_dv",
            block_size=4,
            one_step=True,
            anchor="patch",
            exact=True,
            exact_width=8,
            **SHAPES,
        ),
    }
    assert all(len(x) == SHAPES["max_bytes"] for x in ar.ids)
    for name, got in runs.items():
        for row, (want, ids) in enumerate(zip(ar.ids, got.ids, strict=True)):
            np.testing.assert_array_equal(ids, want, err_msg=f"{name}, row {row}")
        assert got.counters.accepted.sum() > 0, name  # drafts were verified and kept, not all refused
    assert len(slots) == 4 and len(set(slots)) == 1 and slots[0] < SHAPES["buffer_bytes"], slots


def test_exact_mode_rejects_blt_d_and_a_width_too_small():
    config, params = d_model("base")
    with pytest.raises(ValueError, match="exact=True is for the lossless methods"):
        generate(params, config, [b"ok"], method="blt_d", exact=True)
    with pytest.raises(ValueError, match=r"exact_width=8 must be an int >= 9 for method='blt_s'"):
        generate(params, config, [b"ok"], method="blt_s", draft=8, exact=True, exact_width=8)
    with pytest.raises(ValueError, match=r"exact_width=2 must be an int >= 4 for method='blt_dv'"):
        generate(params, config, [b"ok"], method="blt_dv", block_size=4, exact=True, exact_width=2)


def test_exact_mode_ar_in_float32_is_the_default_modes_output():
    """The inert columns change no byte: in float32 the exact mode's ar is the default mode's."""
    config, params = model("base")
    kw = dict(SHAPES, max_bytes=24)
    want = generate(params, config, PROMPTS[:3], method="ar", **kw)
    got = generate(params, config, PROMPTS[:3], method="ar", exact=True, exact_width=8, **kw)
    for row in range(3):
        np.testing.assert_array_equal(got.ids[row], want.ids[row], err_msg=f"row {row}")
