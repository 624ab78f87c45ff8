"""experiments/benchmarks/greedy_identity.py: divergence bookkeeping on hand-made generations."""

from __future__ import annotations

import types

import jax.numpy as jnp
import numpy as np
import pytest

from experiments.benchmarks.greedy_identity import bf16_step, compare


@pytest.mark.parametrize("x", [0.7, 1.0, 3.0, 12.0, -40.0])
def test_bf16_step_is_the_spacing_of_bfloat16(x):
    above = float(jnp.nextafter(jnp.bfloat16(abs(x)), jnp.bfloat16(np.inf)))
    assert bf16_step(x) == pytest.approx(above - float(jnp.bfloat16(abs(x))))


def test_compare_reports_first_divergence_margin_and_entropy_margin():
    logits = np.zeros((5, 8), np.float32)
    logits[2, 3], logits[2, 5] = 12.0, 11.875  # ar wrote 3; the method wrote 5, 2 bf16 steps lower
    ar = types.SimpleNamespace(ids=[np.array([1, 2, 3, 4]), np.array([7, 7])], logits=[logits, None])
    other = types.SimpleNamespace(ids=[np.array([1, 2, 5, 4]), np.array([7, 7])])
    seen = []

    def margins(row, upto):
        seen.append((row, upto))
        return np.array([0.5, 0.01, 0.2])

    (row,) = compare(ar, other, margins)  # the identical second row is not reported
    assert (row["row"], row["position"], row["ar_byte"], row["method_byte"]) == (0, 2, 3, 5)
    assert row["margin"] == pytest.approx(0.125)
    assert row["margin_in_bf16_steps"] == pytest.approx(2.0)
    assert (row["entropy_margin"], row["entropy_margin_at"]) == (0.01, 1)
    assert seen == [(0, 3)]  # entropies up to and including the divergent byte


def test_compare_reports_a_row_that_stops_early_without_a_margin():
    ar = types.SimpleNamespace(ids=[np.array([1, 2, 3])], logits=[np.zeros((3, 4))])
    other = types.SimpleNamespace(ids=[np.array([1, 2])])
    (row,) = compare(ar, other)
    assert row["position"] == 2 and "margin" not in row
