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
  the sampler's layers hand them over;
* ``extra``: the step's keys beside the cache instead of in it, seen by every query, nothing written
  (``decode_attention_extra``: BLT-D's block of cells over the decoder's cache); the reference is the
  XLA path over the cache before the block and the block's keys concatenated.

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

# (name, batch, new bytes per row, heads, kv heads, head dim, cache length, window): BLT-1B's
# entropy model, encoder/decoder and global model steps as the sampler runs them on a GPU (a step has
# 2 columns at batch 1, one real and one inert, and 1 at batch 32: fastblt.sampler.fused.padded_width).
SHAPES = [
    ("entropy b1", 1, 2, 12, 12, 64, 320, 512),
    ("entropy b32", 32, 1, 12, 12, 64, 320, 512),
    ("decoder b1", 1, 2, 16, 16, 64, 320, 512),
    ("decoder b32", 32, 1, 16, 16, 64, 320, 512),
    ("global b1", 1, 2, 16, 16, 128, 96, None),
    ("global long b1", 1, 2, 16, 16, 128, 4096, None),  # several key splits: the dot layout only
    ("chunk of 16 b32", 32, 16, 16, 16, 64, 320, 512),  # 16 rows: direct, no repeats
    ("grouped heads b1", 1, 1, 16, 4, 64, 320, 512),  # one query's 4 heads per kv head
]
SMALL = [
    ("small b2", 2, 2, 2, 2, 16, 40, 24),
    ("small one query", 2, 1, 4, 4, 16, 40, None),
    ("small 16 queries", 2, 16, 2, 2, 16, 40, 24),  # no repeats
    ("small grouped", 2, 1, 4, 2, 16, 40, 24),  # views cut out (grouped heads)
]
LAYOUTS = ("dot", "direct", "write", "write_direct_views", "extra")


def _inputs(rng, b, t, h, kv, d, n, window, dtype):
    q = jnp.asarray(rng.normal(size=(b, t, h, d)), dtype)
    k_new, v_new = (jnp.asarray(rng.normal(size=(b, t, kv, d)), dtype) for _ in range(2))
    k_cache, v_cache = (jnp.asarray(rng.normal(size=(b, n, kv, d)), dtype) for _ in range(2))
    ends = rng.integers(t, n + 1, size=b)  # row r's new bytes end at ends[r]
    cols = jnp.asarray(ends[:, None] - t + np.arange(t)[None], jnp.int32)
    mask = causal_mask(cols, jnp.broadcast_to(jnp.arange(n), (b, n)), window)
    return q, k_new, v_new, cols, k_cache, v_cache, mask


def check_case(shape, layout: str, interpret: bool, seed: int = 0) -> dict:
    """One shape in one layout: the kernel against the XLA path on the same written caches."""
    name, b, t, h, kv, d, n, window = shape
    dtype = jnp.float32 if interpret else jnp.bfloat16
    rng = np.random.default_rng(seed)
    q, k_new, v_new, cols, k_cache, v_cache, mask = _inputs(rng, b, t, h, kv, d, n, window, dtype)
    want_k, want_v = scatter_rows(k_cache, cols, k_new), scatter_rows(v_cache, cols, v_new)
    ref = attention(q, want_k, want_v, mask, "xla")
    direct_rows = 16 if layout in ("direct", "write_direct_views", "extra") else 0
    record = {"case": name, "layout": layout, "shape": [b, t, h, kv, d, n], "window": window}
    splits = dk.key_splits(b * kv, n, dk.block_keys(d, dtype))
    record["direct"] = dk.direct_layout(t, h // kv, splits, direct_rows)
    if layout == "extra":
        if not dk.extra_supported(q, k_cache):
            return {**record, "skipped": "extra keys not supported (several key splits)"}
        before = mask & (jnp.arange(n)[None, None, :] < cols[:, :1, None])  # the cache before the block
        own = jnp.ones((b, t, t), bool)
        cat = [jnp.concatenate(x, axis=1) for x in ((k_cache, k_new), (v_cache, v_new))]
        ref = attention(q, *cat, jnp.concatenate([before, own], axis=2), "xla")
        run = jax.jit(lambda *a: dk.decode_attention_extra(*a, direct_rows=direct_rows, interpret=interpret))
        out = run(q, k_cache, v_cache, before, k_new, v_new, own)
        kc, vc = want_k, want_v = k_cache, v_cache  # nothing is written
    elif not layout.startswith("write"):
        run = jax.jit(
            lambda q, k, v, m: dk.decode_attention(q, k, v, m, direct_rows=direct_rows, interpret=interpret)
        )
        out, kc, vc = run(q, want_k, want_v, mask), want_k, want_v
    else:
        if not dk.write_supported(q, k_cache):
            return {**record, "skipped": "write not supported (several key splits)"}
        views = layout.endswith("views")
        qkv = jnp.concatenate([q, k_new, v_new], axis=2)

        def run(qkv, q, k_new, v_new, cols, kc, vc, m):
            if views:
                q, k_new, v_new = (
                    dk.HeadView(qkv, 0, h),
                    dk.HeadView(qkv, h, kv),
                    dk.HeadView(qkv, h + kv, kv),
                )
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


def verdict(shape, record: dict, tol: float) -> bool:
    """A case passes when skipped, or when it ran within ``tol`` with exact caches, and views given
    to a call of one head per kv head in the direct layout were read in place."""
    if "skipped" in record:
        return True
    if "error" in record:
        return False
    want_in_place = record["layout"].endswith("views") and record["direct"] and shape[3] == shape[4]
    in_place_ok = record.get("in_place", False) or not want_in_place
    return record["rel_error"] <= tol and record["caches_exact"] and in_place_ok


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
    out = None
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        out = open(os.path.join(args.out, "decode_check.jsonl"), "w")
    bad = 0
    for shape in shapes:
        for layout in LAYOUTS:
            try:
                r = check_case(shape, layout, interpret)
            except Exception as e:  # a kernel that does not compile or run: report it, check the rest
                r = {"case": shape[0], "layout": layout, "error": f"{type(e).__name__}: {e}"[:2000]}
            r["ok"] = ok = verdict(shape, r, tol)
            bad += not ok
            if out:
                out.write(json.dumps(r) + "\n")
                out.flush()
            detail = r.get("skipped") or r.get("error")
            if detail is None:
                detail = (
                    f"rel error {r['rel_error']:.2e}, caches exact {r['caches_exact']}, direct {r['direct']}"
                )
                detail += f", in place {r['in_place']}" if "in_place" in r else ""
            print(f"{'ok ' if ok else 'BAD'} {r['case']:<18} {layout:<19} {detail[:300]}", flush=True)
    if out:
        out.close()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
