"""Hash n-gram ids of the BLT reference, exact, in 32-bit integer arithmetic.

The reference hashes the window ``w = [x[t-n+1], ..., x[t]]`` of token ids (positions before the row
start read 0) as ``h = sum_i w[i] * prime**i`` in signed int64 with two's-complement wraparound, and
takes ``h mod vocab`` with floor semantics (result in ``[0, vocab)`` also for negative ``h``).

TPUs have no int64 and JAX runs 32-bit by default, so this module reproduces that value bit-exactly
with uint32 only: the 64-bit coefficients ``prime**i mod 2**64`` are split on the host into four 16-bit
limbs, per-limb sums are accumulated (small token ids keep them below 2**32), carries are propagated to
get ``u = h mod 2**64``, and ``u mod vocab`` is reduced byte by byte. The sign is fixed at the end:
if ``u >= 2**63`` the signed value is ``u - 2**64``.
"""

from __future__ import annotations

import jax.numpy as jnp

from fastblt.config import HASH_PRIMES, HashConfig

# Token ids are < 260 < 2**9; the per-limb sums are only guaranteed to fit in uint32 below this bound.
MAX_TOKEN_ID = 259
_LIMB_BITS = 16
_LIMB_MASK = (1 << _LIMB_BITS) - 1
_N_LIMBS = 4
# Byte-wise Horner keeps r * 256 + 255 below 2**31.
MAX_HASH_VOCAB = (1 << 23) - 1


def _check_args(group_size: int, vocab: int) -> None:
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"hash group_size must be a positive int, got {group_size!r}")
    if group_size * MAX_TOKEN_ID * _LIMB_MASK >= 1 << 32:
        max_n = ((1 << 32) - 1) // (MAX_TOKEN_ID * _LIMB_MASK)
        raise ValueError(
            f"hash group_size={group_size} could overflow the 32-bit limb sums "
            f"(group_size * {MAX_TOKEN_ID} * {_LIMB_MASK} must be < 2**32); use group sizes <= {max_n}"
        )
    if not isinstance(vocab, int) or not 1 <= vocab <= MAX_HASH_VOCAB:
        raise ValueError(
            f"hash vocab must be an int in [1, {MAX_HASH_VOCAB}] (2**23 - 1, the bound of the 32-bit "
            f"modular reduction), got {vocab!r}; use a smaller hash vocabulary"
        )


def _coefficient_limbs(group_size: int, prime: int) -> list[list[int]]:
    """``[i][l]``: 16-bit limb ``l`` (least significant first) of ``prime**i mod 2**64``."""
    out = []
    for i in range(group_size):
        c = pow(prime, i, 1 << 64)
        out.append([(c >> (_LIMB_BITS * limb)) & _LIMB_MASK for limb in range(_N_LIMBS)])
    return out


def hash_ids(tokens: jnp.ndarray, group_size: int, prime: int, vocab: int) -> jnp.ndarray:
    """Hash n-gram ids of one (group size, prime) pair.

    Args:
      tokens: int32[batch, bytes], token ids in ``[0, 260)`` (larger ids can overflow the limb sums).
      group_size: n, the window length (static).
      prime: the hash multiplier (static), e.g. ``HASH_PRIMES[f]``.
      vocab: number of buckets (static), at most 2**23 - 1.

    Returns:
      int32[batch, bytes] ids in ``[0, vocab)``, equal to the reference's int64 computation.
    """
    _check_args(group_size, vocab)
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be int[batch, bytes], got shape {tokens.shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}")
    seq = tokens.shape[1]
    # Left zero padding: positions before the row start read id 0, as in the reference.
    padded = jnp.pad(tokens.astype(jnp.uint32), ((0, 0), (group_size - 1, 0)))

    sums = [jnp.zeros(tokens.shape, jnp.uint32) for _ in range(_N_LIMBS)]
    for i, limbs in enumerate(_coefficient_limbs(group_size, prime)):
        window_i = padded[:, i : i + seq]  # w[i] = x[t - n + 1 + i]; the oldest byte gets prime**0
        for limb, c in enumerate(limbs):
            if c:
                sums[limb] = sums[limb] + window_i * jnp.uint32(c)

    # Carry propagation. Each sum is split into 16-bit halves first so no addition can exceed 2**18.
    u = []
    carry = jnp.zeros(tokens.shape, jnp.uint32)
    for limb in range(_N_LIMBS):
        high_prev = sums[limb - 1] >> _LIMB_BITS if limb else jnp.zeros_like(carry)
        total = (sums[limb] & _LIMB_MASK) + high_prev + carry
        u.append(total & _LIMB_MASK)
        carry = total >> _LIMB_BITS  # carries out of the top limb are the mod 2**64 wraparound

    # u mod vocab by Horner over the 8 bytes of u, most significant first.
    v = jnp.uint32(vocab)
    r = jnp.zeros(tokens.shape, jnp.uint32)
    for limb in reversed(range(_N_LIMBS)):
        for shift in (8, 0):
            byte = (u[limb] >> shift) & 0xFF
            r = (r * 256 + byte) % v

    # Negative h: h = u - 2**64, so h mod vocab = (r - 2**64 mod vocab) mod vocab; adding
    # vocab - (2**64 mod vocab) in [1, vocab] keeps everything non-negative.
    negative = u[_N_LIMBS - 1] >= (1 << (_LIMB_BITS - 1))
    shifted = (r + jnp.uint32(vocab - (1 << 64) % vocab)) % v
    return jnp.where(negative, shifted, r).astype(jnp.int32)


def table_order(hash_config: HashConfig) -> list[tuple[int, int]]:
    """``(prime, group_size)`` of each hash table in the reference order (function outer, size inner)."""
    if not 0 <= hash_config.nb_functions <= len(HASH_PRIMES):
        raise ValueError(
            f"hash.nb_functions={hash_config.nb_functions} must be in [0, {len(HASH_PRIMES)}] "
            "(one prime per function)"
        )
    return [(HASH_PRIMES[f], n) for f in range(hash_config.nb_functions) for n in hash_config.group_sizes]


def all_hash_ids(tokens: jnp.ndarray, hash_config: HashConfig) -> jnp.ndarray:
    """Ids of every hash table: ``int32[batch, bytes, n_tables]``.

    Table ``f * len(group_sizes) + j`` uses prime ``HASH_PRIMES[f]`` and group size ``group_sizes[j]``.
    """
    order = table_order(hash_config)
    if not order:
        return jnp.zeros((*tokens.shape, 0), jnp.int32)
    return jnp.stack([hash_ids(tokens, n, prime, hash_config.vocab) for prime, n in order], axis=-1)
