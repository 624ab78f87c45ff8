"""Cached autoregressive generation (method="ar") against the naive no-cache oracle.

Greedy ids must be identical and the per-step logits equal to 1e-4 (fp32) on random tiny models
whose patches vary and whose local windows are shorter than the generated rows; batches of rows with
different prompt lengths; a prefill split in several chunks; sampling with the same keys.
"""

from __future__ import annotations

import numpy as np
import pytest

try:
    from naive_sampler import naive_generate
    from test_sampler_support import model, patch_lengths_of, random_prompts
except ImportError:  # pragma: no cover - when tests/ is a package
    from tests.naive_sampler import naive_generate
    from tests.test_sampler_support import model, patch_lengths_of, random_prompts

from fastblt.sampler import ar, encode_prompts, generate
from fastblt.sampler.sampling import top_p_filter
from fastblt.tokenizer import BOS, EOS

TOL = 1e-4
PAD = 64  # the oracle's one compiled shape; also the sampler's buffer, so tests share compilations
SHAPES = dict(buffer_bytes=PAD, prefill_chunk=4, record_logits=True)


def _check_against_naive(name, prompts, max_bytes, **kw):
    config, params = model(name)
    result = generate(params, config, prompts, max_bytes=max_bytes, **SHAPES, **kw)
    sampling = {k: v for k, v in kw.items() if k in ("temperature", "top_p", "seed", "stop_at_eos")}
    ids, logits = naive_generate(params, config, encode_prompts(prompts), max_bytes, pad_to=PAD, **sampling)
    for row in range(len(prompts)):
        np.testing.assert_array_equal(result.ids[row], ids[row], err_msg=f"row {row}")
        np.testing.assert_allclose(result.logits[row], logits[row], atol=TOL, rtol=0, err_msg=f"row {row}")
    return config, params, result


@pytest.mark.parametrize("name", ["base", "variant"])
def test_greedy_batch_of_three_matches_naive(name):
    prompts = random_prompts(1, [3, 11, 6])
    config, params, result = _check_against_naive(name, prompts, max_bytes=30)
    assert (result.counters.generated == 30).all()
    # The rows are longer than every local window, and their patches vary.
    full = [np.concatenate([p, g]) for p, g in zip(encode_prompts(prompts), result.ids, strict=True)]
    assert min(len(x) for x in full) > config.encoder.window + config.entropy_model.window
    lengths = np.concatenate([patch_lengths_of(config, params, x) for x in full])
    assert len(set(lengths.tolist())) >= 3, lengths


def test_greedy_batch_of_one_with_capped_patches_matches_naive():
    prompts = random_prompts(2, [7])
    config, params = model("base", max_patch_length=3)
    result = generate(params, config, prompts, max_bytes=28, **SHAPES)
    ids, logits = naive_generate(params, config, encode_prompts(prompts), 28, pad_to=PAD)
    np.testing.assert_array_equal(result.ids[0], ids[0])
    np.testing.assert_allclose(result.logits[0], logits[0], atol=TOL, rtol=0)
    full = np.concatenate([encode_prompts(prompts)[0], result.ids[0]])
    assert patch_lengths_of(config, params, full)[:-1].max() <= 3


def test_sampling_with_temperature_and_top_p_matches_naive():
    prompts = random_prompts(3, [5, 9, 2])
    _check_against_naive("base", prompts, max_bytes=20, temperature=0.8, top_p=0.9, seed=7)


def test_document_masking_eos_inside_the_prompt_and_generation_past_eos():
    """A prompt holding EOS (two documents) and generation that does not stop at EOS."""
    config, params = model("base")
    first, second = encode_prompts([b"a document", b"and next"])
    prompts = [np.concatenate([first, [EOS], second]), np.concatenate([second, [EOS, BOS]]), first]
    _check_against_naive("base", prompts, max_bytes=12, stop_at_eos=False)


def test_rows_stop_at_eos_and_keep_their_budget():
    """EOS stops a row (greedy on a model biased to EOS after some bytes); other rows go on."""
    config, params = model("base")
    biased = {**params, "local_decoder": dict(params["local_decoder"])}
    out = dict(biased["local_decoder"]["output"])
    kernel = np.array(out["kernel"])
    kernel[:, EOS] += 0.35 * np.abs(kernel).max()  # EOS wins for some (not all) states
    out["kernel"] = kernel
    biased["local_decoder"]["output"] = out
    prompts = random_prompts(4, [4, 9, 5])
    result = generate(biased, config, prompts, max_bytes=16, **SHAPES)
    ids, _ = naive_generate(biased, config, encode_prompts(prompts), 16, pad_to=PAD)
    for row in range(3):
        np.testing.assert_array_equal(result.ids[row], ids[row])
    stopped = [len(x) < 16 and x[-1] == EOS for x in result.ids]
    assert any(stopped), [x.tolist() for x in result.ids]
    assert (result.counters.generated == [len(x) for x in result.ids]).all()


