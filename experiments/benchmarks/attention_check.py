"""GPU check of the attention core's fused paths against the XLA reference path, in bf16, at
blt_mid shapes: values, gradients and forward + backward time.

    python experiments/benchmarks/attention_check.py [--batch 16] [--out DIR]

Cases:

* ``local``: the decoder's self-attention [b, 4096, 8, 64], window 512, documents (a LocalMask);
* ``global``: the global model's [b, 1026, 16, 64], causal, documents;
* ``blt_d``: BLT-D's block rows (B = 4, 8 cells, K = 1025 blocks, context C = 511, patches of at most
  8 bytes) over the clean keys and their own block (fastblt.model.block_rows.block_attention).

Variants: ``xla`` (the reference), ``bias`` (cuDNN with the mask as a bias: the LocalMask's fallback
when a row has more documents than the packed layout holds), ``packed{M}`` (cuDNN's packed segments,
M per row), ``no_docs`` (the kernel's causal/window masks alone: a lower bound, other values) and,
for BLT-D, ``fused`` (what ``"auto"`` runs: tiles in one call). Errors are ||x - ref|| / ||ref||
over outputs and over each gradient. Prints a table; ``--out`` also writes JSON lines.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from fastblt.model.attention import LocalMask, attention, document_ids
from fastblt.model.block_rows import block_attention


def _time(fn, *args, reps: int = 10) -> float:
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(reps):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / reps


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _docs(rng, b: int, n: int, per_row: int) -> jax.Array:
    tokens = rng.integers(4, 260, (b, n))
    for i in range(b):
        tokens[i, rng.choice(n - 1, per_row - 1, replace=False)] = 2
    return document_ids(jnp.asarray(tokens))


def local_cases(rng, b: int):
    """(name, q/k/v, fn, {variant: (impl, mask)}) for the decoder's and the global model's self-attention."""
    for name, n, h, w in (("local", 4096, 8, 512), ("global", 1026, 16, None)):
        q, k, v = (jnp.asarray(rng.normal(size=(b, n, h, 64)), jnp.bfloat16) for _ in range(3))
        pos = jnp.broadcast_to(jnp.arange(n), (b, n))
        docs = _docs(rng, b, n, 3)
        variants = {
            "xla": ("xla", LocalMask(pos, docs, w)),
            "bias": ("cudnn", LocalMask(pos, docs, w, max_segments=1)),  # 3 documents > 1: bias path
            "no_docs": ("cudnn", LocalMask(pos, None, w)),  # the kernel's own masks: a lower bound
        }
        for m in (4, 8, 64):
            variants[f"packed{m}"] = ("cudnn", LocalMask(pos, docs, w, max_segments=m))
        yield name, (q, k, v), lambda q, k, v, arg: attention(q, k, v, arg[1], arg[0]), variants


def blt_d_case(rng, b: int, bs: int):
    n, h, d, c, max_len = 4096, 8, 64, 511, 8
    nblk = 1025
    lengths = rng.integers(1, max_len + 1, (b, nblk))
    starts = np.minimum(np.cumsum(lengths, axis=1), n - 1).astype(np.int32)
    ctx_pos = starts[:, :, None] - c + np.arange(c)  # the C clean rows before the block start
    context = np.broadcast_to((ctx_pos >= 0)[:, :, None, :], (b, nblk, bs, c))
    own = np.broadcast_to(np.ones((bs, bs), bool), (b, nblk, bs, bs))
    q = jnp.asarray(rng.normal(size=(b, nblk * bs, h, d)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.normal(size=(b, nblk * bs, h, d)), jnp.bfloat16) for _ in range(2))
    kc, vc = (jnp.asarray(rng.normal(size=(b, n, h, d)), jnp.bfloat16) for _ in range(2))
    extra = (kc, vc, jnp.asarray(starts - c), jnp.asarray(context), jnp.asarray(own))

    def fn(q, k, v, arg):
        impl, (kc, vc, start, ctx, own) = arg
        return block_attention(q, k, v, kc, vc, start, ctx, own, None, max_len, impl)

    return f"blt_d{bs}", (q, k, v), fn, {"xla": ("xla", extra), "fused": ("auto", extra)}


def _vjp(fn, impl, g, q, k, v, a):
    return jax.vjp(lambda q, k, v: fn(q, k, v, (impl, a)), q, k, v)[1](g)


def run_case(name, qkv, fn, variants, rng) -> list[dict]:
    """Each variant's arrays are jit arguments (as constants XLA would fold the masks for minutes)."""
    g = jnp.asarray(rng.normal(size=qkv[0].shape), jnp.bfloat16)
    rows, ref = [], None
    for variant, (impl, arrays) in variants.items():
        fwd = jax.jit(lambda q, k, v, a, impl=impl: fn(q, k, v, (impl, a)))
        vjp = jax.jit(functools.partial(_vjp, fn, impl, g))
        row = {"case": name, "variant": variant, "shape": list(qkv[0].shape)}
        try:
            out, grads = fwd(*qkv, arrays), vjp(*qkv, arrays)
            row["fwd_ms"] = 1e3 * _time(fwd, *qkv, arrays)
            row["fwd_bwd_ms"] = 1e3 * _time(vjp, *qkv, arrays)  # the vjp runs the forward too
        except Exception as e:  # a kernel that refuses a shape is a finding, not a crash
            row["failed"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
            continue
        row["finite"] = bool(jnp.all(jnp.isfinite(out))) and all(
            bool(jnp.all(jnp.isfinite(x))) for x in grads
        )
        if ref is None:
            ref = (out, grads)
        elif variant != "no_docs":
            row["out_rel_err"] = _rel(out, ref[0])
            row["grad_rel_err"] = max(_rel(a, r) for a, r in zip(grads, ref[1], strict=True))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--cases", nargs="*", default=["local", "global", "blt_d4", "blt_d8"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    rows = []
    for name, qkv, fn, variants in local_cases(rng, args.batch):
        if name in args.cases:
            rows += run_case(name, qkv, fn, variants, rng)
    for bs in (4, 8):
        if f"blt_d{bs}" in args.cases:
            rows += run_case(*blt_d_case(rng, args.batch, bs), rng)
    print("\n| case | variant | fwd ms | fwd+bwd ms | out rel err | grad rel err |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        if "failed" in r:
            print(f"| {r['case']} | {r['variant']} | failed: {r['failed'][:100]} | | | |")
            continue
        err = lambda k, r=r: f"{r[k]:.2e}" if k in r else ("ref" if r["variant"] == "xla" else "-")  # noqa: E731
        print(
            f"| {r['case']} | {r['variant']} | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | "
            f"{err('out_rel_err')} | {err('grad_rel_err')} |"
        )
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "attention_check.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
