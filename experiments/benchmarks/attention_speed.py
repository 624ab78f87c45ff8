"""Attention kernels at BLT's training shapes, forward and forward + backward.

    python experiments/benchmarks/attention_speed.py [--cases global_1024 ...] [--out FILE.jsonl]

Local self-attention (bf16 [16, 4096, 8, 64], window 512, two documents per row) and global
attention (bf16 [16, 1536, 16, 64], causal, two documents): fastblt's XLA reference path, cuDNN
flash attention with the mask as a bias (blockwise windows: what ``attention_impl="cudnn"`` runs;
and the full [N, N] bias), cuDNN with its built-in causal/window mask and no documents (the
fastest a masked path can hope for), and for the global case Pallas' GPU flash attention with
segment ids. Each variant reports median times and its largest gradient difference from the first
variant. Results of 2026-12-02 (H200): experiments/results/train_speed.md.

The ``global_1024`` case is today's global model (1 026 patch slots at blt_mid, here 1 024) and adds
JAX's Hopper attention kernel in Pallas' Mosaic GPU dialect
(``jax.experimental.pallas.ops.gpu.attention_mgpu``, FlashAttention-3's warp-specialised design):
causal without documents (its backward does not take a causal mask, so forward alone) and without
any mask (forward and backward), each next to cuDNN without a mask, to tell whether a kernel of that
design runs these head-dim-64 shapes faster than cuDNN before one with document masks is written.
A variant a kernel or JAX version does not support reports its error and the rest go on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from fastblt.model.attention import LocalMask, attention, causal_mask, document_ids


def _time(fn, *args, reps: int = 20) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _case(name, b, n, h, d, window, n_docs, rng):
    q, k, v, g = (jnp.asarray(rng.normal(size=(b, n, h, d)), jnp.bfloat16) for _ in range(4))
    tokens = rng.integers(4, 260, (b, n))
    for j in range(1, n_docs):
        tokens[:, (j * n) // n_docs + rng.integers(-50, 50)] = 2
    docs = document_ids(jnp.asarray(tokens))
    pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    return dict(name=name, q=q, k=k, v=v, g=g, docs=docs, pos=pos, window=window)


def _band_bias(c, blocked: bool):
    """Additive bias (0 visible / -inf-like) of the case's causal + window + document mask."""
    pos, docs, w = c["pos"], c["docs"], c["window"]
    if not blocked:
        vis = causal_mask(pos, pos, w, docs, docs)[:, None]
        return jnp.where(vis, 0.0, -1e9).astype(jnp.bfloat16)
    b, n = pos.shape
    nb = n // w
    qd = docs.reshape(b, nb, w)
    kd = jnp.concatenate([jnp.pad(qd[:, :-1], ((0, 0), (1, 0), (0, 0)), constant_values=-1), qd], axis=2)
    i = jnp.arange(w)[:, None]
    j = jnp.arange(2 * w)[None, :]
    band = (j > i) & (j <= i + w)  # key j of [prev block, block] at rel = w + i - j in [0, w)
    first = jnp.arange(nb)[:, None, None] > 0
    band = band[None] & (first | (j >= w))  # block 0 has no previous block
    vis = band[None] & (qd[..., :, None] == kd[..., None, :])
    return jnp.where(vis, 0.0, -1e9).astype(jnp.bfloat16).reshape(b * nb, 1, w, 2 * w)


def _blocks(x, w):
    b, n = x.shape[:2]
    nb = n // w
    xb = x.reshape(b, nb, w, *x.shape[2:])
    prev = jnp.pad(xb[:, :-1], [(0, 0), (1, 0)] + [(0, 0)] * (x.ndim - 1))
    return jnp.concatenate([prev, xb], axis=2).reshape(b * nb, 2 * w, *x.shape[2:])


def variants(c):
    """name -> f(q, k, v) -> out, for the case c."""
    w = c["window"]
    out = {}
    if w is not None:
        mask = LocalMask(c["pos"], c["docs"], w)
        out["fastblt xla (blockwise)"] = lambda q, k, v: attention(q, k, v, mask, "xla")
        out["jax.nn cudnn causal+window, no docs"] = lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, local_window_size=(w - 1, 0), implementation="cudnn"
        )
        bias_b = _band_bias(c, True)

        def blocked(q, k, v):
            b, n, h, d = q.shape
            qb = q.reshape(b * (n // w), w, h, d)
            o = jax.nn.dot_product_attention(
                qb, _blocks(k, w), _blocks(v, w), bias=bias_b, implementation="cudnn"
            )
            return o.reshape(b, n, h, d)

        out["cudnn blocked + bias"] = blocked
    else:
        pdocs = c["docs"]
        mask = causal_mask(c["pos"], c["pos"], None, pdocs, pdocs)
        out["fastblt xla (dense mask)"] = lambda q, k, v: attention(q, k, v, mask, "xla")
        out["jax.nn cudnn causal, no docs"] = lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn"
        )
        if c["name"] == "global_1024":
            desc = LocalMask(c["pos"], pdocs, None)  # the global model's call, as fastblt.model.blt makes it
            out["fastblt cudnn (documents packed, the step's path)"] = lambda q, k, v: attention(
                q, k, v, desc, "cudnn"
            )
            out.update(_unmasked_variants())
        try:
            from jax.experimental.pallas.ops.gpu import attention as pallas_gpu

            out["pallas gpu mha causal + segment ids"] = lambda q, k, v: pallas_gpu.mha(
                q, k, v, segment_ids=pdocs, causal=True, sm_scale=q.shape[-1] ** -0.5
            )
        except ImportError:
            pass
    bias_f = _band_bias(c, False)
    out["cudnn full + bias"] = lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, bias=bias_f, implementation="cudnn"
    )
    return out


