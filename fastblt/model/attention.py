"""The attention entry point and the masks BLT needs.

All self-attention in the model goes through :func:`attention` (dense keys with a boolean mask, or a
:class:`LocalMask` *description* of a causal, windowed, same-document mask); the cross-attentions
(the encoder's patch slots over their bytes, the decoder's rows over their patch's slots) are
:mod:`fastblt.model.cross_attention`, which uses this module's dispatch. Both give exactly 0 for a query with no visible key, as the reference's
flex-attention does, and never NaN: a NaN in a masked row would leak into other rows through
0 * NaN in later matmuls.

Which kernel runs is decided in one place, :func:`resolve_impl`, for the platform the step is
compiled for (:func:`target_platform`). On the fused (cuDNN) path a LocalMask is never
materialised: causal and window are the kernel's own masks, and documents are cuDNN's packed layout
(one segment per document, offsets from the document ids), so a layer costs what its visible keys
cost. A batch with a row of more than ``max_segments`` documents takes the mask-as-bias path for
that call (same values, slower). On TPU a LocalMask runs on the Pallas splash-attention kernel
(:mod:`fastblt.model.splash`: causal and window as its block-sparse masks, documents as segment
ids, any number of them). Decode steps (a few queries over a cache under a dense mask) may run on
one Pallas kernel on a GPU (:mod:`fastblt.model.decode_attention`, :data:`GPU_DECODE_KERNEL`). The
XLA path is the reference.

Every mask of a training step is also a key range per query (:mod:`fastblt.model.range_attention`):
causal windows within documents, the encoder's patch slots over their bytes, the decoder's rows over
their patch's slots, BLT-D's block cells over their context. On one GPU the switches
:data:`GPU_SELF_RANGES`, ``cross_attention.GPU_CROSS_RANGES`` and ``block_rows.GPU_RANGE_KERNEL`` run
those calls on that one Pallas kernel instead (:func:`range_kernel_applies`): the last two are on,
the first is off (cuDNN was faster on self-attention; experiments/results/train_speed.md, run 10).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from fastblt.config import ATTENTION_IMPLS
from fastblt.model import range_attention
from fastblt.model.decode_attention import decode_attention
from fastblt.model.decode_attention import supported as decode_supported
from fastblt.model.splash import splash_local

_NEG = -1e30  # finite: an all-masked row stays finite before it is zeroed

Attend = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]
"""A transformer layer's attention (fastblt.model.layers.transformer_layer): ``attend(q, k, v) ->
(out, aux)`` with q: float[B, T, H, hd], k, v: float[B, T, KV, hd] (the layer's new rows, rotated)
and out: float[B, T, H, hd]. It decides which keys the queries see (a mask, extra context, a cache)
and where the new keys go; ``aux`` is what the layer's caller gets back (the keys, written caches,
or None)."""

# Documents per row the fused kernels' packed layout holds (a static shape); a batch with a row of
# more takes the bias path. cuDNN's grid grows with it (empty segments still launch their tiles): at
# [16, 4096, 8, 64], window 512, forward + backward took 1.54 / 1.64 / 3.39 ms with 4 / 8 / 64
# segments against 2.80 ms on the bias path (H200, experiments/results/train_speed.md). Rows of 4096
# bytes of the default corpus hold 1-4 documents.
MAX_SEGMENTS = 8
# The packed layouts a host-checked train step may take (:func:`segment_tier`), smallest first: a
# batch whose rows all hold at most 4 documents runs 4 segments per row. Measured on one H200
# (attention_check.py, forward + backward, 2026-12-05): the global model's attention 0.566 against
# 0.655 ms per layer with 4 segments instead of 8, the decoder's 1.535 against 1.645 ms.
SEGMENT_TIERS = (4, MAX_SEGMENTS)

# Set inside :func:`rows_checked` to the segments per row the host checked every row of the batch
# against: LocalMasks on cuDNN take the packed layout of that many segments without a per-layer
# lax.cond. Each such conditional copies its predicate to the host and waits for the device (XLA
# GPU's conditional thunk): at blt_mid on an H200 the ~34 per step cost 10 ms of 90
# (experiments/results/train_speed.md). None: not checked.
_ROWS_CHECKED: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "fastblt_rows_checked", default=None
)


# Set inside :func:`target_platform`: the platform the traced step will run on, when it is not JAX's
# default backend (ahead-of-time compilation for TPU on a CPU host, fastblt/train/aot.py).
_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastblt_platform", default=None)


@contextlib.contextmanager
def target_platform(platform: str) -> Iterator[None]:
    """Traces attention for ``platform`` ("cpu", "gpu", "tpu") instead of JAX's default backend:
    :func:`resolve_impl` picks that platform's kernels and the splash kernel is compiled for TPU
    rather than interpreted. Read while tracing, like :func:`rows_checked`: enter it around the
    tracing and lowering of a function jitted on its own."""
    token = _PLATFORM.set(platform)
    try:
        yield
    finally:
        _PLATFORM.reset(token)


def platform() -> str:
    """The platform attention is traced for: :func:`target_platform`'s, else JAX's default backend."""
    return _PLATFORM.get() or jax.default_backend()


@contextlib.contextmanager
def rows_checked(max_segments: int = MAX_SEGMENTS) -> Iterator[None]:
    """Traces attention for a batch whose rows all passed :func:`rows_fit_packed` with
    ``max_segments`` on the host: LocalMasks on cuDNN use the packed layout of ``max_segments``
    segments per row unconditionally (a row of more documents would be masked wrongly, so nothing
    else may be traced inside). The context is read while tracing and jit's caches do not see it:
    enter it inside a function jitted on its own (as ``fastblt.train.loop.Trainer``'s packed steps
    do), never jit one function both inside and outside it."""
    if max_segments < 1:
        raise ValueError(f"max_segments must be >= 1, got {max_segments}")
    token = _ROWS_CHECKED.set(max_segments)
    try:
        yield
    finally:
        _ROWS_CHECKED.reset(token)


def segments_needed(tokens: np.ndarray, eos_id: int = 2) -> int:
    """Host bound on the documents any LocalMask of a step over ``tokens`` holds in one row: a
    row's EOS bytes plus one. That covers the byte-level documents (:func:`document_ids`: an EOS
    ends a document) and the global model's patch-level ones, where a row's last EOS can open one
    more document in the patch slots after it.

    Args: tokens: int[batch, bytes] (numpy, before it goes to the device)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be int[batch, bytes], got shape {tokens.shape}")
    return int((np.sum(tokens == eos_id, axis=1) + 1).max(initial=1))