def test_same_shapes_do_not_retrace(monkeypatch):
    config, params = model("base")
    traces = []  # one entry each time the loop function is traced (a Python side effect)
    build_ar = ar.build_ar

    def counting_build(*args, **kwargs):
        run = build_ar(*args, **kwargs)

        def traced(*run_args):
            traces.append(1)
            return run(*run_args)

        return traced

    monkeypatch.setattr(ar, "build_ar", counting_build)  # fastblt.sampler.methods imports it per build
    first = generate(params, config, random_prompts(5, [4, 6, 1]), max_bytes=5, **SHAPES)
    second = generate(params, config, random_prompts(6, [8, 3, 2]), max_bytes=9, seed=3, **SHAPES)
    assert len(traces) <= 1  # 0 when an earlier test compiled the same shapes
    assert second.compile_seconds == 0.0
    assert first.bytes_per_second > 0 and second.seconds > 0


def test_top_p_filter_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 30)).astype(np.float32)
    for p in (0.05, 0.5, 0.9, 1.0):
        got = np.isfinite(np.asarray(top_p_filter(logits, p)))
        for row in range(4):
            probs = np.exp(logits[row] - logits[row].max())
            probs /= probs.sum()
            order = np.argsort(-probs, kind="stable")
            keep, mass = set(), 0.0
            for i in order:  # smallest prefix of the ranking whose mass reaches p
                keep.add(int(i))
                mass += probs[i]
                if mass >= p:
                    break
            assert set(np.flatnonzero(got[row]).tolist()) == keep, (p, row)


def test_bad_arguments_raise_clear_errors():
    config, params = model("base")
    with pytest.raises(ValueError, match="prompts\\[1\\] is empty"):
        generate(params, config, [b"ok", b""])
    with pytest.raises(ValueError, match="prompts is empty"):
        generate(params, config, [])
    with pytest.raises(ValueError, match="method='beam'"):
        generate(params, config, [b"ok"], method="beam")
    with pytest.raises(ValueError, match="prompts\\[0\\] is 11 ids long.*buffer_bytes=8"):
        generate(params, config, [b"ten bytes!"], buffer_bytes=8)
    with pytest.raises(ValueError, match="max_bytes"):
        generate(params, config, [b"ok"], max_bytes=0)
    with pytest.raises(ValueError, match="temperature=-0.5 must be >= 0"):
        generate(params, config, [b"ok"], method="blt_s", temperature=-0.5)
    with pytest.raises(TypeError, match="list"):
        generate(params, config, "not a list")


@pytest.mark.parametrize("method", ["ar", "blt_s"])
def test_gpu_row_padding_is_inert_batch_of_one_matches_naive(monkeypatch, method):
    """On GPUs a one-row decode call runs with an extra inert column (fastblt.sampler.fused): forced
    here on CPU (a buffer no other test compiles), greedy ids and logits stay the oracle's."""
    from fastblt.sampler import fused

    monkeypatch.setattr(fused, "min_rows", lambda: 2)
    prompts = random_prompts(5, [9])
    config, params = model("base")
    # A shape of its own, so the padded program is compiled here.
    kw = dict(SHAPES, buffer_bytes=PAD + 8, record_logits=method == "ar")
    result = generate(params, config, prompts, method=method, draft=4, max_bytes=30, **kw)
    ids, logits = naive_generate(params, config, encode_prompts(prompts), 30, pad_to=PAD)
    np.testing.assert_array_equal(result.ids[0], ids[0])
    if method == "ar":
        np.testing.assert_allclose(result.logits[0], logits[0], atol=TOL, rtol=0)


