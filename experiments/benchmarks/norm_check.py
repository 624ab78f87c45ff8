"""The RMSNorm kernel as Triton compiles it against XLA's RMSNorm, at blt_mid's and BLT-1B's shapes.

    python experiments/benchmarks/norm_check.py --out DIR     # a GPU; exits 1 on a mismatch
    python experiments/benchmarks/norm_check.py --interpret   # the CPU (Pallas interpret mode)

For each shape: the value and the gradients of x and of the scale (a random cotangent) from
fastblt.model.norm_kernel and from fastblt.model.layers.rms_norm's XLA expression, their largest
relative differences, and the time of a forward plus backward of each (median of 20 after warm-up).
The CPU tests interpret the kernel; this checks the kernel the GPU runs before speed_gpu.sh times a
train step with it (phase 28).
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
SMALL = [("small", 64, 128)]


def check(name: str, rows: int, dim: int, interpret: bool) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from fastblt.model import layers, norm_kernel

    assert not layers.GPU_FUSED_NORM, "the XLA side of the check needs GPU_FUSED_NORM off"

    keys = jax.random.split(jax.random.key(rows + dim), 3)
    x = (2.0 * jax.random.normal(keys[0], (rows, dim))).astype(jnp.bfloat16)
    scale = 1.0 + 0.3 * jax.random.normal(keys[1], (dim,))
    dy = jax.random.normal(keys[2], (rows, dim)).astype(jnp.bfloat16)

    def xla(x, s):
        return layers.rms_norm(x, s, 1e-5)  # XLA's expression: GPU_FUSED_NORM is off here

    def kernel(x, s):
        return norm_kernel.rms_norm(x, s, 1e-5, interpret=interpret)

    def both(fn):
        @jax.jit
        def run(x, s, dy):
            y, vjp = jax.vjp(fn, x, s)
            return (y, *vjp(dy))

        return run

    out = {"shape": name, "rows": rows, "dim": dim, "supported": norm_kernel.supported(x)}
    runs = {"kernel": both(kernel), "xla": both(xla)}
    got, want = runs["kernel"](x, scale, dy), runs["xla"](x, scale, dy)
    for label, a, b in zip(("y", "dx", "dscale"), got, want, strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        out[f"{label}_rel_error"] = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
    for label, run in runs.items():
        times = []
        for i in range(23):
            t = time.perf_counter()
            jax.block_until_ready(run(x, scale, dy))
            if i >= 3:
                times.append(time.perf_counter() - t)
        out[f"{label}_us"] = 1e6 * statistics.median(times)
    # bf16 outputs: one rounding apart at most (2^-8 relative to the largest entry); the scale's
    # gradient sums rows in float32 in another order.
    out["ok"] = out["y_rel_error"] < 8e-3 and out["dx_rel_error"] < 8e-3 and out["dscale_rel_error"] < 1e-3
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--interpret", action="store_true", help="run the kernel in Pallas interpret mode")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    ok = True
    lines = []
    for name, rows, dim in SMALL if args.interpret else SHAPES:
        r = check(name, rows, dim, args.interpret)
        ok &= r["ok"]
        print(json.dumps(r), flush=True)
        lines.append(json.dumps(r))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "norm_check.jsonl"), "w") as f:
            f.write("\n".join(lines) + "\n")
    print("ok" if ok else "MISMATCH", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
