"""GPU check of the decode-attention kernel's layouts against the XLA reference path.

    python experiments/benchmarks/decode_check.py [--out DIR]      # on the GPU: compiled by Triton
    python experiments/benchmarks/decode_check.py --small          # CPU: Pallas interpret mode

The CPU tests run the kernel in Pallas' interpreter; only a GPU compiles it through Triton (row
repeats, in-place head views, cache writes). Before a speed run measures a layout, this checks that
the compiled kernel computes what the XLA path computes, in bf16, at BLT-1B's decode shapes:

* ``dot``: queries padded to 16 rows in the kernel's own layout (the default);
* ``direct``: queries in their own layout, rows repeated in registers (``MAX_DIRECT_ROWS = 16``);
* ``write``: the kernel also writes the step's keys and values into the caches (``WRITE_CACHE``);
* ``write_direct_views``: both, with q, k and v read in place out of one q|k|v array (HeadView), as
  the sampler's layers hand them over.

Per case: the output's error ||x - ref|| / ||ref|| against ``attention(..., "xla")`` over the caches
written by ``scatter_rows``, and whether the written caches equal the scatter's exactly. Exits 1
when an error exceeds ``--tol`` or a cache differs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fastblt.model import decode_attention as dk  # noqa: E402
from fastblt.model.attention import attention, causal_mask  # noqa: E402
from fastblt.sampler.state import scatter_rows  # noqa: E402

# (name, batch, new bytes per row, heads = kv heads, head dim, cache length, window): BLT-1B's
# entropy model, encoder/decoder and global model steps at batch 1 and 32.
SHAPES = [
    ("entropy b1", 1, 2, 12, 64, 320, 512),
    ("decoder b1", 1, 2, 16, 64, 320, 512),
    ("decoder b32", 32, 2, 16, 64, 320, 512),
    ("global b1", 1, 2, 16, 128, 96, None),
    ("global long b1", 1, 2, 16, 128, 4096, None),  # several key splits: the dot layout only
    ("decoder verify b32", 32, 16, 16, 64, 320, 512),  # BLT-S's 16-byte verification chunk
]
SMALL = [
    ("small b2", 2, 2, 2, 16, 40, 24),
    ("small one query", 2, 1, 4, 16, 40, None),
    ("small 16 queries", 2, 16, 2, 16, 40, 24),  # a verification chunk: no repeats
]
LAYOUTS = ("dot", "direct", "write", "write_direct_views")


def _inputs(rng, b, t, h, d, n, window, dtype):
    q, k_new, v_new = (jnp.asarray(rng.normal(size=(b, t, h, d)), dtype) for _ in range(3))
    k_cache, v_cache = (jnp.asarray(rng.normal(size=(b, n, h, d)), dtype) for _ in range(2))
    ends = rng.integers(t, n + 1, size=b)  # row r's new bytes end at ends[r]
    cols = jnp.asarray(ends[:, None] - t + np.arange(t)[None], jnp.int32)
    mask = causal_mask(cols, jnp.broadcast_to(jnp.arange(n), (b, n)), window)
    return q, k_new, v_new, cols, k_cache, v_cache, mask


def check_case(shape, layout: str, interpret: bool, seed: int = 0) -> dict:
    """One shape in one layout: the kernel against the XLA path on the same written caches."""
    name, b, t, h, d, n, window = shape
    dtype = jnp.float32 if interpret else jnp.bfloat16
    q, k_new, v_new, cols, k_cache, v_cache, mask = _inputs(
        np.random.default_rng(seed), b, t, h, d, n, window, dtype
    )
    want_k, want_v = scatter_rows(k_cache, cols, k_new), scatter_rows(v_cache, cols, v_new)
    ref = attention(q, want_k, want_v, mask, "xla")
    direct_rows = 16 if "direct" in layout else 0
    record = {"case": name, "layout": layout, "shape": [b, t, h, d, n], "window": window}
    if not layout.startswith("write"):
        run = jax.jit(
            lambda q, k, v, m: dk.decode_attention(q, k, v, m, direct_rows=direct_rows, interpret=interpret)
        )
        out, kc, vc = run(q, want_k, want_v, mask), want_k, want_v
        record["in_layout"] = dk.direct_layout(t, 1, 1, direct_rows)
    else:
        if not dk.write_supported(q, k_cache):
            return {**record, "skipped": "write not supported (several key splits)"}
        views = layout.endswith("views")
        qkv = jnp.concatenate([q, k_new, v_new], axis=2)

        def run(qkv, q, k_new, v_new, cols, kc, vc, m):
            if views:
                q, k_new, v_new = dk.HeadView(qkv, 0, h), dk.HeadView(qkv, h, h), dk.HeadView(qkv, 2 * h, h)
            return dk.decode_attention_write(
                q, k_new, v_new, cols, kc, vc, m, direct_rows=direct_rows, interpret=interpret
            )

        out, kc, vc = jax.jit(run)(qkv, q, k_new, v_new, cols, k_cache, v_cache, mask)
        record["in_place"] = views and dk.reads_in_place(q, k_cache, direct_rows)
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    record["rel_error"] = float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))
    record["caches_exact"] = bool(np.array_equal(np.asarray(kc), np.asarray(want_k))) and bool(
        np.array_equal(np.asarray(vc), np.asarray(want_v))
    )
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="tiny shapes (the CPU's interpreted kernel)")
    p.add_argument(
        "--tol", type=float, default=None, help="largest relative error (bf16: 1e-2, float32: 1e-5)"
    )
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    interpret = jax.default_backend() != "gpu"
    tol = args.tol if args.tol is not None else (1e-5 if interpret else 1e-2)
    shapes = SMALL if args.small or interpret else SHAPES
    print(
        f"device {jax.devices()[0].device_kind}, {'interpreted' if interpret else 'Triton'}, tolerance {tol}"
    )
    records, bad = [], 0
    for shape in shapes:
        for layout in LAYOUTS:
            r = check_case(shape, layout, interpret)
            ok = "skipped" in r or (r["rel_error"] <= tol and r["caches_exact"])
            bad += not ok
            records.append({**r, "ok": ok})
            detail = r.get("skipped") or f"rel error {r['rel_error']:.2e}, caches exact {r['caches_exact']}"
            print(f"{'ok ' if ok else 'BAD'} {r['case']:<16} {layout:<19} {detail}", flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "decode_check.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
