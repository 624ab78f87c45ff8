"""The floor of a decode step: how fast one GPU multiplies one row by each weight matrix of BLT-1B.

    python experiments/benchmarks/gemv_rate.py --out /tmp/gemv

At batch 1 every matmul of the sampler is a row times a matrix; its cost is reading the matrix. XLA
rewrites a dot whose left side is a vector (one row) and whose matrix is small (under ~10M elements:
every matrix of the local models and the entropy model) into a multiply + reduce, which reaches a
fraction of the copy bandwidth. Per weight shape, this times a chain of such products inside one
jitted loop (as the sampler runs them), for the row as it is and padded to more rows, next to the
copy bandwidth of the same run, and says which kernel XLA picked.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time

SHAPES = {  # (rows of the weight = input dim, columns = output dim), BLT-1B decode matrices
    "entropy wqkv 768x2304": (768, 2304),
    "entropy w13 768x4096": (768, 4096),
    "entropy w2 2048x768": (2048, 768),
    "decoder wqkv 1024x3072": (1024, 3072),
    "decoder w13 1024x5632": (1024, 5632),
    "decoder w2 2816x1024": (2816, 1024),
    "decoder cross wq 1024x1024": (1024, 1024),
    "global wqkv 2048x6144": (2048, 6144),
    "global w2 5632x2048": (5632, 2048),
}


def time_chain(k: int, n: int, rows: int, steps: int, layers: int = 8):
    """Seconds per product of a [rows, k] x [k, n] bf16 chain (layers distinct matrices per step,
    each output folded back into the next input so nothing is hoisted) and the kernels XLA used."""
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(0), layers)
    ws = tuple(jax.random.normal(key, (k, n), jnp.bfloat16) * 0.01 for key in keys)  # separate buffers
    x0 = jnp.ones((1, k), jnp.bfloat16)

    def body(_, x, ws):
        for i in range(layers):
            xi = jnp.pad(x, ((0, rows - 1), (0, 0))) if rows > 1 else x
            y = jnp.dot(xi, ws[i])[:1]
            x = x + jnp.tanh(y[:, :k] if n >= k else jnp.pad(y, ((0, 0), (0, k - n))))
        return x

    f = jax.jit(lambda x, ws: jax.lax.fori_loop(0, steps, lambda i, x: body(i, x, ws), x))
    compiled = f.lower(x0, ws).compile()
    hlo = compiled.as_text()
    kinds = sorted(set(re.findall(r"custom_call_target=\"([^\"]+)\"", hlo)))
    compiled(x0, ws).block_until_ready()
    t = time.perf_counter()
    compiled(x0, ws).block_until_ready()
    return (time.perf_counter() - t) / (steps * layers), kinds


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 8])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import jax
    from generate_speed import copy_tb_per_s

    copy = copy_tb_per_s()
    lines = [
        f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, copy {copy:.2f} TB/s",
        "",
        "| matrix | rows | us per product | weight TB/s | of copy | library kernels |",
        "|---|---:|---:|---:|---:|---|",
    ]
    rows_out = []
    for name, (k, n) in SHAPES.items():
        for rows in args.rows:
            s, kinds = time_chain(k, n, rows, args.steps)
            tbs = 2 * k * n / s / 1e12
            rows_out.append({"matrix": name, "rows": rows, "us": s * 1e6, "tb_per_s": tbs, "kernels": kinds})
            lines.append(
                f"| {name} | {rows} | {s * 1e6:.1f} | {tbs:.2f} | {100 * tbs / copy:.0f}% | "
                f"{', '.join(kinds) or 'XLA fusions only'} |"
            )
            print(lines[-1], flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gemv_rate.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(os.path.join(args.out, "gemv_rate.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows_out)


if __name__ == "__main__":
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