# The variants whose masks differ from the case's first one are compared with the variant named here
# (same function), and those whose backward refuses their mask are timed forward only.
REFERENCE = {
    "mosaic gpu (FA3 design), no mask": "jax.nn cudnn, no mask",
    "mosaic gpu (FA3 design) causal, no docs": "jax.nn cudnn causal, no docs",
}
FORWARD_ONLY = {"mosaic gpu (FA3 design) causal, no docs"}  # attention_mgpu's backward takes no causal mask


def _unmasked_variants():
    """cuDNN and the Mosaic GPU kernel with no mask, and the kernel with its causal mask: the rate
    comparison of the module docstring."""
    out = {
        "jax.nn cudnn, no mask": lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, implementation="cudnn"
        ),
    }
    try:
        from jax.experimental.pallas.ops.gpu import attention_mgpu as mgpu
    except ImportError:
        return out

    def kernel(causal: bool):
        def attend(q, k, v):
            # Built at the call, inside run()'s try: another JAX's TuningConfig fails this row only.
            blocks = dict(block_q_dkv=64, block_kv_dkv=64, block_q_dq=64, block_kv_dq=64)
            config = mgpu.TuningConfig(
                block_q=64, block_kv=128, max_concurrent_steps=2, causal=causal, **({} if causal else blocks)
            )
            # The kernel does not scale the scores: q is scaled as the others scale q . k. Its shared
            # memory is float16 whatever the inputs (bf16 failed "src had type bfloat16 and dst had
            # type float16" on an H100 in run 13), so it runs in float16: the same tensor-core rate.
            q, k, v = (x.astype(jnp.float16) for x in (q * q.shape[-1] ** -0.5, k, v))
            return mgpu.attention(q, k, v, config).astype(jnp.bfloat16)

        return attend

    out["mosaic gpu (FA3 design), no mask"] = kernel(False)
    out["mosaic gpu (FA3 design) causal, no docs"] = kernel(True)
    return out


CASES = {
    "global": (16, 1536, 16, 64, None, 2),
    "global_1024": (16, 1024, 16, 64, None, 2),
    "local": (16, 4096, 8, 64, 512, 2),
}


def _max_diff(a, b) -> float:
    return max(
        float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def run(out_path: str | None, names: list[str]) -> None:
    """Times every variant of each case; rows are printed and written to ``out_path`` as they come."""
    rng = np.random.default_rng(0)
    cases = [_case(name, *CASES[name], rng) for name in names]
    if out_path:
        open(out_path, "w").close()
    for c in cases:
        q, k, v, g = c["q"], c["k"], c["v"], c["g"]
        fns = variants(c)
        first = next(iter(fns))
        outs, grads = {}, {}  # each variant's forward output and (where run) gradients
        for name, f in fns.items():
            fn = jax.jit(
                jax.value_and_grad(
                    lambda q, k, v, f=f, g=g: jnp.sum(f(q, k, v).astype(jnp.float32) * g), argnums=(0, 1, 2)
                )
            )
            fwd = jax.jit(f)
            row = {"case": c["name"], "variant": name, "forward_only": name in FORWARD_ONLY}
            try:
                row["fwd_ms"] = 1e3 * _time(fwd, q, k, v)
                outs[name] = fwd(q, k, v)
                if name not in FORWARD_ONLY:
                    grads[name] = fn(q, k, v)[1]
                    row["fwd_bwd_ms"] = 1e3 * _time(fn, q, k, v)
            except Exception as e:  # report, do not hide: a kernel may not support a shape or a mask
                row["failed"] = f"{type(e).__name__}: {str(e)[:300]}"
            ref = REFERENCE.get(name, first)
            row["compared_with"] = ref
            if name in outs and ref in outs:
                row["max_out_diff"] = _max_diff(outs[name], outs[ref])
            if name in grads and ref in grads:
                row["max_grad_diff"] = _max_diff(grads[name], grads[ref])
            row.update(shape=list(q.shape), window=c["window"], device=jax.devices()[0].device_kind)
            print(json.dumps(row), flush=True)
            if out_path:
                with open(out_path, "a") as file:
                    file.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=None)
    p.add_argument("--cases", nargs="+", choices=sorted(CASES), default=["global", "local"])
    args = p.parse_args()
    run(args.out, args.cases)
