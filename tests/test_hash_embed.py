"""Hash n-gram ids in 32-bit arithmetic vs the reference's int64 rolling hash (notes §3)."""

import jax
import numpy as np
import pytest

from fastblt.config import HASH_PRIMES, HashConfig
from fastblt.model.hash_embed import all_hash_ids, hash_ids

HELLO = np.array([[1, 76, 105, 112, 112, 115, 48, 36, 123, 115, 118, 112, 104, 37]], np.int32)

# Verified vectors of notes §3 (prime 1000000007, vocab 500002, BOS + "Hello, world!").
VECTORS = {
    3: [
        443987,
        124875,
        393970,
        386145,
        358223,
        190185,
        141703,
        484917,
        141967,
        146186,
        10172,
        334275,
        306354,
        205291,
    ],
    4: [
        437197,
        433869,
        117936,
        254402,
        246577,
        30240,
        114083,
        12253,
        461502,
        217488,
        33292,
        467104,
        390141,
        114099,
    ],
    8: [
        172383,
        205585,
        456240,
        129346,
        299568,
        322649,
        430431,
        246559,
        94549,
        155186,
        258407,
        498251,
        491201,
        418709,
    ],
}


def signed_hashes(tokens: np.ndarray, n: int, prime: int) -> list[list[int]]:
    """Oracle: sum_i w[i] * prime**i as signed int64 with two's-complement wraparound (Python ints)."""
    out = []
    for row in tokens.tolist():
        hashes = []
        for t in range(len(row)):
            h = 0
            for i in range(n):
                p = t - n + 1 + i
                x = row[p] if p >= 0 else 0
                h = (h + x * prime**i) % 2**64
            hashes.append(h - 2**64 if h >= 2**63 else h)
        out.append(hashes)
    return out


def oracle_ids(tokens: np.ndarray, n: int, prime: int, vocab: int) -> np.ndarray:
    # Python's % is the floor remainder: the result lies in [0, vocab) for negative hashes too.
    return np.array([[h % vocab for h in row] for row in signed_hashes(tokens, n, prime)], np.int64)


@pytest.mark.parametrize("n", sorted(VECTORS))
def test_verified_vectors(n):
    ids = hash_ids(HELLO, n, 1000000007, 500002)
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(np.asarray(ids)[0], VECTORS[n])


def test_x64_is_not_enabled():
    # The point of the limb arithmetic: the result must be right with JAX's default 32-bit mode.
    assert not jax.config.jax_enable_x64


@pytest.mark.parametrize("prime", HASH_PRIMES)
def test_matches_int64_oracle_for_every_prime(prime):
    rng = np.random.default_rng(prime % 1000)
    tokens = rng.integers(0, 260, size=(2, 50)).astype(np.int32)
    tokens[1, -8:] = 259  # the largest id maximises the limb sums
    for n in (1, 2, 3, 5, 8):
        hashes = signed_hashes(tokens, n, prime)
        if n >= 3:
            assert any(h < 0 for row in hashes for h in row)  # the sign fix is exercised
        for vocab in (500002, 50002, 7, 2**22 + 3):
            expected = np.array([[h % vocab for h in row] for row in hashes])
            got = np.asarray(hash_ids(tokens, n, prime, vocab))
            np.testing.assert_array_equal(got, expected, err_msg=f"n={n} vocab={vocab}")


def test_largest_allowed_group_size_does_not_overflow():
    tokens = np.full((1, 260), 259, np.int32)
    tokens[0, ::7] = 0
    got = jax.jit(hash_ids, static_argnums=(1, 2, 3))(tokens, 253, HASH_PRIMES[6], 2**23 - 1)
    np.testing.assert_array_equal(np.asarray(got), oracle_ids(tokens, 253, HASH_PRIMES[6], 2**23 - 1))


def test_jit_and_vocab_one():
    tokens = np.arange(24, dtype=np.int32).reshape(2, 12) * 10
    jitted = jax.jit(hash_ids, static_argnums=(1, 2, 3))
    np.testing.assert_array_equal(
        np.asarray(jitted(tokens, 6, HASH_PRIMES[2], 1009)), oracle_ids(tokens, 6, HASH_PRIMES[2], 1009)
    )
    assert not np.asarray(hash_ids(tokens, 3, HASH_PRIMES[0], 1)).any()


def test_all_hash_ids_table_order():
    config = HashConfig(group_sizes=(4, 3), nb_functions=3, vocab=50002)
    tokens = np.random.default_rng(1).integers(0, 260, size=(2, 20)).astype(np.int32)
    got = np.asarray(jax.jit(all_hash_ids, static_argnums=1)(tokens, config))
    assert got.shape == (2, 20, 6) and got.dtype == np.int32
    for f in range(3):
        for j, n in enumerate((4, 3)):
            expected = oracle_ids(tokens, n, HASH_PRIMES[f], 50002)
            np.testing.assert_array_equal(got[..., f * 2 + j], expected, err_msg=f"table f={f} n={n}")


def test_all_hash_ids_default_config_shape():
    got = all_hash_ids(HELLO, HashConfig())
    assert got.shape == (1, 14, 6)
    np.testing.assert_array_equal(np.asarray(got[0, :, 0]), VECTORS[3])
    np.testing.assert_array_equal(np.asarray(got[0, :, 5]), VECTORS[8])


@pytest.mark.parametrize(
    ("n", "vocab", "match"),
    [
        (0, 100, "group_size must be a positive int"),
        (254, 100, r"group_size=254 could overflow.*group sizes <= 253"),
        (3, 0, r"hash vocab must be an int in \[1, 8388607\]"),
        (3, 2**23, r"hash vocab must be an int in \[1, 8388607\]"),
    ],
)
def test_bad_arguments(n, vocab, match):
    with pytest.raises(ValueError, match=match):
        hash_ids(HELLO, n, HASH_PRIMES[0], vocab)


def test_bad_token_shape():
    with pytest.raises(ValueError, match=r"int\[batch, bytes\]"):
        hash_ids(HELLO[0], 3, HASH_PRIMES[0], 100)


def test_too_many_functions():
    with pytest.raises(ValueError, match="nb_functions=12"):
        all_hash_ids(HELLO, HashConfig(nb_functions=12))