def rows_fit_packed(tokens: np.ndarray, max_segments: int = MAX_SEGMENTS, eos_id: int = 2) -> bool:
    """Host check: every LocalMask of a step over ``tokens`` (int[batch, bytes]) holds at most
    ``max_segments`` documents per row (:func:`segments_needed`)."""
    return segments_needed(tokens, eos_id) <= max_segments


def segment_tier(tokens: np.ndarray, tiers: Iterable[int] | None = None, eos_id: int = 2) -> int | None:
    """The smallest of ``tiers`` (default :data:`SEGMENT_TIERS`) every row of ``tokens``
    (int[batch, bytes]) fits, or None when a row holds more documents than the largest (its step
    checks per layer)."""
    need = segments_needed(tokens, eos_id)
    return min((m for m in (SEGMENT_TIERS if tiers is None else tiers) if need <= m), default=None)


@flax.struct.dataclass
class LocalMask:
    """A causal, sliding-window, same-document self-attention mask described by ids.

    Rows whose positions are 0..N-1 (a training or prefill forward) never materialise the N x N
    mask: with a window W and N >= 2W, the XLA path works block by block (each block of W queries
    against its own and the previous W keys), so memory grows as N * 2W, not N^2; the fused path
    hands causal, window and documents to the kernel.
    """

    positions: jax.Array  # int32[batch, len]: 0..len-1 (row indices) for the blockwise/fused paths
    # int32[batch, len] document ids as :func:`document_ids` makes them (0, 1, ... non-decreasing
    # along the row), or None (no document masking)
    docs: jax.Array | None
    window: int | None = flax.struct.field(pytree_node=False)  # static: shapes depend on it
    max_segments: int = flax.struct.field(pytree_node=False, default=MAX_SEGMENTS)

    def dense(self) -> jax.Array:
        return causal_mask(self.positions, self.positions, self.window, self.docs, self.docs)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | LocalMask,
    impl: str = "xla",
    visible_keys: int | None = None,
    first_key: jax.Array | None = None,
) -> jax.Array:
    """Scaled dot-product attention with grouped kv heads.

    Args:
      q: float[batch, q_len, heads, head_dim].
      k, v: float[batch, kv_len, kv_heads, head_dim]; kv_heads divides heads.
      mask: bool[batch, q_len, kv_len] (True = visible), or a LocalMask for self-attention.
      impl: "xla" (the reference path: float32 softmax, written here), "cudnn" (the fused cuDNN
        kernel through ``jax.nn.dot_product_attention``, the mask as a bias; GPU, bf16/fp16 only),
        "splash" (JAX's Pallas TPU splash-attention kernel, :mod:`fastblt.model.splash`, for a
        LocalMask; off TPU it runs in Pallas interpret mode, which is how the CPU tests run it) or
        "auto" (:func:`resolve_impl` decides). A LocalMask call that resolves to "cudnn" runs on the
        key-range kernel instead with :data:`GPU_SELF_RANGES` (:func:`range_kernel_applies`). Dense masks (cross-attention, BLT-D's block rows, the
        sampler's caches) have no splash form and take the XLA path under "splash": the kernel's
        masks are static or one dense [heads, q, k] array shared by the batch, while these are
        per-row, data-dependent key sets.
      visible_keys: the most keys one row's queries can see under a dense ``mask`` (a static bound,
        e.g. a sliding window's ``window + q_len - 1``; None: kv_len). Only the decode kernel reads
        it, to size its key splits (fastblt.model.decode_attention.key_splits).
      first_key: int32[batch], for a ring cache: the slot of the oldest position the queries can see
        (fastblt.model.decode_attention.visible_range); only the decode kernel reads it.

    Returns:
      float[batch, q_len, heads, head_dim] in q's dtype; rows with no visible key are 0.
    """
    if isinstance(mask, LocalMask):
        kernel = resolve_impl(impl, q, local=True)
        if kernel == "splash":
            return splash_local(q, k, v, mask.docs, mask.window, interpret=platform() != "tpu")
        if q.shape[1] == k.shape[1] and range_kernel_applies(GPU_SELF_RANGES, kernel, q, k):
            lo, hi = (
                jnp.broadcast_to(x, q.shape[:2])
                for x in range_attention.local_ranges(mask.docs, q.shape[1], mask.window)
            )
            return range_attention.range_attention(q, k, v, lo, hi)[0]
        if kernel == "cudnn":
            return _cudnn_local(q, k, v, mask)
        if mask.window is not None and q.shape[1] >= 2 * mask.window:
            return _blockwise_local(q, k, v, mask, "xla")
        mask = mask.dense()
    kernel = resolve_impl(impl, q, kv_heads=k.shape[2])
    if kernel == "decode":
        return _decode_kernel(q, k, v, mask, first_key, visible_keys)
    b, t, h, d = q.shape
    kv = k.shape[2]
    has_key = jnp.any(mask, axis=-1)[:, :, None, None]  # [b, t, 1, 1]
    if kernel == "xla":
        g = h // kv
        rows = query_rows(t, g)
        if rows > t:  # zero queries that see no key: their rows are cut off below
            q = jnp.pad(q, ((0, 0), (0, rows - t), (0, 0), (0, 0)))
            mask = jnp.pad(mask, ((0, 0), (0, rows - t), (0, 0)))
        qg = q.reshape(b, rows, kv, g, d)
        logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
        logits = logits * (d**-0.5)
        logits = jnp.where(mask[:, None, None], logits, _NEG)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, rows, h, d)[:, :t]
    else:
        out = _cudnn(q, k, v, mask)
    return jnp.where(has_key, out, 0).astype(q.dtype)


