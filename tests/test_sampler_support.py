"""Tiny random BLTs for the sampler tests (shared by tests/test_sampler_*.py), and checks of the
naive oracle itself.

Models are random-init with the entropy model's output sharpened (kernel x 10) so entropies spread
over a wide range, and the patch threshold is the median entropy on random bytes: patches of many
lengths appear. Local windows are shorter than the generations, so the windows matter.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

try:
    from naive_sampler import naive_generate
except ImportError:  # pragma: no cover - when tests/ is a package
    from tests.naive_sampler import naive_generate

from fastblt.config import EntropyModelConfig, HashConfig, LocalModelConfig, ModelConfig, TransformerConfig
from fastblt.model import BLT, abstract_params
from fastblt.tokenizer import encode

CONFIGS = {
    # Encoder cross-attention after the last layer, decoder before every layer, GQA global.
    "base": ModelConfig(
        encoder=LocalModelConfig(dim=32, n_layers=1, n_heads=4, window=16),
        global_model=TransformerConfig(dim=48, n_layers=2, n_heads=4, n_kv_heads=2),
        decoder=LocalModelConfig(dim=32, n_layers=2, n_heads=4, window=16, cross_attn_all_layers=True),
        entropy_model=EntropyModelConfig(dim=32, n_layers=2, n_heads=2, window=12),
        hash=HashConfig(group_sizes=(2, 3, 5), nb_functions=1, vocab=97),
        max_bytes=512,
    ),
    # k=3 slots (global input projection), encoder cross-attention after every layer with the HF
    # re-pooling, decoder cross-attention before the first layer only, two hash functions, capped
    # patch length, different windows per stack.
    "variant": ModelConfig(
        encoder=LocalModelConfig(dim=24, n_layers=2, n_heads=2, window=9, cross_attn_all_layers=True),
        global_model=TransformerConfig(dim=40, n_layers=1, n_heads=2),
        decoder=LocalModelConfig(dim=24, n_layers=2, n_heads=3, window=7, cross_attn_all_layers=False),
        entropy_model=EntropyModelConfig(dim=16, n_layers=1, n_heads=2, window=6),
        hash=HashConfig(group_sizes=(3, 4), nb_functions=2, vocab=61),
        cross_attn_k=3,
        encoder_repool_every_layer=True,
        max_bytes=512,
    ),
}

# "base" with head dims of 16 in every stack (the decode kernel's smallest, fastblt.model.decode_attention).
CONFIGS["heads16"] = CONFIGS["base"].replace(
    encoder=dataclasses.replace(CONFIGS["base"].encoder, n_heads=2),
    global_model=dataclasses.replace(CONFIGS["base"].global_model, dim=64),
    decoder=dataclasses.replace(CONFIGS["base"].decoder, n_heads=2),
)


def random_params(config: ModelConfig, rng: np.random.Generator) -> dict:
    """Random params of the model's tree (shapes from ``abstract_params``; no compilation): kernels
    and tables N(0, 1/fan_in), norm scales 1 + N(0, 0.2) (so a dropped scale would show)."""

    def leaf(path, x):
        name = jax.tree_util.keystr(path)
        if name.endswith("['scale']"):
            return jnp.asarray(1.0 + 0.2 * rng.standard_normal(x.shape), jnp.float32)
        fan_in = x.shape[-1] if name.endswith("['embedding']") else x.shape[0]
        return jnp.asarray(rng.standard_normal(x.shape) / np.sqrt(fan_in), jnp.float32)

    return jax.tree_util.tree_map_with_path(leaf, abstract_params(config))


@functools.lru_cache(maxsize=8)
def model(name: str, seed: int = 0, max_patch_length: int | None = None) -> tuple[ModelConfig, dict]:
    """(config with a mid-range threshold, params) of a named tiny model."""
    config = CONFIGS[name]
    rng = np.random.default_rng(seed)
    params = random_params(config, rng)
    params["entropy_model"]["output"]["kernel"] = params["entropy_model"]["output"]["kernel"] * 10.0
    sample = jnp.asarray(np.concatenate([[1], rng.integers(4, 260, 80)]), jnp.int32)[None]
    entropies = jax.jit(lambda p, x: BLT(config).apply({"params": p}, x, method=BLT.entropies))
    ent = np.asarray(entropies(params, sample))[0, 1:]
    patcher = dataclasses.replace(
        config.patcher, threshold=float(np.median(ent)), max_patch_length=max_patch_length
    )
    return config.replace(patcher=patcher), params


def random_prompts(seed: int, lengths: list[int]) -> list[bytes]:
    rng = np.random.default_rng(seed)
    text = np.frombuffer(b"the quick brown fox jumps over a lazy dog, 0123456789. ", np.uint8)
    return [bytes(rng.choice(text, size=n).tolist()) for n in lengths]


@functools.lru_cache(maxsize=8)
def _patch_fn(config: ModelConfig):
    return jax.jit(lambda p, x: BLT(config).apply({"params": p}, x, method=BLT.patch))


def patch_lengths_of(config: ModelConfig, params: dict, ids: np.ndarray, pad_to: int = 64) -> np.ndarray:
    """The model's own patch lengths for one row of ids (include_next_token).

    The row is right-padded to ``pad_to`` (one compiled shape; boundaries are causal) and the lengths
    are cut back to the real row: they sum to ``len(ids) + 1``.
    """
    tokens = np.pad(np.asarray(ids, np.int32), (0, pad_to - len(ids)))
    got = _patch_fn(config)(params, jnp.asarray(tokens)[None])
    starts = np.cumsum(np.asarray(got.lengths[0])) - np.asarray(got.lengths[0])
    starts = [int(s) for s in starts if s <= len(ids)]
    return np.diff(starts + [len(ids) + 1])


def test_naive_padded_prefix_equals_exact_prefix():
    """The oracle's one-shape mode (pad_to) computes what the literal per-length re-run computes."""
    config, params = model("base")
    prompts = [encode(b"fox jumps")]
    exact_ids, exact_logits = naive_generate(params, config, prompts, 3)
    padded_ids, padded_logits = naive_generate(params, config, prompts, 3, pad_to=64)
    np.testing.assert_array_equal(padded_ids[0], exact_ids[0])
    np.testing.assert_allclose(padded_logits[0], exact_logits[0], atol=1e-5, rtol=0)


def test_naive_rejects_a_prefix_longer_than_pad_to():
    config, params = model("base")
    with pytest.raises(ValueError, match="pad_to"):
        naive_generate(params, config, [encode(b"a longer prompt")], 2, pad_to=8)


def test_decode_dot_pads_one_row_products_and_cuts_the_padding_off():
    from fastblt.sampler.fused import dot

    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
    for shape in [(1, 1, 6), (1, 6), (3, 6)]:
        x = jnp.asarray(rng.normal(size=shape), jnp.float32)
        want = np.asarray(x) @ np.asarray(w)
        for at_least in (1, 2, 8):
            got = dot(x, w, at_least=at_least)
            assert got.shape == want.shape
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
