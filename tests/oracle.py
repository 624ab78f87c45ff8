"""A naive, loop-based float64 numpy re-computation of BLT: the test oracle for the Flax model.

Written from the reference semantics (``shared/reference/blt-architecture.md``) and nothing else: no
code is shared with ``fastblt.model``. Everything is spelled out with explicit Python loops over batch
rows, positions, heads and patches so that each rule can be read off one line; speed does not matter
because the tests use tiny sizes.

Conventions (the reference's, not the Hugging Face port's):

* ``tokens``: int[B, N] byte ids (byte + 4; BOS = 1, EOS = 2).
* ``patch_lengths``: int[B, P] with ``lengths[:, 0] == 1`` and a per-row sum of N + 1 (the last patch
  may hold only the not-yet-seen "next" byte), rows right-padded with zeros. An HF-style row (sum N,
  possibly with a trailing zero-length patch) becomes reference-style by adding 1 to its last entry.
* ``params``: the Flax layout of the model (a nested dict; Dense kernels are (in, out), embeddings
  (vocab, dim), RMSNorm weights are ``scale``); see :func:`blt_forward`.
"""

from __future__ import annotations

import math

import numpy as np

from fastblt.config import EntropyModelConfig, LocalModelConfig, ModelConfig, TransformerConfig

EOS_ID = 2

# The reference's hash primes, copied from the notes rather than imported from fastblt.config so
# that a typo in either place shows up as a test failure instead of being shared.
PRIMES = (
    1000000007,
    5915587277,
    1500450271,
    3267000013,
    5754853343,
    4093082899,
    9576890767,
    3628273133,
    2860486313,
    5463458053,
    3367900313,
)

_TWO_64 = 1 << 64
_TWO_63 = 1 << 63


# --------------------------------------------------------------------------------------------------
# Hash n-gram ids (§3)
# --------------------------------------------------------------------------------------------------


def _wrap_int64(x: int) -> int:
    """Reduces a Python int to the signed int64 value that two's-complement wraparound gives."""
    return ((x + _TWO_63) % _TWO_64) - _TWO_63


def hash_ids_np(tokens, n: int, prime: int, vocab: int) -> np.ndarray:
    """Hash ids of the n-gram ending at each position: int64[B, N] in [0, vocab).

    The window of position t is [x_{t-n+1}, ..., x_t] with positions < 0 read as 0; the oldest byte is
    multiplied by prime^0 and the current one by prime^(n-1). Every product and sum wraps like signed
    int64 (the reference computes in torch int64), and the final reduction is a floor modulo (Python's
    ``%``), so the id is non-negative even when the wrapped hash is negative.
    """
    tokens = np.asarray(tokens)
    batch, length = tokens.shape
    out = np.zeros((batch, length), np.int64)
    powers = []
    p = 1
    for _ in range(n):
        powers.append(p)
        p = _wrap_int64(p * prime)  # prime^i overflows int64 from i = 3 on: wrap like the reference
    for b in range(batch):
        for t in range(length):
            h = 0
            for i in range(n):
                pos = t - n + 1 + i
                x = int(tokens[b, pos]) if pos >= 0 else 0
                h = _wrap_int64(h + _wrap_int64(x * powers[i]))
            out[b, t] = h % vocab  # Python % is the floor remainder: result in [0, vocab)
    return out


# --------------------------------------------------------------------------------------------------
# Patch ids (§4.5, §6.3)
# --------------------------------------------------------------------------------------------------


def patch_ids(lengths, n: int) -> np.ndarray:
    """Index of the patch containing each of the n bytes: int64[B, n].

    patch_id[t] = (number of patch starts s_p = sum(lengths[:p]) with s_p <= t) - 1. Zero-length
    (padding) patches start where the next one does, so a byte is given the last of several patches
    sharing its start; trailing zero-length patches start at the row sum and are never reached by a
    byte when the row sum is >= n.
    """
    lengths = np.asarray(lengths)
    batch, num_patches = lengths.shape
    out = np.zeros((batch, n), np.int64)
    for b in range(batch):
        starts = []
        acc = 0
        for p in range(num_patches):
            starts.append(acc)
            acc += int(lengths[b, p])
        for t in range(n):
            count = 0
            for s in starts:
                if s <= t:
                    count += 1
            out[b, t] = count - 1
    return out