# Fewest query rows per (batch row, kv head) in the XLA path's two products on a GPU; 1 turns the
# padding off. With one row (a decode step at batch > 1 without inert columns) XLA runs each product
# as a reduction fusion instead of a GEMM: at BLT-1B shapes, batch 32, 0.556 ms per byte, against
# 0.146 ms as GEMMs at batch 1 where the sampler's inert column gives two rows
# (experiments/results/generate_speed.md, run 8). A zero query row costs one more row of scores.
# With the decode kernel on (GPU_DECODE_KERNEL) only calls the kernel does not support take this path;
# run 9 (H100) measured the padding within noise of none: ar at batch 32 2.33 ms padded against 2.25,
# blt_s8 1.42 ms per pass against 1.47.
GPU_MIN_QUERY_ROWS = 2


def query_rows(t: int, group: int) -> int:
    """Query rows the XLA path runs for ``t`` queries of ``group`` heads per kv head: ``t``, or
    more on a GPU (:data:`GPU_MIN_QUERY_ROWS` rows per product, decided for :func:`platform`)."""
    if platform() != "gpu" or t * group >= GPU_MIN_QUERY_ROWS:
        return t
    return -(-GPU_MIN_QUERY_ROWS // group)


# "auto" runs a fused kernel only for at least this many queries: the decode steps of the sampler
# (1 to ~17 queries) stay on the XLA path, whose small matmuls cost less than a fused launch, or on
# the decode kernel (GPU_DECODE_KERNEL).
AUTO_MIN_QUERIES = 64

# What "auto" runs on a GPU for fewer than AUTO_MIN_QUERIES queries under a dense mask (the sampler's
# decode steps): "xla" (the reference path, ~7 kernels per layer and step) or "decode" (one Pallas
# Triton kernel, fastblt.model.decode_attention). Measured on one H100 at BLT-1B shapes, in one run
# (experiments/results/generate_speed.md, run 9): ar 1.52 -> 1.43 ms per byte at batch 1 and
# 2.33 -> 1.82 ms per step at batch 32; blt_s8 1.67 -> 1.44 and 3.41 -> 2.63 ms per byte.
GPU_DECODE_KERNEL = "decode"


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _decode_kernel(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    first_key: jax.Array | None,
    visible_keys: int | None,
) -> jax.Array:
    """fastblt.model.decode_attention (forward only) with the XLA path's gradient, so a differentiated
    call that "auto" sends to the kernel still trains."""
    return decode_attention(q, k, v, mask, visible_keys=visible_keys, first_key=first_key)


def _decode_kernel_fwd(q, k, v, mask, first_key, visible_keys):
    out = decode_attention(q, k, v, mask, visible_keys=visible_keys, first_key=first_key)
    return out, (q, k, v, mask)


def _decode_kernel_bwd(visible_keys, res, g):
    q, k, v, mask = res
    _, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, mask, "xla"), q, k, v)
    return (*vjp(g), None, None)


