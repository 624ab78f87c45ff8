"""Decode-step layers at batch 1-8: XLA's products (cuBLAS + separate norm/SwiGLU/residual kernels)
against the fused Pallas kernels of ``fastblt.sampler.matvec``.

    python experiments/benchmarks/decode_matvec.py --out /tmp/matvec

Two tables, next to the copy bandwidth of the same run:
1. per matrix of BLT-1B's decode step (its input dimension K, output N), one product with the
   layer's elementwise work (``norm`` before wqkv/w13, SwiGLU before w2, residual after wo/w2), in a
   chain of distinct matrices inside one jitted loop: XLA as the sampler runs it today, and the
   kernel over ``[K, N]`` and ``[N, K]`` storage at a few tilings;
2. whole stacks (entropy model, decoder, global model): per layer ``norm -> wqkv``,
   ``wo + residual``, ``norm -> w13``, ``swiglu -> w2 + residual`` (attention left out: the q
   columns stand in for its output), per layer and as weight bandwidth.
Every variant is checked against a float32 recomputation before it is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

STACKS = {  # name: (dim, ffn hidden, layers) of BLT-1B (fastblt.config.ModelConfig())
    "entropy": (768, 2048, 14),
    "decoder": (1024, 2816, 9),
    "global": (2048, 5632, 25),
}
EPS = 1e-5


def _weights(key, d, f, layers, transposed):
    import jax
    import jax.numpy as jnp

    out = []
    for i in range(layers):
        ks = jax.random.split(jax.random.fold_in(key, i), 6)
        shapes = {"wqkv": (d, 3 * d), "wo": (d, d), "w13": (d, 2 * f), "w2": (f, d)}
        w = {
            n: (jax.random.normal(k, s, jnp.float32) / s[0] ** 0.5).astype(jnp.bfloat16)
            for (n, s), k in zip(shapes.items(), ks, strict=False)
        }
        if transposed:
            w = {n: a.T for n, a in w.items()}
        w["g1"] = 1 + 0.1 * jax.random.normal(ks[4], (d,))
        w["g2"] = 1 + 0.1 * jax.random.normal(ks[5], (d,))
        out.append(w)
    return out


def _layer_xla(w, h, min_rows):
    """The sampler's composition today (fastblt.sampler.fused with XLA products)."""
    import jax
    import jax.numpy as jnp

    from fastblt.model.layers import rms_norm

    def dot(x, m):
        x = x.astype(m.dtype)
        rows = x.shape[0]
        if rows >= min_rows:
            return jnp.dot(x, m)
        return jnp.dot(jnp.pad(x, ((0, min_rows - rows), (0, 0))), m)[:rows]

    d = h.shape[-1]
    y = dot(rms_norm(h, w["g1"], EPS), w["wqkv"])
    h = h + dot(y[:, :d], w["wo"])
    gate, up = jnp.split(dot(rms_norm(h, w["g2"], EPS), w["w13"]), 2, axis=-1)
    return h + dot(jax.nn.silu(gate) * up, w["w2"])


def _layer_pallas(w, h, transposed):
    from fastblt.sampler.matvec import matvec

    d = h.shape[-1]
    y = matvec(h, w["wqkv"], norm=w["g1"], eps=EPS, transposed=transposed)
    h = matvec(y[:, :d], w["wo"], residual=h, transposed=transposed)
    y13 = matvec(h, w["w13"], norm=w["g2"], eps=EPS, transposed=transposed)
    return matvec(y13, w["w2"], swiglu=True, residual=h, transposed=transposed)


def _layer_f32(w, h, transposed):
    import jax
    import jax.numpy as jnp

    from fastblt.model.layers import rms_norm

    f = {n: (a.T if transposed and a.ndim == 2 else a).astype(jnp.float32) for n, a in w.items()}
    d = h.shape[-1]
    h = h.astype(jnp.float32)
    y = rms_norm(h, f["g1"], EPS) @ f["wqkv"]
    h = h + y[:, :d] @ f["wo"]
    gate, up = jnp.split(rms_norm(h, f["g2"], EPS) @ f["w13"], 2, axis=-1)
    return h + (jax.nn.silu(gate) * up) @ f["w2"]


