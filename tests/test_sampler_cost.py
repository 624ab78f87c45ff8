"""Generation counters against hand counts, and the paper's bandwidth formula against its tables."""

from __future__ import annotations

import jax
import numpy as np
import pytest

try:
    from test_sampler_support import model, patch_lengths_of, random_prompts
except ImportError:  # pragma: no cover - when tests/ is a package
    from tests.test_sampler_support import model, patch_lengths_of, random_prompts

from fastblt.config import ModelConfig
from fastblt.model import abstract_params
from fastblt.sampler import ParamCounts, bandwidth_bytes, encode_prompts, generate, param_counts

SHAPES = dict(buffer_bytes=64, prefill_chunk=4)


def _starts(lengths: np.ndarray) -> set[int]:
    return set((np.cumsum(lengths) - lengths).tolist())


def test_ar_counters_equal_a_hand_count_of_a_three_byte_generation():
    config, params = model("base")
    prompts = random_prompts(20, [4, 7, 2])
    result = generate(params, config, prompts, method="ar", max_bytes=3, **SHAPES)
    c = result.counters
    for row, prompt in enumerate(encode_prompts(prompts)):
        full = np.concatenate([prompt, result.ids[row]])
        starts = _starts(patch_lengths_of(config, params, full))
        n = len(prompt)
        # The prefill predicts byte n (1 decoder + 1 encoder/global pass). Appending byte n and byte
        # n + 1 gives bytes n + 1 and n + 2 (1 decoder pass each) and runs the global model when the
        # byte after the appended one opens a patch, i.e. the appended byte completed its patch.
        expected_eg = 1 + sum(t in starts for t in (n + 1, n + 2))
        assert c.decoder_passes[row] == 3
        assert c.entropy_passes[row] == 3
        assert c.eg_passes[row] == expected_eg, (row, sorted(starts))
    assert (c.drafted == 0).all() and (c.rounds == 0).all()
    assert np.isnan(c.acceptance_rate)


def test_ar_eg_passes_count_the_patches_completed_during_generation():
    config, params = model("variant")
    prompts = random_prompts(21, [5, 3, 8])
    result = generate(params, config, prompts, method="ar", max_bytes=25, **SHAPES)
    for row, prompt in enumerate(encode_prompts(prompts)):
        full = np.concatenate([prompt, result.ids[row]])
        n, g = len(prompt), len(result.ids[row])
        starts = _starts(patch_lengths_of(config, params, full))
        completed_during = sum(t in starts for t in range(n + 1, n + g))
        assert result.counters.eg_passes[row] == 1 + completed_during
        assert result.counters.decoder_passes[row] == g


def test_blt_s_counters_follow_the_round_structure():
    config, params = model("base")
    draft = 3
    result = generate(
        params, config, random_prompts(22, [6, 2]), method="blt_s", draft=draft, max_bytes=20, **SHAPES
    )
    c = result.counters
    np.testing.assert_array_equal(c.decoder_passes, 1 + c.rounds * (draft + 1))
    np.testing.assert_array_equal(c.eg_passes, 1 + c.rounds)
    np.testing.assert_array_equal(c.paper_eg_passes, 1 + 2 * c.rounds)
    np.testing.assert_array_equal(c.drafted, c.rounds * draft)
    # Each round commits the accepted drafts + 1 byte, except where the budget cuts the last round.
    assert ((c.generated <= c.accepted + c.rounds) & (c.generated > c.accepted + c.rounds - draft - 1)).all()
    assert c.acceptance_rate == pytest.approx(c.accepted.sum() / c.drafted.sum())
    eg = c.params.encoder + c.params.global_model
    # Reported as the paper counts BLT-S (2 E/G passes per round); what this implementation reads
    # (one per round) beside it.
    np.testing.assert_allclose(
        c.bandwidth_bytes(), 2 * (c.decoder_passes * c.params.decoder + (1 + 2 * c.rounds) * eg)
    )
    np.testing.assert_allclose(
        c.bandwidth_bytes(paper_accounting=False),
        2 * (c.decoder_passes * c.params.decoder + c.eg_passes * eg),
    )
    s = c.summary()
    assert s["eg_passes"] == pytest.approx(float(np.mean(1 + 2 * c.rounds)))
    assert s["eg_passes_implementation"] == pytest.approx(float(np.mean(c.eg_passes)))
    assert s["bandwidth_gb"] > s["bandwidth_gb_implementation"]


