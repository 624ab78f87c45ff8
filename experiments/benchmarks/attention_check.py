"""GPU check of the attention entry point: the fused paths ("cudnn", "auto") against the XLA
reference path, in bf16, on a BLT-shaped local mask (window + documents), with timings.

    python experiments/benchmarks/attention_check.py
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from fastblt.model.attention import LocalMask, attention, document_ids


def _time(fn, *args, reps: int = 20) -> float:
    fn(*args).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(reps):
        out = fn(*args)
    out.block_until_ready()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    rng = np.random.default_rng(0)
    b, n, h, d, w = 16, 4096, 8, 64, 512
    q, k, v = (jnp.asarray(rng.normal(size=(b, n, h, d)), jnp.bfloat16) for _ in range(3))
    tokens = rng.integers(4, 260, (b, n))
    tokens[:, 1000] = 2
    pos = jnp.broadcast_to(jnp.arange(n), (b, n))
    mask = LocalMask(pos, document_ids(jnp.asarray(tokens)), w)
    print(f"device: {jax.devices()[0].device_kind}; q/k/v bf16 [{b}, {n}, {h}, {d}], window {w}")
    ref_fn = jax.jit(lambda q, k, v: attention(q, k, v, mask, "xla"))
    ref = ref_fn(q, k, v).astype(jnp.float32)
    print(f"xla   (blockwise): {_time(ref_fn, q, k, v) * 1e3:8.2f} ms")
    for impl in ("auto", "cudnn"):
        fn = jax.jit(lambda q, k, v, impl=impl: attention(q, k, v, mask, impl))
        try:
            out = fn(q, k, v).astype(jnp.float32)
        except Exception as e:  # report, do not hide: cuDNN may not support a shape or dtype
            print(f"{impl:5s}: failed: {type(e).__name__}: {str(e)[:200]}")
            continue
        diff = float(jnp.max(jnp.abs(out - ref)))
        print(f"{impl:5s} (blockwise): {_time(fn, q, k, v) * 1e3:8.2f} ms, max |diff| vs xla {diff:.4f}")


if __name__ == "__main__":
    main()
