"""Fixed-shape patcher vs the reference's list-based algorithm, hand-worked examples and the HF port."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastblt.config import PatcherConfig
from fastblt.model.patcher import (
    decoder_patch_ids_from_lengths,
    entropy,
    lengths_from_starts,
    patch,
    patch_ids_from_lengths,
    patch_start_mask,
)

THETA = 1.335442066192627


# ---------------------------------------------------------------------------------------------------
# Oracle: the reference algorithm (bytelatent/data/patcher.py, notes §2.3) on one unpadded row, with
# Python lists: start ids -> lengths -> split_large_numbers; trailing zero lengths are dropped.


def ref_entropy_start_ids(h: list[float], config: PatcherConfig, include_next_token: bool) -> list[int]:
    e = h[1:]  # the entropy of position 0 is ignored; e[i] decides byte i + 2
    if config.monotonicity:
        mask = [i == 0 or e[i] - e[i - 1] > config.threshold for i in range(len(e))]
    elif config.threshold_add is not None:
        initial = [i == 0 for i in range(len(e))]
        mask = list(initial)
        for i in range(1, len(e)):
            mask[i] = (
                (e[i] - e[i - 1] > config.threshold_add) and (e[i] > config.threshold) and not initial[i - 1]
            )
    else:
        mask = [x > config.threshold for x in e]
    if not include_next_token:
        mask = mask[:-1]
    return [0, 1] + [i + 2 for i, m in enumerate(mask) if m]


def ref_space_start_ids(tokens: list[int]) -> list[int]:
    b = [t - 4 for t in tokens]
    cand = [x < 48 or 57 < x < 65 or 90 < x < 97 or 122 < x < 128 or x >= 192 for x in b]
    end = [cand[0]] + [cand[i] and not cand[i - 1] for i in range(1, len(cand))]
    end = [e or t < 4 for e, t in zip(end, tokens, strict=True)]
    start = [True, True] + end[1:]  # len(tokens) + 1 columns
    return [i for i, s in enumerate(start) if s]


def ref_lengths_from_start_ids(start_ids: list[int], total: int) -> list[int]:
    ends = [s - 1 for s in start_ids[1:]] + [total - 1]
    return [e - s + 1 for s, e in zip(start_ids, ends, strict=True)]


def ref_split_large_numbers(lengths: list[int], m: int) -> list[int]:
    out = []
    for x in lengths:
        out += [m] * (x // m) + ([x % m] if x % m else []) if x > m else [x]
    return out


def ref_patch_lengths(
    tokens: list[int], h: list[float], config: PatcherConfig, include_next_token: bool
) -> list[int]:
    n = len(tokens)
    total = n + 1 if include_next_token else n
    if config.mode == "entropy":
        starts = ref_entropy_start_ids(h, config, include_next_token)
    elif config.mode == "space":
        starts = ref_space_start_ids(tokens)
    elif config.mode == "static":
        starts = [0] + list(range(1, total, config.patch_size))
    else:
        starts = list(range(total))
    lengths = ref_lengths_from_start_ids(starts, total)
    if config.max_patch_length is not None:
        lengths = ref_split_large_numbers(lengths, config.max_patch_length)
    while lengths and lengths[-1] == 0:  # the next-byte start without include_next_token
        lengths.pop()
    assert all(x > 0 for x in lengths) and sum(lengths) == total
    return lengths


def naive_patch_ids(lengths: list[int], n: int) -> list[int]:
    begins = [sum(lengths[:j]) for j in range(len(lengths))]
    return [sum(1 for b in begins if b <= t) - 1 for t in range(n)]


# ---------------------------------------------------------------------------------------------------
# Hand-worked examples.

WORKED_H = np.array([[2.0, 0.5, 2.0, 0.5, 2.0, 2.0]], np.float32)
WORKED_TOKENS = np.ones((1, 6), np.int32)


@pytest.mark.parametrize(("include", "expected"), [(True, [1, 2, 2, 1, 1]), (False, [1, 2, 2, 1])])
def test_worked_example(include, expected):
    p = patch(WORKED_TOKENS, WORKED_H, PatcherConfig(threshold=1.335), include_next_token=include)
    assert p.lengths.shape == (1, 7) and p.lengths.dtype == jnp.int32
    assert p.lengths[0].tolist() == expected + [0] * (7 - len(expected))
    assert p.count.tolist() == [len(expected)] and p.overflow.tolist() == [False]


def test_worked_example_start_mask_and_patch_ids():
    starts = patch_start_mask(WORKED_TOKENS, WORKED_H, PatcherConfig(threshold=1.335))
    assert np.flatnonzero(np.asarray(starts[0])).tolist() == [0, 1, 3, 5, 6]
    starts = patch_start_mask(
        WORKED_TOKENS, WORKED_H, PatcherConfig(threshold=1.335), include_next_token=False
    )
    assert np.flatnonzero(np.asarray(starts[0])).tolist() == [0, 1, 3, 5]
    starts = patch_start_mask(WORKED_TOKENS, WORKED_H, PatcherConfig(threshold=1.335), seq_lens=np.array([3]))
    assert np.flatnonzero(np.asarray(starts[0])).tolist() == [0, 1, 3]  # column 3 is this row's next byte
    lengths = patch(WORKED_TOKENS, WORKED_H, PatcherConfig(threshold=1.335)).lengths
    assert patch_ids_from_lengths(lengths, 6)[0].tolist() == [0, 1, 1, 2, 2, 3]
    assert decoder_patch_ids_from_lengths(lengths, 6)[0].tolist() == [0, 0, 1, 1, 2, 3]


def test_monotonicity_example():
    h = np.array([[0.0, 0.0, 5.0, 9.0, 9.5, 0.0]], np.float32)
    config = PatcherConfig(threshold=1.0, monotonicity=True)
    # byte 2 always; 3: 5 - 0 > 1; 4: 9 - 5 > 1; 5: 0.5 no; 6: -9.5 no.
    assert patch(WORKED_TOKENS, h, config).lengths[0, :5].tolist() == [1, 1, 1, 1, 3]


def test_threshold_add_quirk_example():
    h = np.array([[0.0, 0.0, 5.0, 9.0, 9.5, 0.0]], np.float32)
    config = PatcherConfig(threshold=1.0, threshold_add=0.25)
    # byte 2 always; byte 3 never (although 5 - 0 > 0.25 and 5 > 1); 4: 4 > .25 and 9 > 1;
    # 5: 0.5 > .25 and 9.5 > 1; 6: no.
    assert np.flatnonzero(np.asarray(patch_start_mask(WORKED_TOKENS, h, config)[0])).tolist() == [
        0,
        1,
        2,
        4,
        5,
    ]
    assert patch(WORKED_TOKENS, h, config).lengths[0, :5].tolist() == [1, 1, 2, 1, 2]


def test_static_and_byte_examples():
    tokens = np.ones((1, 10), np.int32)
    static = PatcherConfig(mode="static", threshold=None, patch_size=4)
    assert patch(tokens, None, static).lengths[0, :4].tolist() == [1, 4, 4, 2]
    assert patch(tokens, None, static, include_next_token=False).lengths[0, :4].tolist() == [1, 4, 4, 1]
    byte = PatcherConfig(mode="byte", threshold=None)
    p = patch(tokens, None, byte)
    assert p.lengths[0].tolist() == [1] * 11 and p.count.tolist() == [11]


def test_space_example():
    # BOS a , ␠ c : the comma is the first of a run of candidates, so the byte after it starts a patch.
    tokens = np.array([[1] + [ord(c) + 4 for c in "ab, cd"]], np.int32)
    assert patch(tokens, None, PatcherConfig(mode="space")).lengths[0, :3].tolist() == [1, 3, 4]
    # A UTF-8 lead byte (0xC3) is a candidate, its continuation byte (0xA9) is not.
    tokens = np.array([[1, ord("a") + 4, 0xC3 + 4, 0xA9 + 4, ord(" ") + 4, ord("b") + 4]], np.int32)
    assert patch(tokens, None, PatcherConfig(mode="space")).lengths[0, :4].tolist() == [1, 2, 2, 2]


def test_max_patch_length_example():
    low = np.zeros((1, 10), np.float32)
    config = PatcherConfig(max_patch_length=4)
    # One long patch of 10 (bytes 1..10) becomes [4, 4, 2].
    assert patch(np.ones((1, 10), np.int32), low, config).lengths[0, :4].tolist() == [1, 4, 4, 2]
    config = PatcherConfig(threshold=1.335, max_patch_length=1)
    assert patch(WORKED_TOKENS, WORKED_H, config).lengths[0].tolist() == [1] * 7


def test_bf16_entropies_compare_in_bf16():
    # The reference compares a bf16 tensor with a Python float in bf16: bf16(THETA) == 1.3359375, so an
    # entropy of exactly 1.3359375 does not exceed the threshold in bf16 although it does in float32.
    h = np.array([[0.0, 1.3359375, 0.0]], np.float32)
    tokens = np.ones((1, 3), np.int32)
    assert (
        patch_start_mask(tokens, jnp.asarray(h, jnp.bfloat16), PatcherConfig())[0].tolist()
        == [True] * 2 + [False] * 2
    )
    assert patch_start_mask(tokens, h, PatcherConfig())[0].tolist() == [True, True, True, False]


def test_entropy():
    logits = np.random.default_rng(0).normal(size=(2, 3, 260)).astype(np.float32) * 3
    p = np.exp(logits.astype(np.float64))
    p /= p.sum(-1, keepdims=True)
    expected = -(p * np.log(p)).sum(-1)
    got = entropy(jnp.asarray(logits))
    assert got.dtype == jnp.float32 and got.shape == (2, 3)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(entropy(jnp.zeros((1, 1, 260), jnp.bfloat16))), [[math.log(260)]], rtol=1e-6
    )
    peaked = np.full((1, 1, 260), -1e4, np.float32)
    peaked[..., 7] = 0.0
    assert float(entropy(jnp.asarray(peaked))[0, 0]) == 0.0


# ---------------------------------------------------------------------------------------------------
# Random rows vs the oracle, every mode, padded batches with different seq_lens.

CONFIGS = [
    PatcherConfig(threshold=1.25),
    PatcherConfig(threshold=1.25, max_patch_length=3),
    PatcherConfig(threshold=0.5, monotonicity=True),
    PatcherConfig(threshold=0.5, monotonicity=True, max_patch_length=2),
    PatcherConfig(threshold=1.0, threshold_add=0.25),
    PatcherConfig(threshold=1.0, threshold_add=0.25, max_patch_length=5),
    PatcherConfig(mode="static", patch_size=4),
    PatcherConfig(mode="static", patch_size=3, max_patch_length=2),
    PatcherConfig(mode="byte"),
    PatcherConfig(mode="space"),
    PatcherConfig(mode="space", max_patch_length=4),
]
SPACE_POOL = [ord(c) + 4 for c in "aZz09 ,.\n{~"] + [
    0x7F + 4,
    0x80 + 4,
    0xBF + 4,
    0xC0 + 4,
    0xC3 + 4,
    0xFF + 4,
    0,
    1,
    2,
    3,
]


def random_batch(seed: int, batch: int = 6, n: int = 24):
    rng = np.random.default_rng(seed)
    tokens = rng.choice(SPACE_POOL, size=(batch, n)).astype(np.int32)
    tokens[:, 0] = 1
    # Half the rows on a 0.25 grid (exact ties with the thresholds and between neighbours).
    h = rng.uniform(0, 3, size=(batch, n)).astype(np.float32)
    h[::2] = np.round(h[::2] * 4) / 4
    seq_lens = rng.integers(1, n + 1, size=batch).astype(np.int32)
    seq_lens[0] = n
    seq_lens[1] = 1
    for b in range(batch):  # padding must be ignored whatever it holds
        h[b, seq_lens[b] :] = 100.0
        tokens[b, seq_lens[b] :] = ord(" ") + 4
    return tokens, h, seq_lens


@pytest.mark.parametrize(
    "config", CONFIGS, ids=lambda c: f"{c.mode}-m{c.monotonicity}-a{c.threshold_add}-x{c.max_patch_length}"
)
@pytest.mark.parametrize("include", [True, False])
def test_random_rows_match_reference(config, include):
    fn = jax.jit(patch, static_argnames=("config", "max_patches", "include_next_token"))
    for seed in range(4):
        tokens, h, seq_lens = random_batch(seed)
        n = tokens.shape[1]
        p = fn(tokens, h, config=config, include_next_token=include, seq_lens=seq_lens)
        enc_ids = patch_ids_from_lengths(p.lengths, n)
        dec_ids = decoder_patch_ids_from_lengths(p.lengths, n)
        assert p.lengths.shape == (tokens.shape[0], n + 1)
        for b, s in enumerate(seq_lens.tolist()):
            expected = ref_patch_lengths(tokens[b, :s].tolist(), h[b, :s].tolist(), config, include)
            msg = f"seed={seed} row={b} seq_len={s}"
            assert p.lengths[b].tolist() == expected + [0] * (n + 1 - len(expected)), msg
            assert int(p.count[b]) == len(expected) and not bool(p.overflow[b]), msg
            padded = expected + [0] * (n + 1 - len(expected))
            assert enc_ids[b].tolist() == naive_patch_ids(padded, n), msg
            assert dec_ids[b].tolist() == naive_patch_ids(padded[1:], n), msg


def test_full_rows_without_seq_lens():
    tokens, h, _ = random_batch(7)
    h = np.random.default_rng(7).uniform(0, 3, size=h.shape).astype(np.float32)
    config = PatcherConfig(threshold=1.25)
    p = patch(tokens, h, config)
    for b in range(tokens.shape[0]):
        expected = ref_patch_lengths(tokens[b].tolist(), h[b].tolist(), config, True)
        assert p.lengths[b].tolist() == expected + [0] * (25 - len(expected))
    counts = p.count.tolist()
    assert len(set(counts)) > 1  # rows with different patch counts in one batch


# ---------------------------------------------------------------------------------------------------
# Overflow and the low-level pieces.


@pytest.mark.parametrize("max_patches", [2, 3, 5, 9])
def test_overflow_merges_surplus_into_last_slot(max_patches):
    tokens, h, seq_lens = random_batch(11)
    config = PatcherConfig(threshold=1.25)
    p = patch(tokens, h, config, max_patches=max_patches, seq_lens=seq_lens)
    assert p.lengths.shape == (tokens.shape[0], max_patches)
    saw_overflow = False
    for b, s in enumerate(seq_lens.tolist()):
        full = ref_patch_lengths(tokens[b, :s].tolist(), h[b, :s].tolist(), config, True)
        if len(full) > max_patches:
            saw_overflow = True
            expected = full[: max_patches - 1] + [sum(full[max_patches - 1 :])]
        else:
            expected = full + [0] * (max_patches - len(full))
        assert p.lengths[b].tolist() == expected
        assert int(p.count[b]) == min(len(full), max_patches)
        assert bool(p.overflow[b]) == (len(full) > max_patches)
        assert int(p.needed[b]) == len(full)
        ids = patch_ids_from_lengths(p.lengths, tokens.shape[1])[b]
        assert int(ids.min()) >= 0 and int(ids.max()) < max_patches
    assert saw_overflow  # row 0 (24 bytes) has more than 9 patches


def test_max_patches_from_config():
    config = PatcherConfig(threshold=1.335, max_patches=3)
    p = patch(WORKED_TOKENS, WORKED_H, config)
    assert p.lengths[0].tolist() == [1, 2, 4] and p.overflow.tolist() == [True]


def test_lengths_from_starts_direct():
    starts = np.array([[1, 0, 1, 1, 0, 1, 0], [1, 1, 0, 0, 0, 0, 1]], bool)
    lengths, count, overflow, needed = lengths_from_starts(jnp.asarray(starts), 4, jnp.array([7, 4]))
    # Row 1: the start at 6 lies beyond total = 4 and is ignored.
    assert lengths.tolist() == [[2, 1, 2, 2], [1, 3, 0, 0]]
    assert count.tolist() == [4, 2] and overflow.tolist() == [False, False] and needed.tolist() == [4, 2]
    # Three slots: row 0's fourth patch (bytes 5-6) merges into the third; it needed 4.
    lengths, count, overflow, needed = lengths_from_starts(jnp.asarray(starts), 3, jnp.array([7, 4]))
    assert lengths.tolist() == [[2, 1, 4], [1, 3, 0]]
    assert count.tolist() == [3, 2] and overflow.tolist() == [True, False] and needed.tolist() == [4, 2]


def test_patch_ids_with_padding_and_zero_lengths():
    lengths = np.array([[1, 2, 0, 0], [1, 1, 1, 3], [3, 0, 0, 0]], np.int32)
    for n in (3, 6, 8):
        got = patch_ids_from_lengths(jnp.asarray(lengths), n)
        for b in range(3):
            assert got[b].tolist() == naive_patch_ids(lengths[b].tolist(), n)


# ---------------------------------------------------------------------------------------------------
# Hugging Face port (batch 1): same lengths up to its trailing zero-length patch, same patch ids.


def test_hf_port_equivalence_batch_one():
    torch = pytest.importorskip("torch")
    modeling_blt = pytest.importorskip("transformers.models.blt.modeling_blt")
    rng = np.random.default_rng(3)
    width = 40  # one compiled shape; each row's real length comes in through seq_lens
    fn = jax.jit(lambda h, s: patch(np.ones((1, width), np.int32), h, PatcherConfig(), seq_lens=s))
    ids_fn = jax.jit(
        lambda lengths: (
            patch_ids_from_lengths(lengths, width),
            decoder_patch_ids_from_lengths(lengths, width),
        )
    )
    hf_ids = modeling_blt.BltModel._patch_ids_from_lengths  # does not use `self`
    for trial in range(60):
        n = int(rng.integers(2, width + 1))
        h = rng.uniform(0, 2.7, size=(1, n)).astype(np.float32)
        if trial % 3 == 0:
            h = np.round(h * 2) / 2  # exercise all-start / no-start neighbourhoods
        hf = modeling_blt.BltPatcher.patch_lengths_from_entropies(
            torch.from_numpy(h), sequence_length=n, patch_size=4, threshold=THETA
        )
        ours = fn(np.pad(h, ((0, 0), (0, width - n))), np.array([n], np.int32))
        count = int(ours.count[0])
        hf_list = hf[0].tolist()
        assert sum(hf_list) == n
        assert ours.lengths[0, :count].tolist() == hf_list[:-1] + [hf_list[-1] + 1], f"trial {trial}"
        enc, dec = ids_fn(ours.lengths)
        np.testing.assert_array_equal(np.asarray(enc)[:, :n], hf_ids(None, hf, n).numpy())
        np.testing.assert_array_equal(np.asarray(dec)[:, :n], hf_ids(None, hf[:, 1:], n).numpy())


# ---------------------------------------------------------------------------------------------------
# Errors.


def test_errors():
    tokens = np.ones((2, 5), np.int32)
    h = np.zeros((2, 5), np.float32)
    with pytest.raises(ValueError, match="needs entropies"):
        patch(tokens, None, PatcherConfig())
    with pytest.raises(ValueError, match=r"entropies shape \(2, 4\) must equal tokens shape \(2, 5\)"):
        patch(tokens, h[:, :4], PatcherConfig())
    with pytest.raises(ValueError, match="top-k entropy mode is not supported; set patcher.threshold"):
        patch(tokens, h, PatcherConfig(threshold=None))
    with pytest.raises(ValueError, match="'bpe' is not one of"):
        patch(tokens, h, PatcherConfig(mode="bpe"))
    with pytest.raises(ValueError, match="max_patches must be a positive int"):
        patch(tokens, h, PatcherConfig(), max_patches=0)
    with pytest.raises(ValueError, match=r"seq_lens must be int\[batch\]"):
        patch(tokens, h, PatcherConfig(), seq_lens=np.array([5]))
    with pytest.raises(ValueError, match="max_patch_length must be >= 1"):
        patch(tokens, h, dataclasses.replace(PatcherConfig(), max_patch_length=0))
    with pytest.raises(ValueError, match=r"tokens must be int\[batch, bytes\]"):
        patch_start_mask(tokens[0], h[0], PatcherConfig())