_decode_kernel.defvjp(_decode_kernel_fwd, _decode_kernel_bwd)


# Whether causal (windowed, same-document) self-attention that the core would run on cuDNN runs on
# the key-range kernel instead (a GPU step on one device): row i's keys are
# range_attention.local_ranges' [max(i - window + 1, its document's first row), i + 1). With it on,
# every attention of a training step is one kernel. cuDNN runs blt_mid's global attention at ~150
# TFLOP/s (1.44 TFLOP of causal scores forward and backward in the 9.8 ms of run 9's profile,
# train_speed.md). Off: the Pallas kernel was slower than cuDNN in train_speed.md run 10 (one H100,
# range_check.py, forward plus backward): the decoder's windowed rows 2.05 vs 1.45 ms, the global
# model's causal rows 1.21 vs 0.78 ms.
GPU_SELF_RANGES = False


def range_kernel_applies(
    switch: bool, kernel: str, q: jax.Array | jax.ShapeDtypeStruct, k: jax.Array
) -> bool:
    """The one place that decides whether a call runs on the key-range kernel
    (fastblt.model.range_attention) instead of ``kernel``, the one :func:`resolve_impl` chose: its
    ``switch`` is on (:data:`GPU_SELF_RANGES`, ``cross_attention.GPU_CROSS_RANGES``,
    ``block_rows.GPU_RANGE_KERNEL``), the call would run on cuDNN in a GPU step, there is one device
    (the kernel has no sharding rule), and the kernel takes the shapes.

    Args: q: float[b, T, H, d] (or its shape); k: float[b, S, KV, d].
    """
    if not switch or kernel != "cudnn" or platform() != "gpu" or not range_attention.on_one_device():
        return False
    return range_attention.supported(q, k)