def time_stack(stack, rows, variant, steps, reps=3):
    """(seconds per layer, relative error of one pass against float32, weight bytes per layer)."""
    import jax
    import jax.numpy as jnp

    d, f, layers = STACKS[stack]
    transposed = variant == "pallas_nk"
    ws = _weights(jax.random.key(0), d, f, layers, transposed)
    h0 = jax.random.normal(jax.random.key(1), (rows, d), jnp.float32).astype(jnp.bfloat16)

    def one_pass(h, ws):
        for w in ws:
            if variant == "xla":
                h = _layer_xla(w, h, 2)
            else:
                h = _layer_pallas(w, h, transposed)
        return h

    ref = jax.jit(lambda h, ws: _f32_pass(h, ws, transposed))(h0, ws)
    got = jax.jit(one_pass)(h0, ws).astype(jnp.float32)
    err = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
    # Each step's output is normalised back to a unit row, so values stay finite over many steps.
    loop = jax.jit(
        lambda h, ws: jax.lax.fori_loop(
            0,
            steps,
            lambda i, h: (
                lambda y: (y * jax.lax.rsqrt(jnp.mean(y.astype(jnp.float32) ** 2) + 1e-6)).astype(h.dtype)
            )(one_pass(h, ws)),
            h,
        )
    )
    loop(h0, ws).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        loop(h0, ws).block_until_ready()
        best = min(best, time.perf_counter() - t)
    per_layer_bytes = 2 * (d * 3 * d + d * d + d * 2 * f + f * d)
    return best / (steps * layers), err, per_layer_bytes


def _f32_pass(h, ws, transposed):
    for w in ws:
        h = _layer_f32(w, h, transposed)
    return h


MATRICES = {  # name: (K, N, prologue, residual)
    "decoder wqkv": (1024, 3072, "norm", False),
    "decoder wo": (1024, 1024, None, True),
    "decoder w13": (1024, 5632, "norm", False),
    "decoder w2": (2816, 1024, "swiglu", True),
    "entropy wqkv": (768, 2304, "norm", False),
    "entropy wo": (768, 768, None, True),
    "entropy w13": (768, 4096, "norm", False),
    "entropy w2": (2048, 768, "swiglu", True),
    "global wqkv": (2048, 6144, "norm", False),
    "global w2": (5632, 2048, "swiglu", True),
}


