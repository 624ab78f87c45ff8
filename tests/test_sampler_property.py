"""Property test of ``generate`` (hypothesis): random prompt lengths, bytes and batch mixes never
crash, every row gets exactly the bytes asked for unless it ends at EOS, and a row generates the same
bytes in a batch as alone (greedy, float32)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

try:
    from test_sampler_support import model
except ImportError:  # pragma: no cover - when tests/ is a package
    from tests.test_sampler_support import model

from fastblt.sampler import generate
from fastblt.tokenizer import EOS

BUFFER = 64  # one buffer for every example: programs compile once per (method, batch)

prompt = st.binary(min_size=1, max_size=30)
request = st.tuples(
    st.sampled_from(["ar", "blt_s"]),
    st.one_of(st.lists(prompt, min_size=1, max_size=1), st.lists(prompt, min_size=3, max_size=3)),
    st.integers(min_value=1, max_value=24),
)


@pytest.mark.slow
@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(request)
def test_generate_returns_requested_rows_for_any_prompts(req):
    method, prompts, max_bytes = req
    event(f"{method} batch {len(prompts)}")
    config, params = model("base")
    kw = dict(method=method, max_bytes=max_bytes, draft=3, buffer_bytes=BUFFER)
    result = generate(params, config, prompts, **kw)
    assert len(result.ids) == len(prompts)
    for row, ids in enumerate(result.ids):
        ids = np.asarray(ids)
        ends_at_eos = len(ids) > 0 and ids[-1] == EOS
        assert len(ids) == max_bytes or (ends_at_eos and len(ids) <= max_bytes), (row, len(ids))
        assert ((ids >= 0) & (ids < config.vocab_size)).all()
        assert EOS not in ids[:-1]  # a row stops at its first EOS
    if len(prompts) > 1:  # the batch is its rows alone (a row's bytes do not depend on the others)
        alone = generate(params, config, prompts[1:2], **kw)
        np.testing.assert_array_equal(result.ids[1], alone.ids[0])