def resolve_impl(impl: str, q: jax.Array, local: bool = False, kv_heads: int | None = None) -> str:
    """The one place that decides which kernel an attention call runs: "xla", "cudnn", "splash" or
    "decode" (where it gives "cudnn", :func:`range_kernel_applies` decides whether the key-range
    kernel runs the call instead).

    Args:
      impl: the configured impl, one of ``fastblt.config.ATTENTION_IMPLS``.
      q: the call's queries (shape and dtype decide), float[batch, q_len, heads, head_dim].
      local: the call's mask is a :class:`LocalMask` (self-attention described by ids), not dense.
      kv_heads: the keys' kv heads (the decode kernel is considered only when given).

    "splash" runs only LocalMasks (a dense mask takes "xla"). "auto" picks, for the platform of
    :func:`platform` and at least :data:`AUTO_MIN_QUERIES` queries: cuDNN's fused flash attention
    on a GPU for bf16/fp16 queries with a head dim it supports (a multiple of 8, at most 256); the
    splash kernel on a TPU for a LocalMask; the XLA reference path everywhere else (CPU, dense
    masks on TPU, float32 on GPU), and for decode steps (fewer queries under a dense mask) on a GPU
    :data:`GPU_DECODE_KERNEL`.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl {impl!r} is not one of {ATTENTION_IMPLS}")
    if impl == "splash":
        return "splash" if local else "xla"
    if impl != "auto":
        return impl
    where = platform()
    if q.shape[1] < AUTO_MIN_QUERIES:
        decode = where == "gpu" and not local and GPU_DECODE_KERNEL == "decode"
        decode = decode and kv_heads is not None and decode_supported(q, kv_heads)
        return "decode" if decode else "xla"
    d = q.shape[-1]
    if where == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and d % 8 == 0 and d <= 256:
        return "cudnn"
    if where == "tpu" and local:
        return "splash"
    return "xla"


def _cudnn(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """cuDNN flash attention with the mask as an additive bias; odd lengths padded to even (the
    kernel's backward with a bias needs even query and key lengths)."""
    t, s = q.shape[1], k.shape[1]
    pt, ps = t % 2, s % 2
    if pt or ps:
        q = jnp.pad(q, ((0, 0), (0, pt), (0, 0), (0, 0)))
        k = jnp.pad(k, ((0, 0), (0, ps), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, ps), (0, 0), (0, 0)))
        mask = jnp.pad(mask, ((0, 0), (0, pt), (0, ps)))
    out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="cudnn")
    return out[:, :t]