def decoder_patch_ids(lengths, n: int) -> np.ndarray:
    """The patch whose global output byte t reads in the decoder: patch ids of lengths[:, 1:] (§6.3).

    Dropping the 1-byte BOS patch shifts every boundary one byte left, so byte t reads the last patch
    completed before byte t+1 (the byte it predicts).
    """
    lengths = np.asarray(lengths)
    return patch_ids(lengths[:, 1:], n)


# --------------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------------


def document_ids(tokens) -> np.ndarray:
    """Document index of each byte: the number of EOS tokens strictly before it (EOS ends its doc)."""
    tokens = np.asarray(tokens)
    batch, length = tokens.shape
    out = np.zeros((batch, length), np.int64)
    for b in range(batch):
        doc = 0
        for t in range(length):
            out[b, t] = doc
            if int(tokens[b, t]) == EOS_ID:
                doc += 1  # the EOS itself still belongs to the document it closes
    return out


def local_self_mask(tokens, window: int | None, document_masking: bool) -> np.ndarray:
    """bool[B, N, N]: key j visible to query i iff j <= i, i - j < window, and (optionally) same doc."""
    tokens = np.asarray(tokens)
    batch, length = tokens.shape
    docs = document_ids(tokens)
    mask = np.zeros((batch, length, length), bool)
    for b in range(batch):
        for i in range(length):
            for j in range(length):
                visible = j <= i
                if window is not None and i - j >= window:
                    visible = False
                if document_masking and docs[b, i] != docs[b, j]:
                    visible = False
                mask[b, i, j] = visible
    return mask


def global_self_mask(
    tokens, pids: np.ndarray, num_patches: int, window: int | None, document_masking: bool
) -> np.ndarray:
    """bool[B, P, P]: causal over patches; a patch holding an EOS byte ends a document (§5)."""
    tokens = np.asarray(tokens)
    batch, length = tokens.shape
    mask = np.zeros((batch, num_patches, num_patches), bool)
    for b in range(batch):
        has_eos = [False] * num_patches
        for t in range(length):
            if int(tokens[b, t]) == EOS_ID:
                has_eos[int(pids[b, t])] = True
        patch_doc = []
        doc = 0
        for p in range(num_patches):
            patch_doc.append(doc)
            if has_eos[p]:
                doc += 1
        for p in range(num_patches):
            for q in range(num_patches):
                visible = q <= p
                if window is not None and p - q >= window:
                    visible = False
                if document_masking and patch_doc[p] != patch_doc[q]:
                    visible = False
                mask[b, p, q] = visible
    return mask


def encoder_cross_mask(pids: np.ndarray, num_patches: int, k: int) -> np.ndarray:
    """bool[B, P*k, N]: patch slot s sees exactly the bytes of patch s // k."""
    batch, length = pids.shape
    mask = np.zeros((batch, num_patches * k, length), bool)
    for b in range(batch):
        for s in range(num_patches * k):
            for t in range(length):
                mask[b, s, t] = int(pids[b, t]) == s // k
    return mask


def decoder_cross_mask(dpids: np.ndarray, num_patches: int, k: int) -> np.ndarray:
    """bool[B, N, P*k]: byte t sees exactly the k slots of patch dpid[t]."""
    batch, length = dpids.shape
    mask = np.zeros((batch, length, num_patches * k), bool)
    for b in range(batch):
        for t in range(length):
            for s in range(num_patches * k):
                mask[b, t, s] = int(dpids[b, t]) == s // k
    return mask


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def dense(p: dict, x: np.ndarray) -> np.ndarray:
    """A bias-free Linear with a Flax kernel of shape (in, out).

    einsum rather than ``@``: it does not go through multi-threaded BLAS, whose threads wait on each
    other for tens of ms per tiny matmul when the 2 test cores are busy.
    """
    return np.einsum("...i,io->...o", x, _f64(p["kernel"]))


