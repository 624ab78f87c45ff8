"""The elementwise Pallas kernels as Triton compiles them against XLA's expressions, at blt_mid's and
BLT-1B's shapes: the RMSNorm kernel (fastblt.model.norm_kernel: ``norm``, and ``norm_parts``, its
backward taking q's, k's and v's gradients unsummed and the residual's gradient) and the encoder's
patch max-pool (fastblt.model.pool_kernel: ``pool``, forward and backward). (SwiGLU's two-output
gradient kernel was checked here too: as fast as XLA's, train_speed.md run 24, so it is gone.)

    python experiments/benchmarks/kernel_check.py --kernels norm pool --out DIR   # a GPU; exits 1 on a mismatch
    python experiments/benchmarks/kernel_check.py --interpret                      # the CPU (Pallas interpret mode)

For each kernel and shape: the value and the gradients (a random cotangent) from the kernel and from
fastblt.model.layers' XLA expression, their largest relative differences, and the time of each
(forward plus backward for ``norm`` and ``pool``, the backward alone for the others; the median of 5 samples of 20
calls back to back) and the rate at which each moves the computation's least traffic. The
CPU tests interpret the kernels; this checks the kernels the GPU runs before speed_gpu.sh times a
train step with them (phases 28 and 52).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

# (name, rows, dim): blt_mid's local rows (16 x 4096) and global rows (16 x 1025), BLT-1B's global.
SHAPES = [("mid local", 16 * 4096, 512), ("mid global", 16 * 1025, 1024), ("1b global", 4 * 1025, 2048)]
# (name, bytes, dim): the encoder's byte states that blt_mid and BLT-1B pool (rows of 4 096 bytes, static
# 4-byte patches).
POOL_SHAPES = [
    ("mid encoder", 16 * 4096, 512),
    ("mid encoder, a 1 024-byte patch", 16 * 4096, 512),
    ("1b encoder", 4 * 4096, 1024),
]
# Bytes of each row's first patch, by name (entropy patches may be this long): the kernel's time follows
# its longest patch.
LONG_PATCH = {"mid encoder, a 1 024-byte patch": 1024}
SMALL = [("small", 64, 128)]
KERNELS = ("norm", "norm_parts", "pool")
POOL_ROW = 4096


def _runs(kernel: str, interpret: bool):
    """(kernel's function, XLA's function) of one kernel, each jitted from (x, second input, cotangent)
    to (value or None, gradients...)."""
    import jax

    from fastblt.model import blt, layers, norm_kernel, pool_kernel

    assert not layers.GPU_FUSED_NORM, "the XLA side of the check needs GPU_FUSED_NORM off"
    if kernel == "pool":  # x: the byte states [B, N, D]; second: patch ids [B, N]; dy: [B, P, D]

        def pooled(fn):
            @jax.jit
            def run(x, ids, dy):
                y, vjp = jax.vjp(lambda x: fn(x, ids, dy.shape[1]), x)
                return (y, *vjp(dy))

            return run

        return (
            pooled(lambda x, ids, p: pool_kernel.patch_max_pool(x, ids, p, interpret=interpret)),
            pooled(blt.xla_patch_max_pool),  # XLA's segment_max
        )
    if kernel == "norm":

        def both(fn):
            @jax.jit
            def run(x, s, dy):
                y, vjp = jax.vjp(fn, x, s)
                return (y, *vjp(dy))

            return run

        return (
            both(lambda x, s: norm_kernel.rms_norm(x, s, 1e-5, interpret=interpret)),
            both(lambda x, s: layers.rms_norm(x, s, 1e-5)),  # XLA's expression (the switches are off)
        )
    if kernel == "norm_parts":
        # The attention norm's backward as a layer sees it: the output read by q, k and v (three
        # gradient summands) and x by the residual (one more gradient); XLA fuses the sums and the
        # residual's add into its own backward passes.
        def xla(x, s, d):
            return jax.vjp(lambda x, s: layers.rms_norm(x, s, 1e-5), x, s)[1](d[0] + d[1] + d[2])

        def fused(x, s, d):
            return norm_kernel.grad_parts(x, s, norm_kernel.inverse_rms(x, 1e-5), d[:3], d[3], interpret)

        return (
            jax.jit(fused),
            jax.jit(lambda x, s, d: (lambda dx, ds: (dx + d[3], ds))(*xla(x, s, d))),
        )
    raise ValueError(f"no kernel {kernel!r}: one of {KERNELS}")


def check(kernel: str, name: str, rows: int, dim: int, interpret: bool) -> dict:
    """One kernel at one shape: relative errors against XLA, times, and whether it passed."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    keys = jax.random.split(jax.random.key(rows + dim), 3)
    x = (2.0 * jax.random.normal(keys[0], (rows, dim))).astype(jnp.bfloat16)
    second = 1.0 + 0.3 * jax.random.normal(keys[1], (dim,))  # the norm's scale; the pool's ids below
    dy = jax.random.normal(keys[2], (rows, dim)).astype(jnp.bfloat16)
    # The pool's rows: POOL_ROW bytes in 4-byte patches (LONG_PATCH: a longer first), the last slots empty.
    if kernel == "pool":
        n = min(rows, POOL_ROW)
        x = x.reshape(rows // n, n, dim)
        first = LONG_PATCH.get(name, 4)
        ids = jnp.maximum(jnp.arange(n, dtype=jnp.int32) - first + 4, 0) // 4
        second = jnp.broadcast_to(ids, (rows // n, n))
        dy = jax.random.normal(keys[2], (rows // n, n // 4 + 2, dim)).astype(jnp.bfloat16)
    if kernel == "norm_parts":  # q's, k's and v's gradients of the output, then the residual's of x
        dy = tuple(
            jax.random.normal(k, (rows, dim)).astype(jnp.bfloat16) for k in jax.random.split(keys[2], 4)
        )
    labels = {"norm": ("y", "dx", "dscale"), "norm_parts": ("dx", "dscale"), "pool": ("pooled", "dx")}[kernel]
    out = {"kernel": kernel, "shape": name, "rows": rows, "dim": dim}
    runs = dict(zip(("kernel", "xla"), _runs(kernel, interpret), strict=True))
    got, want = runs["kernel"](x, second, dy), runs["xla"](x, second, dy)
    for label, a, b in zip(labels, got, want, strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        out[f"{label}_rel_error"] = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
    # The least traffic of each computation in tensors of x's size (bf16): what a kernel at the copy
    # rate moves (norm: forward x -> y, backward x, dy -> dx; norm_parts: x, three summands and the
    # residual's gradient -> dx; pool: forward x, backward x -> dx).
    least = {"norm": 5, "norm_parts": 6, "pool": 3}[kernel] * x.size * x.dtype.itemsize
    out["least_gb"] = least / 1e9
    for label, run in runs.items():
        jax.block_until_ready(run(x, second, dy))
        times = []
        for _ in range(5):  # 20 calls back to back per sample: the GPU's time, not the host's per call
            t = time.perf_counter()
            for _ in range(20):
                result = run(x, second, dy)
            jax.block_until_ready(result)
            times.append((time.perf_counter() - t) / 20)
        out[f"{label}_us"] = 1e6 * statistics.median(times)
        out[f"{label}_tb_per_s"] = least / statistics.median(times) / 1e12
    # bf16 outputs: one rounding apart at most (2^-8 relative to the largest entry); the scale's
    # gradient sums rows in float32 in another order, and where XLA sums q's, k's and v's gradients
    # (norm_parts) it rounds the sum to bf16 first, the kernel does not.
    exact_scale = kernel == "norm"
    out["ok"] = all(
        out[f"{label}_rel_error"] < (1e-3 if label == "dscale" and exact_scale else 8e-3) for label in labels
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--interpret", action="store_true", help="run the kernels in Pallas interpret mode")
    p.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS))
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    ok = True
    lines = []
    for kernel in args.kernels:
        shapes = SMALL if args.interpret else {"pool": POOL_SHAPES}.get(kernel, SHAPES)
        for name, rows, dim in shapes:
            r = check(kernel, name, rows, dim, args.interpret)
            ok &= r["ok"]
            print(json.dumps(r), flush=True)
            lines.append(json.dumps(r))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "kernel_check.jsonl"), "w") as f:
            f.write("\n".join(lines) + "\n")
    print("ok" if ok else "MISMATCH", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
