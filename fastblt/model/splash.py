"""A LocalMask's attention on JAX's Pallas TPU splash-attention kernel (the "splash" impl).

The kernel is the library's (``jax.experimental.pallas.ops.tpu.splash_attention``); this module only
maps fastblt's layout and mask description onto it:

* causal and sliding window are the kernel's static masks (``CausalMask``, ``LocalMask``), so the
  kernel skips key blocks the window never reaches; documents are its ``SegmentIds``;
* q, k, v: [batch, len, heads, head_dim] become the kernel's [heads, len, head_dim], one row at a time
  (``vmap`` over batch); grouped kv heads are the kernel's own (kv_heads divides heads);
* the kernel does not scale scores: q is scaled by ``head_dim ** -0.5`` first, as the XLA path scales;
* lengths are padded to a multiple of the block size and the output sliced back;
* under a mesh (the train step's :func:`fastblt.sharding.activation_sharding`) the kernel runs inside
  ``shard_map`` over batch and heads: a Pallas call is opaque to XLA's partitioner, which would
  otherwise gather q, k and v onto every device.

Off TPU the kernel runs in Pallas interpret mode (the CPU tests' way of running it: slow, exact).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from fastblt import sharding

# Block sizes the kernel may use, largest first: the kernel needs key blocks of a multiple of 128
# lanes; 512 is MaxText's default on v5p. A row is padded to a multiple of 128 and takes the largest
# block that divides the padded length, so padding stays under 128 rows.
LANES = 128
BLOCKS = (512, 256, 128)


def _library():
    """JAX's splash-attention package, imported on first use: importing the model on a GPU or CPU
    install never depends on its Pallas TPU modules."""
    from jax.experimental.pallas.ops.tpu import splash_attention

    return splash_attention


def _block_sizes(block: int):
    return _library().BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )


def _kernel(
    heads: int, length: int, window: int | None, block: int, interpret: bool
) -> Callable[..., jax.Array]:
    """The kernel for one head count, padded length and window (the library caches the processing
    of its mask on the host; the kernel holds arrays, so it is made anew in each trace)."""
    sa = _library()
    shape = (length, length)
    # The project's window W shows a query its own key and the W - 1 before it.
    one = sa.CausalMask(shape) if window is None else sa.LocalMask(shape, (window - 1, 0), 0)
    return sa.make_splash_mha(
        sa.MultiHeadMask([one] * heads),
        block_sizes=_block_sizes(block),
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )


def _local(
    q: jax.Array, k: jax.Array, v: jax.Array, docs: jax.Array | None, window: int | None, interpret: bool
) -> jax.Array:
    """splash_local on one device's shard (shapes as there)."""
    b, n, h, d = q.shape
    padded = -(-n // LANES) * LANES
    block = next(x for x in BLOCKS if padded % x == 0)
    pad = padded - n
    if window is not None and window >= n:
        window = None  # the window holds the whole row: the causal mask
    kernel = _kernel(h, padded, window, block, interpret)

    def heads_major(x: jax.Array) -> jax.Array:  # [b, n, H, d] -> [b, H, padded, d]
        return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    q = (q.astype(jnp.float32) * d**-0.5).astype(q.dtype)
    args = (heads_major(q), heads_major(k), heads_major(v))
    if docs is None:
        # Padded keys come after every real query, so the causal mask already hides them.
        out = jax.vmap(kernel)(*args)
    else:
        # Padded rows are a segment of their own (-1; documents are numbered from 0), so padded
        # queries stay off real documents too (their rows are sliced off either way).
        seg = jnp.pad(docs.astype(jnp.int32), ((0, 0), (0, pad)), constant_values=-1)
        ids = _library().SegmentIds
        out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=ids(s, s)))(*args, seg)
    return out.transpose(0, 2, 1, 3)[:, :n]


def splash_local(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    docs: jax.Array | None,
    window: int | None,
    interpret: bool,
) -> jax.Array:
    """Causal self-attention with an optional sliding window and documents, on the splash kernel.

    Args:
      q: float[batch, len, heads, head_dim]; k, v: float[batch, len, kv_heads, head_dim] (kv_heads
        divides heads); float32 or bfloat16. Rows are positions 0..len-1 (a LocalMask's rows).
      docs: int32[batch, len] document ids (0, 1, ... along the row), or None.
      window: a query sees its own key and the ``window - 1`` before it; None: all before it.
      interpret: run the kernel in Pallas interpret mode (any backend) instead of compiling it for TPU.

    Returns: float[batch, len, heads, head_dim] in q's dtype.
    """
    if k.shape[1] != q.shape[1] or q.shape[2] % k.shape[2]:
        raise ValueError(
            f"splash attention takes self-attention with kv_heads dividing heads: q {q.shape}, k {k.shape}"
        )
    run = functools.partial(_local, window=window, interpret=interpret)
    placed = sharding.activation_spec(("batch", None, "heads", None), q.shape)
    if placed is None:
        return run(q, k, v, docs).astype(q.dtype)
    mesh, q_spec = placed
    _, kv_spec = sharding.activation_spec(("batch", None, "kv_heads", None), k.shape)
    heads = q_spec[2] if q_spec[2] == kv_spec[2] else None  # q and kv heads must split alike
    spec = PartitionSpec(q_spec[0], None, heads, None)
    doc_spec = PartitionSpec(q_spec[0], None)
    in_specs = (spec, spec, spec) if docs is None else (spec, spec, spec, doc_spec)
    sharded = jax.shard_map(
        (lambda q, k, v: run(q, k, v, None)) if docs is None else run,
        mesh=mesh,
        in_specs=in_specs,
        out_specs=spec,
        check_vma=False,  # Pallas calls carry no varying-axes annotation
    )
    return sharded(q, k, v, *(() if docs is None else (docs,))).astype(q.dtype)