def packed_segments(docs: jax.Array, max_segments: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """cuDNN's packed layout of each row's documents (``jax._src.cudnn`` conventions).

    Args:
      docs: int32[batch, len], :func:`document_ids` form (0, 1, ... non-decreasing along the row).
      max_segments: M, the static number of segments per row.

    Returns:
      seqlen int32[batch, M] (bytes of document m, -1 past the row's documents), offsets
      int32[batch, M + 1] (first index of document m, -1 past them) and a bool scalar: every row
      has at most M documents (otherwise the layout is cut short and must not be used).
    """
    m = max_segments
    bounds = jnp.arange(m + 1, dtype=docs.dtype)
    before = jnp.sum(docs[:, None, :] < bounds[None, :, None], axis=-1, dtype=jnp.int32)  # [b, M+1]
    n_docs = docs[:, -1] + 1
    present = jnp.arange(m)[None, :] < n_docs[:, None]
    seqlen = jnp.where(present, before[:, 1:] - before[:, :-1], -1)
    offsets = jnp.where(present, before[:, :-1], -1)
    offsets = jnp.concatenate([offsets, jnp.full_like(offsets[:, :1], -1)], axis=1)
    return seqlen, offsets, jnp.all(n_docs <= m)


def _cudnn_local(q: jax.Array, k: jax.Array, v: jax.Array, mask: LocalMask) -> jax.Array:
    """A LocalMask on cuDNN's fused kernel: causal and window as its masks, documents as packed
    segments; a batch with a row of more than ``mask.max_segments`` documents takes the bias path
    (checked per call on the device, unless traced inside :func:`rows_checked`, whose checked
    count of segments it then packs)."""
    n = q.shape[1]
    window = mask.window if mask.window is not None and mask.window < n else None
    if mask.docs is None:
        return jax.nn.dot_product_attention(
            q,
            k,
            v,
            is_causal=True,
            local_window_size=None if window is None else (window - 1, 0),
            implementation="cudnn",
        )
    checked = _ROWS_CHECKED.get()  # every row holds at most this many documents (host-checked)
    seqlen, offsets, fits = packed_segments(mask.docs, mask.max_segments if checked is None else checked)

    def packed() -> jax.Array:
        return _cudnn_packed(q, k, v, seqlen, offsets, window)

    def biased() -> jax.Array:
        if window is not None and n >= 2 * window:
            return _blockwise_local(q, k, v, mask, "cudnn")
        return attention(q, k, v, mask.dense(), "cudnn")

    if checked is not None:
        return packed().astype(q.dtype)
    return jax.lax.cond(fits, packed, biased).astype(q.dtype)


def _cudnn_packed(
    q: jax.Array, k: jax.Array, v: jax.Array, seqlen: jax.Array, offsets: jax.Array, window: int | None
) -> jax.Array:
    """cuDNN flash attention over packed segments (:func:`packed_segments`), causal within each
    segment, with an optional sliding window (a query sees the keys (pos - window, pos])."""
    # The packed layout is only reachable through JAX's cuDNN module (jax.nn's wrapper takes no
    # segment offsets); it has kept this signature since jax 0.4.3x.
    from jax._src.cudnn.fused_attention_stablehlo import MaskType
    from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_attention

    return cudnn_attention(
        q,
        k,
        v,
        q_seqlen=seqlen,
        kv_seqlen=seqlen,
        q_offsets=offsets,
        kv_offsets=offsets,
        scale=q.shape[-1] ** -0.5,
        mask_type=MaskType.PADDING_CAUSAL,
        sliding_window_length=window,
    )


def _blocks(x: jax.Array, nb: int, w: int, fill) -> jax.Array:
    """[b, n, ...] -> [b, nb, 2w, ...]: each block of w rows preceded by the previous block."""
    pad = nb * w - x.shape[1]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    x = x.reshape(x.shape[0], nb, w, *x.shape[2:])
    prev = jnp.pad(x[:, :-1], [(0, 0), (1, 0)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return jnp.concatenate([prev, x], axis=2)


def _blockwise_local(q: jax.Array, k: jax.Array, v: jax.Array, mask: LocalMask, impl: str) -> jax.Array:
    """Exact sliding-window attention in blocks of W queries over 2W keys (positions = 0..N-1)."""
    b, n, h, d = q.shape
    w = int(mask.window)
    nb = -(-n // w)
    pad = nb * w - n
    qb = jnp.pad(q, [(0, 0), (0, pad), (0, 0), (0, 0)]).reshape(b * nb, w, h, d)
    kb = _blocks(k, nb, w, 0).reshape(b * nb, 2 * w, *k.shape[2:])
    vb = _blocks(v, nb, w, 0).reshape(b * nb, 2 * w, *v.shape[2:])
    idx = jnp.arange(nb * w, dtype=jnp.int32)
    q_pos = idx.reshape(nb, w)
    k_pos = _blocks(jnp.broadcast_to(idx, (1, nb * w)), nb, w, -(2**30))[0]  # [nb, 2w]; -inf-like = absent
    rel = q_pos[:, :, None] - k_pos[:, None, :]
    visible = (rel >= 0) & (rel < w) & (k_pos[:, None, :] < n)  # [nb, w, 2w]
    visible = jnp.broadcast_to(visible, (b, nb, w, 2 * w))
    if mask.docs is not None:
        q_doc = jnp.pad(mask.docs, [(0, 0), (0, pad)], constant_values=-1).reshape(b, nb, w)
        k_doc = _blocks(mask.docs, nb, w, -1)
        visible = visible & (q_doc[..., :, None] == k_doc[..., None, :])
    out = attention(qb, kb, vb, visible.reshape(b * nb, w, 2 * w), impl)
    return out.reshape(b, nb * w, h, d)[:, :n]


def document_ids(tokens: jax.Array, eos_id: int = 2) -> jax.Array:
    """Document index of each byte: a document ends at (and includes) each EOS.

    Args: tokens: int32[batch, bytes]. Returns: int32[batch, bytes].
    """
    is_eos = (tokens == eos_id).astype(jnp.int32)
    return jnp.cumsum(is_eos, axis=-1) - is_eos


def causal_mask(
    q_pos: jax.Array,
    k_pos: jax.Array,
    window: int | None = None,
    q_doc: jax.Array | None = None,
    k_doc: jax.Array | None = None,
) -> jax.Array:
    """Causal (optionally sliding-window, optionally same-document) mask.

    Key j is visible to query i iff pos_j <= pos_i, pos_i - pos_j < window, and both are in the
    same document. Positions: int32[batch, q_len] / int32[batch, kv_len].

    Returns: bool[batch, q_len, kv_len].
    """
    qp = q_pos[:, :, None]
    kp = k_pos[:, None, :]
    mask = kp <= qp
    if window is not None:
        mask &= qp - kp < window
    if q_doc is not None and k_doc is not None:
        mask &= q_doc[:, :, None] == k_doc[:, None, :]
    return mask
