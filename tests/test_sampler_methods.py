"""The method registry (fastblt.sampler.methods): generate, the CLI and the counters read it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from test_sampler_support import model, random_prompts

from fastblt.sampler import generate, methods


def test_a_registered_method_is_generated_and_counted_from_its_entry(monkeypatch):
    """A new method is one registry entry: here ar's loop under another name, counted per round as
    the paper counts BLT-S (3 E/G passes per round, an arbitrary figure), refusing drafts of 0."""
    monkeypatch.setattr(methods, "REGISTRY", dict(methods.REGISTRY))
    checked = []

    def check(request, config):
        checked.append(request)
        if request.draft == 0:
            raise ValueError("draft=0: test method refuses it")

    methods.register(
        dataclasses.replace(methods.get("ar"), name="ar_again", check=check, paper_eg_per_round=3)
    )
    config, params = model("base")
    prompts = random_prompts(4, [5, 8])
    kw = dict(buffer_bytes=64, prefill_chunk=4, max_bytes=10)
    want = generate(params, config, prompts, method="ar", **kw)
    got = generate(params, config, prompts, method="ar_again", **kw)
    for row in range(2):
        np.testing.assert_array_equal(got.ids[row], want.ids[row])
    assert checked and checked[0].greedy and checked[0].draft == 8
    c = got.counters
    np.testing.assert_array_equal(c.paper_eg_passes, 1 + 3 * c.rounds)  # ar counts no rounds: 1
    np.testing.assert_array_equal(want.counters.paper_eg_passes, want.counters.eg_passes)
    with pytest.raises(ValueError, match="draft=0: test method refuses it"):
        generate(params, config, prompts, method="ar_again", draft=0, **kw)
    with pytest.raises(ValueError, match="already registered"):
        methods.register(methods.get("ar"))
    with pytest.raises(
        ValueError, match=r"method='nope' is not one of \('ar', 'blt_s', 'blt_d', 'blt_dv', 'ar_again'\)"
    ):
        generate(params, config, prompts, method="nope", **kw)


def test_blt_s_counts_two_eg_passes_per_round_as_the_paper():
    config, params = model("base")
    result = generate(
        params,
        config,
        random_prompts(4, [6]),
        method="blt_s",
        draft=3,
        buffer_bytes=64,
        prefill_chunk=4,
        max_bytes=12,
    )
    c = result.counters
    assert c.rounds[0] >= 3
    np.testing.assert_array_equal(c.paper_eg_passes, 1 + 2 * c.rounds)
    np.testing.assert_array_equal(c.eg_passes, 1 + c.rounds)  # one verify pass per round, as run
