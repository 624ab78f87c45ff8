"""Speed of BLT-D's block-row attention (fastblt.model.block_rows.block_attention), forward and
backward, on the mid-size decoder's shapes: per-block gathered windows vs tiles that share one key
slice (taken when the patcher bounds patch lengths, ``max_patch_length``). Both must agree.

    PYTHONPATH=. python experiments/benchmarks/block_attention.py [--batch 1] [--dtype float32]

Rows of 4096 bytes, 1536 patch slots, B = 4, 8 heads of 64, window 512, patch lengths uniform in
1..8 (the paper's BLT-D cap). Prints one JSON line per path with the device, compile and step time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from fastblt.model.block_rows import block_attention
from fastblt.train import blt_d as objective


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--block", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--tiles", type=int, nargs="*", default=[0], help="blocks per tile to try (0: the default)"
    )
    args = parser.parse_args(argv)
    n, p, heads, hd, window, max_len = 4096, 1536, 8, 64, 512, 8
    rng = np.random.default_rng(0)
    lengths = np.zeros((args.batch, p), np.int32)
    for b in range(args.batch):
        row, left = [1], n
        while left > 0:
            step = min(int(rng.integers(1, max_len + 1)), left)
            row.append(step)
            left -= step
        lengths[b, : min(len(row), p)] = row[:p]
    tokens = jnp.asarray(rng.integers(4, 260, (args.batch, n)), jnp.int32)
    layout = objective.block_layout(jnp.asarray(lengths), n, args.block)
    start, ctx = objective.context_mask(layout, tokens, window, False)
    own = objective.self_mask(layout.in_row)
    rows = (p - 1) * args.block
    dt = jnp.dtype(args.dtype)

    def rand(*shape):
        return jnp.asarray(rng.standard_normal(shape), dt)

    inputs = (
        rand(args.batch, rows, heads, hd),
        rand(args.batch, rows, heads, hd),
        rand(args.batch, rows, heads, hd),
        rand(args.batch, n, heads, hd),
        rand(args.batch, n, heads, hd),
    )
    results = {}
    for bound, tile in [(None, None)] + [(max_len, t or None) for t in args.tiles]:

        def loss(q, k, v, kc, vc, bound=bound, tile=tile):
            return block_attention(q, k, v, kc, vc, start, ctx, own, tile, bound).astype(jnp.float32).sum()

        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*inputs))
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            out = jax.block_until_ready(fn(*inputs))
        step = (time.perf_counter() - t0) / args.repeats
        results[bound, tile] = out
        print(
            json.dumps(
                {
                    "path": "gathered windows"
                    if bound is None
                    else f"tiles of {tile or 'default'} blocks (max_patch_length {bound})",
                    "device": str(jax.devices()[0]),
                    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                    "batch": args.batch,
                    "dtype": args.dtype,
                    "compile_s": round(compile_s, 2),
                    "fwd_bwd_s": round(step, 4),
                }
            ),
            flush=True,
        )
    v0, g0 = results.pop((None, None))
    for (_, tile), (v1, g1) in results.items():
        diff = max(
            float(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)).max())
            for a, b in zip(g0, g1, strict=True)
        )
        rel = float(abs(v0 - v1) / abs(v0))
        print(json.dumps({"tile": tile or "default", "value_rel_diff": rel, "grad_max_abs_diff": diff}))


if __name__ == "__main__":
    main()