def test_param_counts_split_the_tree():
    config, params = model("variant")
    counts = param_counts(params, config)
    sizes = {k: sum(x.size for x in jax.tree.leaves(v)) for k, v in params.items()}
    assert counts.decoder == sizes["local_decoder"]
    assert counts.global_model == sizes["global_transformer"]
    tok = params["local_encoder"]["tok_embeddings"]["embedding"].size
    rows = (1 + config.hash.n_tables) * config.encoder.dim  # one byte's embedding rows
    assert counts.encoder == sizes["local_encoder"] - tok + rows
    assert "hash_embed" not in counts.__dict__  # hash tables only count through the rows read
    assert counts.entropy_model == sizes["entropy_model"]


# BLT-1B rows of the paper's Appendix B (fast-blt-methods.md §4.5): (decoder NFE, E/G NFE, MB in GB).
PAPER_BLT_1B = {"FR-EN": (512, 250, 814.95), "HumanEval": (512, 210, 711.20), "MBPP": (256, 220, 654.61)}


# Every method's rows of the paper's 3B FR->EN table (Appendix C, fast-blt-methods.md §4.4): the
# setting, (decoder NFE, E/G NFE, MB in GB). BLT-S/BLT-DV E/G counts are the paper's 2 per round and
# BLT-D's decoder NFE leaves out the clean-row passes: the accounting GenerationCounters reports.
PAPER_3B_FR_EN = {
    "BLT": (512, 308, 1920.99),
    "BLT-S k=4": (534, 215, 1395.99),
    "BLT-S k=16": (724, 87, 727.17),
    "BLT-D-4 a=0.5": (185, 128, 787.36),
    "BLT-D-8 EB=1.0": (235, 64, 439.56),
    "BLT-D-16 a=0.7": (162, 32, 233.87),
    "BLT-DV-4 a=0.3": (236, 215, 1300.92),
    "BLT-DV-8 1-step": (133, 133, 799.94),
    "BLT-DV-16 EB=2.0": (271, 81, 548.64),
}
# BLT-3B's parameters per pass (fast-blt-methods.md §1.5): decoder 160 M, encoder 26 M, global 2.82 B.
COUNTS_3B = ParamCounts(decoder=160_000_000, encoder=26_000_000, global_model=2_820_000_000)


@pytest.mark.parametrize("setting", sorted(PAPER_3B_FR_EN))
def test_bandwidth_formula_reproduces_every_method_of_the_paper_3b_table(setting):
    n_dec, n_eg, paper_gb = PAPER_3B_FR_EN[setting]
    assert bandwidth_bytes(n_dec, n_eg, COUNTS_3B) / 1e9 == pytest.approx(paper_gb, rel=0.01)


@pytest.mark.parametrize("task", sorted(PAPER_BLT_1B))
def test_bandwidth_formula_reproduces_the_paper_blt_1b_rows(task):
    config = ModelConfig()  # BLT-1B
    counts = param_counts(abstract_params(config), config)
    assert counts.decoder == pytest.approx(157.9e6, rel=2e-3)  # blt-architecture.md §7
    assert counts.encoder_global == pytest.approx(1304.0e6, rel=2e-3)
    n_dec, n_eg, paper_gb = PAPER_BLT_1B[task]
    assert bandwidth_bytes(n_dec, n_eg, counts) / 1e9 == pytest.approx(paper_gb, rel=0.01)


def test_loop_counters_add_events_by_name_and_refuse_unknown_ones():
    import jax.numpy as jnp

    from fastblt.sampler.cost import Counters

    c = Counters.zeros(3).add(decoder_passes=1, eg_passes=jnp.array([True, False, True]))
    c = c.add(decoder_passes=jnp.array([2, 0, 1]), rounds=jnp.array([1, 1, 0]))
    np.testing.assert_array_equal(c.decoder_passes, [3, 1, 2])
    np.testing.assert_array_equal(c.eg_passes, [1, 0, 1])
    np.testing.assert_array_equal(c.rounds, [1, 1, 0])
    np.testing.assert_array_equal(c.accepted, [0, 0, 0])
    with pytest.raises(ValueError, match="unknown counters \\['passes'\\]"):
        c.add(passes=1)