def test_generation_compiles_as_two_programs_equal_to_one(monkeypatch):
    """prepare compiles the prefill half and the loop half as two programs (api._compile_halves);
    run as one jitted module, the same function gives the same ids, lengths, logits and counters."""
    import jax

    from fastblt.sampler import api

    config, params = model("base")
    prompts = random_prompts(5, [3, 9])
    program = api.prepare(params, config, prompts, max_bytes=12, **SHAPES)
    assert isinstance(program.executable, api._Halves)
    got = program.executable(*program.args)
    recorded = {}
    real = api._compiled

    def capture(key, fn, args):
        recorded["fn"] = fn
        return real(key, fn, args)

    monkeypatch.setattr(api, "_compiled", capture)
    api.prepare(params, config, prompts, max_bytes=12, **SHAPES)  # the cached program; records its function
    whole = jax.jit(recorded["fn"])(*program.args)
    for name in ("tokens", "length", "generated", "logits"):
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(whole[name]), err_msg=name)
    for a, b in zip(jax.tree.leaves(got["counters"]), jax.tree.leaves(whole["counters"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_prefill_compiler_options_reach_the_prefill_half_alone(monkeypatch):
    """GPU_PREFILL_COMPILER_OPTIONS go to the prefill half's compile and not the loop's; the loop half
    keeps GPU_COMPILER_OPTIONS (checked on the options each half's Lowered.compile is given)."""
    import jax

    from fastblt.sampler import api

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # compiler_options' view only
    monkeypatch.setattr(api, "GPU_COMPILER_OPTIONS", {"xla_gpu_autotune_level": 4})
    monkeypatch.setattr(api, "GPU_PREFILL_COMPILER_OPTIONS", {"xla_gpu_enable_triton_gemm": False})
    options = {True: api.compiler_options(prefill=True), False: api.compiler_options()}
    monkeypatch.undo()
    assert options[True] == {"xla_gpu_autotune_level": 4, "xla_gpu_enable_triton_gemm": False}
    assert options[False] == {"xla_gpu_autotune_level": 4}

    monkeypatch.setattr(api, "compiler_options", lambda prefill=False: options[prefill])
    seen = {}
    real_compile = jax.stages.Lowered.compile

    def spy(self, compiler_options=None):
        text = self.as_text()
        half = "start" if "@jit_start" in text else "finish" if "@jit_finish" in text else "other"
        seen.setdefault(half, []).append(compiler_options)
        return real_compile(self, compiler_options=compiler_options)

    monkeypatch.setattr(jax.stages.Lowered, "compile", spy)
    config, params = model("base")
    prompts = random_prompts(5, [3])
    program = api.prepare(params, config, prompts, max_bytes=6, **SHAPES)
    assert program.compile_seconds > 0
    assert seen == {"start": [options[True]], "finish": [options[False]]}
    # The prefill half's options are part of the program's key: changing them alone compiles anew.
    assert api.prepare(params, config, prompts, max_bytes=6, **SHAPES).compile_seconds == 0.0
    options[True] = {"xla_gpu_autotune_level": 4, "xla_gpu_enable_triton_gemm": True}
    assert api.prepare(params, config, prompts, max_bytes=6, **SHAPES).compile_seconds > 0
    assert seen["start"][-1] == options[True] and seen["finish"][-1] == options[False]


@pytest.mark.parametrize("n_cand", [2, 6])  # masked reductions; the segment max (more candidates)
def test_pool_patches_is_the_max_over_each_candidates_bytes(n_cand):
    """cached.pool_patches against a loop over rows and candidates: the max of the bytes whose patch
    is the candidate (clipped into range), -inf for a patch without bytes; bytes of patch p are none's."""
    import jax.numpy as jnp

    from fastblt.sampler.cached import pool_patches

    rng = np.random.default_rng(5)
    b, n, d, p = 3, 20, 4, 7
    x = rng.normal(size=(b, n, d)).astype(np.float32)
    seg = np.sort(rng.integers(0, p + 1, size=(b, n)), axis=1)  # sorted patch ids, p past the length
    seg[0] = np.where(seg[0] == 3, 4, seg[0])  # row 0's patch 3 has no byte
    cand = rng.integers(-1, p + 2, size=(b, n_cand))  # some out of range: clipped
    cand[0, 0] = 3
    got = np.asarray(pool_patches(jnp.asarray(x), jnp.asarray(seg), jnp.asarray(cand), p))
    for r in range(b):
        for c in range(n_cand):
            rows = x[r][seg[r] == min(max(cand[r, c], 0), p - 1)]
            want = rows.max(axis=0) if len(rows) else np.full(d, -np.inf, np.float32)
            np.testing.assert_array_equal(got[r, c], want)
    assert np.all(got[0, 0] == -np.inf)