def rms_norm(p: dict, x: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * scale, over the last axis."""
    ms = np.mean(x * x, axis=-1, keepdims=True)
    return x / np.sqrt(ms + eps) * _f64(p["scale"])


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def rope(x: np.ndarray, positions, theta: float) -> np.ndarray:
    """Rotates interleaved pairs (x[2i], x[2i+1]) of x: float[T, head_dim] by pos * theta^(-2i/hd)."""
    length, hd = x.shape
    out = np.empty_like(x)
    for t in range(length):
        for i in range(hd // 2):
            angle = float(positions[t]) * theta ** (-(2.0 * i) / hd)
            c, s = math.cos(angle), math.sin(angle)
            x0, x1 = x[t, 2 * i], x[t, 2 * i + 1]
            out[t, 2 * i] = x0 * c - x1 * s
            out[t, 2 * i + 1] = x0 * s + x1 * c
    return out


def _attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """One query vector against keys/values [K, hd] where visible; exactly 0 when none is visible."""
    idx = [j for j in range(k.shape[0]) if visible[j]]
    if not idx:
        return np.zeros(v.shape[1])  # flex-attention's result for an empty row (ref semantics)
    scores = np.array([q @ k[j] for j in idx]) / math.sqrt(q.shape[0])
    scores = scores - scores.max()
    w = np.exp(scores)
    w = w / w.sum()
    out = np.zeros(v.shape[1])
    for weight, j in zip(w, idx, strict=True):
        out += weight * v[j]
    return out


def self_attention(p: dict, x: np.ndarray, mask: np.ndarray, cfg: TransformerConfig) -> np.ndarray:
    """Multi-head (or grouped-query) self-attention with RoPE over positions 0..T-1: [B, T, D]."""
    batch, length, _ = x.shape
    heads, kv_heads, hd = cfg.n_heads, cfg.kv_heads, cfg.head_dim
    group = heads // kv_heads
    q = dense(p["wq"], x).reshape(batch, length, heads, hd)
    k = dense(p["wk"], x).reshape(batch, length, kv_heads, hd)
    v = dense(p["wv"], x).reshape(batch, length, kv_heads, hd)
    positions = list(range(length))
    out = np.zeros((batch, length, heads, hd))
    for b in range(batch):
        for h in range(heads):
            kvh = h // group  # query head h shares kv head h // (heads / kv_heads)
            qh = rope(q[b, :, h], positions, cfg.rope_theta)
            kh = rope(k[b, :, kvh], positions, cfg.rope_theta)
            for i in range(length):
                out[b, i, h] = _attend(qh[i], kh, v[b, :, kvh], mask[b, i])
    return dense(p["wo"], out.reshape(batch, length, heads * hd))


def feed_forward(p: dict, x: np.ndarray) -> np.ndarray:
    """SwiGLU: w2(silu(w1 x) * w3 x)."""
    return dense(p["w2"], silu(dense(p["w1"], x)) * dense(p["w3"], x))


def transformer_block(p: dict, x: np.ndarray, mask: np.ndarray, cfg: TransformerConfig) -> np.ndarray:
    """Pre-norm block: x + attn(norm(x)), then + ffn(norm(.))."""
    h = x + self_attention(p["attention"], rms_norm(p["attention_norm"], x, cfg.norm_eps), mask, cfg)
    return h + feed_forward(p["feed_forward"], rms_norm(p["ffn_norm"], h, cfg.norm_eps))


def cross_attention(
    p: dict, queries: np.ndarray, keys: np.ndarray, mask: np.ndarray, n_heads: int, eps: float
) -> np.ndarray:
    """wo(attn(norm_q(queries), norm_kv(keys))) without RoPE: [B, Q, D]. Residuals are the caller's.

    All heads (queries and keys/values alike) are ``n_heads`` wide: no grouped kv in cross-attention.
    """
    batch, nq, dim = queries.shape
    hd = dim // n_heads
    q_in = rms_norm(p["cross_attn_norm_q"], queries, eps)
    kv_in = rms_norm(p["cross_attn_norm_kv"], keys, eps)
    q = dense(p["wq"], q_in).reshape(batch, nq, n_heads, hd)
    k = dense(p["wk"], kv_in).reshape(batch, keys.shape[1], n_heads, hd)
    v = dense(p["wv"], kv_in).reshape(batch, keys.shape[1], n_heads, hd)
    out = np.zeros((batch, nq, n_heads, hd))
    for b in range(batch):
        for h in range(n_heads):
            for i in range(nq):
                out[b, i, h] = _attend(q[b, i, h], k[b, :, h], v[b, :, h], mask[b, i])
    return dense(p["wo"], out.reshape(batch, nq, n_heads * hd))


# --------------------------------------------------------------------------------------------------
# BLT stages
# --------------------------------------------------------------------------------------------------


def hash_embeddings(params: dict, config: ModelConfig, tokens: np.ndarray) -> np.ndarray:
    """Byte embedding plus one hash-table row per (function, group size): float64[B, N, De] (§3)."""
    e = _f64(params["local_encoder"]["tok_embeddings"]["embedding"])[tokens]
    sizes = config.hash.group_sizes
    for f in range(config.hash.nb_functions):
        for idx, n in enumerate(sizes):
            table = _f64(params["hash_embed"][f"table_{f * len(sizes) + idx}"]["embedding"])
            e = e + table[hash_ids_np(tokens, n, PRIMES[f], config.hash.vocab)]
    return e


def pool_patches(h: np.ndarray, pids: np.ndarray, num_patches: int) -> np.ndarray:
    """Elementwise max over the bytes of each patch: [B, P, D]; a patch with no byte stays zeros."""
    batch, length, dim = h.shape
    out = np.zeros((batch, num_patches, dim))
    for b in range(batch):
        for p in range(num_patches):
            rows = [h[b, t] for t in range(length) if int(pids[b, t]) == p]
            if rows:
                out[b, p] = np.max(np.stack(rows), axis=0)
    return out


def to_slots(x: np.ndarray, k: int) -> np.ndarray:
    """[B, P, k*D] -> [B, P*k, D]: slot s is patch s // k, columns [(s % k) * D, (s % k + 1) * D)."""
    batch, num_patches, width = x.shape
    dim = width // k
    out = np.zeros((batch, num_patches * k, dim))
    for s in range(num_patches * k):
        p, j = s // k, s % k
        out[:, s] = x[:, p, j * dim : (j + 1) * dim]
    return out


def from_slots(x: np.ndarray, k: int) -> np.ndarray:
    """[B, P*k, D] -> [B, P, k*D], the inverse of :func:`to_slots`."""
    batch, num_slots, dim = x.shape
    out = np.zeros((batch, num_slots // k, k * dim))
    for s in range(num_slots):
        p, j = s // k, s % k
        out[:, p, j * dim : (j + 1) * dim] = x[:, s]
    return out


def local_encoder(
    p: dict,
    cfg: LocalModelConfig,
    e: np.ndarray,
    self_mask: np.ndarray,
    pids: np.ndarray,
    num_patches: int,
    k: int,
    repool_every_layer: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Encoder layers and patch cross-attention: (byte states [B, N, De], patch slots [B, P*k, De])."""
    cross_mask = encoder_cross_mask(pids, num_patches, k)

    def init_slots(h: np.ndarray) -> np.ndarray:
        return to_slots(dense(p["patch_embedding_projection"], pool_patches(h, pids, num_patches)), k)

    h = e
    pe = None
    for i in range(cfg.n_layers):
        h = transformer_block(p[f"layers_{i}"], h, self_mask, cfg)
        if cfg.cross_attn_all_layers:
            # Reference: pool once (first cross-attn), then refine the running slots with each
            # layer's h. HF port: re-pool and re-project from the current h before every cross-attn.
            if pe is None or repool_every_layer:
                pe = init_slots(h)
            cross = p[f"cross_attn_layers_{i}"]
        elif i == cfg.n_layers - 1:
            pe = init_slots(h)
            cross = p["cross_attn_layers_0"]
        else:
            continue
        out = cross_attention(cross, pe, h, cross_mask, cfg.cross_heads, cfg.norm_eps)
        # The cross-attn module returns pe + out and its caller adds pe again: 2 * pe + out.
        pe = 2.0 * pe + out
    return h, pe


def global_transformer(p: dict, cfg: TransformerConfig, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Input projection iff k*De != Dg, then causal blocks over patch positions 0..P-1; no final norm."""
    if x.shape[-1] != cfg.dim:
        h = dense(p["token_embedding_projection"], x)
    elif "token_embedding_projection" in p:
        raise ValueError("token_embedding_projection given although k * encoder.dim == global dim")
    else:
        h = x
    for i in range(cfg.n_layers):
        h = transformer_block(p[f"layers_{i}"], h, mask, cfg)
    return h


def local_decoder(
    p: dict,
    cfg: LocalModelConfig,
    h: np.ndarray,
    g: np.ndarray,
    self_mask: np.ndarray,
    dpids: np.ndarray,
    k: int,
) -> np.ndarray:
    """Decoder on the encoder byte states h, reading the k slots of patch dpid[t]: hidden [B, N, Dd]."""
    num_patches = g.shape[1]
    slots = to_slots(dense(p["patch_embedding_projection"], g), k)
    cross_mask = decoder_cross_mask(dpids, num_patches, k)
    for i in range(cfg.n_layers):
        if i == 0 or cfg.cross_attn_all_layers:
            cross = p[f"cross_attn_layers_{i}"]
            out = cross_attention(cross, h, slots, cross_mask, cfg.cross_heads, cfg.norm_eps)
            h = 2.0 * h + out  # same double residual as the encoder's cross-attention
        h = transformer_block(p[f"layers_{i}"], h, self_mask, cfg)
    return h


def _check_lengths(lengths: np.ndarray, n: int) -> None:
    """Rejects patch lengths that do not follow the reference convention (first 1, row sum n + 1)."""
    if lengths.ndim != 2:
        raise ValueError(f"patch_lengths must be [batch, patches], got shape {lengths.shape}")
    for b in range(lengths.shape[0]):
        row = [int(v) for v in lengths[b]]
        if row[0] != 1 or min(row) < 0 or sum(row) != n + 1:
            raise ValueError(
                f"patch_lengths row {b} = {row} must start with 1, be >= 0 and sum to {n + 1} "
                "(reference convention; add 1 to the last entry of an HF-style row)"
            )


def blt_forward(
    params: dict,
    config: ModelConfig,
    tokens,
    patch_lengths,
    intermediates: dict | None = None,
) -> np.ndarray:
    """Logits float64[B, N, vocab] of BLT with reference semantics and externally given patches.

    Args:
      params: the Flax parameter tree (see the module docstring); arrays of any float dtype.
      config: the model config; windows, thetas, eps, k and document masking are read from it.
      tokens: int[B, N].
      patch_lengths: int[B, P], reference convention (first 1, row sum N + 1, right-padded zeros).
      intermediates: if a dict, filled with "encoder_hidden" [B, N, De], "patch_embeds"
        [B, P, k*De] (global input before its projection), "global_hidden" [B, P, Dg] and
        "decoder_hidden" [B, N, Dd] (before the final norm), for layer-by-layer comparisons.
    """
    tokens = np.asarray(tokens).astype(np.int64)
    lengths = np.asarray(patch_lengths).astype(np.int64)
    _, length = tokens.shape
    _check_lengths(lengths, length)
    num_patches = lengths.shape[1]
    k = config.cross_attn_k

    pids = patch_ids(lengths, length)
    dpids = decoder_patch_ids(lengths, length)

    e = hash_embeddings(params, config, tokens)
    enc_mask = local_self_mask(tokens, config.encoder.window, config.document_masking)
    h, pe = local_encoder(
        params["local_encoder"],
        config.encoder,
        e,
        enc_mask,
        pids,
        num_patches,
        k,
        config.encoder_repool_every_layer,
    )
    patch_embeds = from_slots(pe, k)

    gmask = global_self_mask(tokens, pids, num_patches, config.global_model.window, config.document_masking)
    g = global_transformer(params["global_transformer"], config.global_model, patch_embeds, gmask)

    dec_mask = local_self_mask(tokens, config.decoder.window, config.document_masking)
    dec = params["local_decoder"]
    hd = local_decoder(dec, config.decoder, h, g, dec_mask, dpids, k)
    logits = dense(dec["output"], rms_norm(dec["norm"], hd, config.decoder.norm_eps))
    if intermediates is not None:
        intermediates.update(encoder_hidden=h, patch_embeds=patch_embeds, global_hidden=g, decoder_hidden=hd)
    return logits


# --------------------------------------------------------------------------------------------------
# Entropy model (§2.1, §2.2)
# --------------------------------------------------------------------------------------------------


def entropy_model_forward(params: dict, ecfg: EntropyModelConfig, tokens) -> np.ndarray:
    """Next-byte logits float64[B, N, vocab] of the byte LM that places patch boundaries."""
    tokens = np.asarray(tokens).astype(np.int64)
    h = _f64(params["tok_embeddings"]["embedding"])[tokens]
    mask = local_self_mask(tokens, ecfg.window, ecfg.document_masking)
    for i in range(ecfg.n_layers):
        h = transformer_block(params[f"layers_{i}"], h, mask, ecfg)
    return dense(params["output"], rms_norm(params["norm"], h, ecfg.norm_eps))


def entropies(logits) -> np.ndarray:
    """Entropy in nats of the softmax over the last axis: -sum p log p."""
    x = _f64(logits)
    x = x - x.max(axis=-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return -(np.exp(logp) * logp).sum(axis=-1)