def time_matrix(name, rows, variant, tiles, steps, chain=8):
    """Seconds per product (a chain of ``chain`` distinct matrices per step) and its error."""
    import jax
    import jax.numpy as jnp

    from fastblt.model.layers import rms_norm
    from fastblt.sampler.matvec import matvec

    k, n, pro, res = MATRICES[name]
    transposed = variant == "pallas_nk"
    keys = jax.random.split(jax.random.key(2), chain)
    ws = tuple((jax.random.normal(kk, (k, n), jnp.float32) / k**0.5).astype(jnp.bfloat16) for kk in keys)
    if transposed:
        ws = tuple(w.T for w in ws)
    g = 1 + 0.1 * jax.random.normal(jax.random.key(3), (k,))
    width = 2 * k if pro == "swiglu" else k
    x0 = jax.random.normal(jax.random.key(4), (rows, width), jnp.float32).astype(jnp.bfloat16)
    r0 = jax.random.normal(jax.random.key(5), (rows, n), jnp.float32).astype(jnp.bfloat16)

    def product(x, w, r):
        if variant == "xla":
            m = w
            if pro == "norm":
                x = rms_norm(x, g, EPS)
            elif pro == "swiglu":
                gate, up = jnp.split(x, 2, axis=-1)
                x = jax.nn.silu(gate) * up
            xx = x.astype(m.dtype)
            if rows < 2:
                y = jnp.dot(jnp.pad(xx, ((0, 2 - rows), (0, 0))), m)[:rows]
            else:
                y = jnp.dot(xx, m)
            return r + y if res else y
        return matvec(
            x,
            w,
            norm=g if pro == "norm" else None,
            eps=EPS,
            swiglu=pro == "swiglu",
            residual=r if res else None,
            transposed=transposed,
            tiles=tiles,
        )

    def reference(x, w, r):
        m = (w.T if transposed else w).astype(jnp.float32)
        x = x.astype(jnp.float32)
        if pro == "norm":
            x = rms_norm(x, g, EPS)
        elif pro == "swiglu":
            gate, up = jnp.split(x, 2, axis=-1)
            x = jax.nn.silu(gate) * up
        y = x @ m
        return r.astype(jnp.float32) + y if res else y

    got = jax.jit(product)(x0, ws[0], r0).astype(jnp.float32)
    ref = reference(x0, ws[0], r0)
    err = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))

    def body(_, x):
        for w in ws:
            y = product(x, w, r0)
            # Fold the output back into the input (one small kernel per product, the same for all).
            x = x + (y[:, :width] if n >= width else jnp.tile(y, (1, -(-width // n)))[:, :width]) * 1e-3
        return x

    f = jax.jit(lambda x: jax.lax.fori_loop(0, steps, body, x))
    f(x0).block_until_ready()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        f(x0).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return best / (steps * chain), err


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 8])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--stack-steps", type=int, default=50)
    p.add_argument("--skip-matrices", action="store_true")
    p.add_argument("--stacks", nargs="+", default=list(STACKS), choices=list(STACKS))
    p.add_argument("--stack-rows", type=int, nargs="+", default=None, help="default: --rows")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import jax
    from generate_speed import copy_tb_per_s

    from fastblt.sampler.matvec import tiling

    copy = copy_tb_per_s()
    head = f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, copy {copy:.2f} TB/s"
    print(head, flush=True)
    records = []
    lines = [head, ""]
    if not args.skip_matrices:
        lines += [
            "| matrix | rows | variant | tiling | us | of copy | rel. error |",
            "|---|---:|---|---|---:|---:|---:|",
        ]
        for name, (k, n, _pro, _) in MATRICES.items():
            for rows in args.rows:
                variants = [("xla", None)]
                for tr, v in ((False, "pallas_kn"), (True, "pallas_nk")):
                    base = tiling(rows, k, n, tr)
                    if base is None:
                        continue
                    cands = {base}
                    for programs in (64, 256):
                        t = tiling(rows, k, n, tr, programs)
                        if t is not None:
                            cands.add(t)
                    cands.add(base._replace(warps=8))
                    cands.add(base._replace(warps=2))
                    variants += [(v, t) for t in sorted(cands)]
                for v, t in variants:
                    try:
                        s, err = time_matrix(name, rows, v, t, args.steps)
                    except Exception as e:  # a tiling Triton refuses: say so, go on
                        print(f"{name} {rows} {v} {t}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                        continue
                    wbytes = 2 * k * n
                    rec = {
                        "table": "matrix",
                        "matrix": name,
                        "rows": rows,
                        "variant": v,
                        "tiling": t and list(t),
                        "us": s * 1e6,
                        "of_copy": wbytes / s / 1e12 / copy,
                        "err": err,
                    }
                    records.append(rec)
                    lines.append(
                        f"| {name} | {rows} | {v} | {t and tuple(t)} | {s * 1e6:.2f} | {100 * rec['of_copy']:.0f}% | {err:.1e} |"
                    )
                    print(lines[-1], flush=True)
    lines += [
        "",
        "| stack | rows | variant | us per layer | of copy | rel. error |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for stack in args.stacks:
        for rows in args.stack_rows or args.rows:
            for v in ("xla", "pallas_kn", "pallas_nk"):
                try:
                    s, err, wb = time_stack(stack, rows, v, args.stack_steps)
                except Exception as e:
                    print(f"{stack} {rows} {v}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                rec = {
                    "table": "stack",
                    "stack": stack,
                    "rows": rows,
                    "variant": v,
                    "us_per_layer": s * 1e6,
                    "of_copy": wb / s / 1e12 / copy,
                    "err": err,
                }
                records.append(rec)
                lines.append(
                    f"| {stack} | {rows} | {v} | {s * 1e6:.1f} | {100 * rec['of_copy']:.0f}% | {err:.1e} |"
                )
                print(lines[-1], flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "decode_matvec.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(os.path.join(args.out, "decode_matvec.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
