"""BLT-D's block-row attention on the key-range kernel (fastblt.model.range_attention, as Triton
compiles it) against the XLA reference path, and its speed against the tiles it would replace.

    python experiments/benchmarks/range_check.py --out DIR     # a GPU; exits 1 on a mismatch
    python experiments/benchmarks/range_check.py --interpret   # the CPU (Pallas interpret mode, small)
    python experiments/benchmarks/range_check.py --sections local --out DIR   # some calls only
    python experiments/benchmarks/range_check.py --winners DIR/range_check.jsonl  # train_speed.py flags

``--no-sweep`` times the kernel's current settings alone (SWEEP: other tiles, warps and stages, on
the block rows and the self-attention calls).

At blt_mid's BLT-D-4 training shapes (batch 16, 4 096 bytes, static 4-byte patches, 1 025 blocks of 4
cells, 8 decoder heads of 64, window 512, bf16), one decoder layer's block attention,
fastblt.model.block_rows.block_attention, three ways: the XLA reference (gathered windows, chunked),
the fused path of today (tiles of blocks over shared key slices through cuDNN with a dense mask) and
the key-range kernel (block_rows.GPU_RANGE_KERNEL; also with other tiles, SWEEP), and that kernel with
each cell's own block as its second key set (block_rows.OWN_BLOCK_IN_KERNEL: "ranged_own"). For each: the output
and the gradients of q, k, v and the clean keys and values, their largest relative difference from the
reference (bf16: about one rounding), whether the kernel is in the program, and the time of a forward
plus backward (median of 20 after warm-up). Then the exact count of keys each row reads (zero queries:
log-sum-exp = log(keys)), which bf16 values cannot show. speed_gpu.sh's train rows with the
kernel (phase 30) run only after this passed on the same machine.

Then both cross-attentions in their reference forms (the decoder's gathered slots, the encoder's
segment sums) and as key ranges on the same kernel (cross_attention.GPU_CROSS_RANGES), checked and timed
alike. Then the self-attention the attention core runs on cuDNN (the decoder's windowed rows and the
global model's causal rows, within documents): the XLA path, cuDNN, and the same call with
attention.GPU_SELF_RANGES on, checked and timed alike. Every row must pass for phase 30's train rows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

# (batch, bytes, heads, head dim, window): blt_mid's decoder; a small shape for the interpreter.
MID = (16, 4096, 8, 64, 512)
SMALL = (2, 256, 2, 16, 32)
# Self-attention the attention core runs on cuDNN today (name, batch, rows, heads, head dim, window):
# blt_mid's decoder rows and its global model over 4-byte patches; small shapes for the interpreter.
LOCAL = [("decoder", 16, 4096, 8, 64, 512), ("global", 16, 1026, 16, 64, None)]
LOCAL_SMALL = [("decoder", 2, 96, 2, 16, 24), ("global", 2, 40, 2, 16, None)]


def inputs(batch: int, n: int, heads: int, hd: int, window: int, block: int = 4, patch: int = 4):
    """Block rows as a BLT-D step with static ``patch``-byte patches builds them (documents on), and
    random bf16 queries, keys and values. Returns (args of block_attention, the patch bound)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from fastblt.train import blt_d as objective

    rng = np.random.default_rng(0)
    slots = n // patch + 2  # BOS + the row's patches + the next one, as train_speed.py sizes them
    lengths = np.zeros((batch, slots), np.int32)
    lengths[:, 0] = 1
    lengths[:, 1 : 1 + n // patch] = patch
    lengths[:, 1 + n // patch - 1] -= 1  # the BOS byte is the row's first: the last patch is short
    tokens = rng.integers(4, 260, (batch, n))
    tokens[rng.random((batch, n)) < 2 / n] = 2  # ~2 documents per row
    tokens = jnp.asarray(tokens, jnp.int32)
    layout = objective.block_layout(jnp.asarray(lengths), n, block)
    start, ctx = objective.context_mask(layout, tokens, window, True)
    own = objective.self_mask(layout.in_row)
    rows = (slots - 1) * block
    keys = jax.random.split(jax.random.key(1), 5)
    shapes = [(batch, rows, heads, hd)] * 3 + [(batch, n, heads, hd)] * 2
    qkv = [
        jax.random.normal(k, s, jnp.float32).astype(jnp.bfloat16) for k, s in zip(keys, shapes, strict=True)
    ]
    return (*qkv, start, ctx, own), patch


# Settings of the range kernel timed besides the default, on the block rows and on the self-attention
# calls (block_q, block_k, block_q_dkv, num_warps, num_stages); values are checked for each. On one
# H200 (train_speed.md run 11) none beat cuDNN on the self-attention or the default
# (64, 64, 32, 4, 2) on the block rows.
SWEEP = [
    (64, 64, 64, 4, 2),
    (64, 64, 32, 4, 3),
    (128, 64, 32, 4, 2),
    (128, 64, 32, 8, 2),
    (128, 128, 64, 8, 2),
    (128, 64, 64, 8, 3),
    (64, 32, 32, 4, 2),
]


@contextlib.contextmanager
def kernel_settings(values):
    """fastblt.model.range_attention's TUNABLES set to ``values`` (as SWEEP's, in that order), then
    restored."""
    from fastblt.model import range_attention as ra

    before = [getattr(ra, name) for name in ra.TUNABLES]
    for name, value in zip(ra.TUNABLES, values, strict=True):
        setattr(ra, name, value)
    try:
        yield
    finally:
        for name, value in zip(ra.TUNABLES, before, strict=True):
            setattr(ra, name, value)


def sweep_name(values) -> str:
    return "ranged {}x{}, dkv {}, {} warps, {} stages".format(*values)


def check(shape, interpret: bool, repeats: int = 20, sweep: bool = False) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from fastblt.model import block_rows

    args, bound = inputs(*shape)
    q = args[0]
    weights = jax.random.normal(jax.random.key(2), q.shape, jnp.float32)

    def path(impl: str, ranged: bool, own_in_kernel: bool = False):
        """The block attention under this setting, compiled while the setting holds (a later call
        cannot retrace it under another). On the CPU the ranged path is called directly: block_attention
        takes it for GPU steps only. ``own_in_kernel``: block_rows.OWN_BLOCK_IN_KERNEL."""

        def attend(q, k, v, kc, vc, start, ctx, own):
            if ranged and interpret:
                return block_rows.ranged_block_attention(q, k, v, kc, vc, start, ctx, own, interpret=True)
            return block_rows.block_attention(q, k, v, kc, vc, start, ctx, own, None, bound, impl)

        switches = {"GPU_RANGE_KERNEL": ranged, "OWN_BLOCK_IN_KERNEL": own_in_kernel}
        return _compile_under(block_rows, switches, attend, weights, args[:5], args[5:])

    paths = {
        "xla": path("xla", False),
        "ranged": path("cudnn", True),
        "ranged_own": path("cudnn", True, own_in_kernel=True),
    }
    if not interpret:
        paths["tiles"] = path("cudnn", False)
        for values in SWEEP if sweep else []:
            with kernel_settings(values):
                paths[sweep_name(values)] = path("cudnn", True)

    results = {name: fn(*args[:5]) for name, (fn, _) in paths.items()}
    rows = []
    for name, (fn, has_kernel) in paths.items():
        (value, _), _ = results[name]
        r = {"path": name, "shape": list(shape), "device": str(jax.devices()[0])}
        r.update(_errors(results[name], results["xla"], ("out", "dq", "dk", "dv", "dk_ctx", "dv_ctx")))
        r["fwd_bwd_ms"] = _timed(fn, args[:5], repeats)
        # bf16 inputs and outputs: the paths sum in different orders; one bf16 rounding of the
        # largest entry (2^-8) with room for the gradients' longer sums.
        errors = [v for k, v in r.items() if k.endswith("_rel_error")]
        r["ok"] = bool(np.isfinite(float(value))) and max(errors) < 2e-2
        if not interpret:  # the kernel runs where, and only where, it should
            r["range_kernel_in_program"] = has_kernel
            r["ok"] &= has_kernel == name.startswith("ranged")
        rows.append(r)
    rows.append(check_counts(args, interpret))
    return rows


def check_counts(args, interpret: bool) -> dict:
    """Which keys the kernel reads, exactly: with zero queries every visible key scores 0, so each
    row's log-sum-exp is log(hi - lo) in float32 whatever the dtype, and one key too many or too few
    in a range of ~500 moves it by ~2e-3. The ranges are the block rows' (context_ranges)."""
    import jax.numpy as jnp
    import numpy as np

    from fastblt.model import block_rows
    from fastblt.model import range_attention as ra

    q, _, _, kc, vc, start, ctx, _ = args
    b, r = q.shape[:2]
    lo, hi, contiguous = block_rows.context_ranges(start, ctx)
    lo, hi = lo.reshape(b, r), hi.reshape(b, r)
    _, lse = ra.range_attention(jnp.zeros_like(q), kc, vc, lo, hi, interpret=interpret)
    count = np.asarray(hi - lo)[..., None].repeat(lse.shape[-1], -1)
    want = np.where(count > 0, np.log(np.maximum(count, 1)), -1e30)
    error = float(np.abs(np.asarray(lse, np.float64) - want)[count > 0].max())
    return {
        "path": "ranged, key counts",
        "max_keys": int(count.max()),
        "lse_max_abs_error": error,
        "ok": bool(contiguous) and error < 1e-4,
    }


def _compile_under(module, switches: dict[str, bool], attend, weights, args, extra=()) -> tuple:
    """``attend(*args, *extra)``'s weighted-sum loss with its value, output and gradients in every one
    of ``args``, compiled while each of ``module``'s ``switches`` holds its value (switches are read at
    trace time: a later call cannot retrace it under another setting). ``weights`` and ``extra``
    (masks, ids: no gradient) are arguments of the program, not constants: XLA would fold a
    closed-over mask for minutes.
    Returns (a function of ``args`` running the compiled program, whether the range kernel is in it)."""
    import jax
    import jax.numpy as jnp

    def loss(xs, weights, extra):
        out = attend(*xs, *extra)
        return jnp.sum(out.astype(jnp.float32) * weights), out

    before = {name: getattr(module, name) for name in switches}
    for name, on in switches.items():
        setattr(module, name, on)
    try:
        lowered = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(tuple(args), weights, tuple(extra))
        compiled = lowered.compile()
        has_kernel = lowered.as_text().count("fastblt_range_attention") > 0
    finally:
        for name, on in before.items():
            setattr(module, name, on)
    return (lambda *xs: compiled(tuple(xs), weights, tuple(extra))), has_kernel


def _timed(fn, args, repeats: int) -> float:
    import jax

    times = []
    for i in range(repeats + 3):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        if i >= 3:
            times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def _errors(got, want, labels=("out", "dq", "dk", "dv")) -> dict:
    """Each output's and gradient's largest difference from the reference, relative to its largest
    entry. got, want: ((loss, out), grads) as the compiled programs return them."""
    import numpy as np

    (_, out), grads = got
    (_, ref_out), ref_grads = want
    errors = {}
    for label, a, b in zip(labels, (out, *grads), (ref_out, *ref_grads), strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        errors[f"{label}_rel_error"] = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
    return errors


# The cross-attentions (batch, bytes, heads, head dim, slots per patch k, patch bytes):
# blt_mid's at 4-byte patches; a small shape for the interpreter.
CROSS = (16, 4096, 8, 64, 2, 4)
CROSS_SMALL = (2, 96, 2, 16, 2, 3)


def check_cross(shape, interpret: bool, repeats: int = 20) -> list[dict]:
    """Both cross-attentions in their reference forms (the decoder's gathered slots,
    fastblt.model.cross_attention.latent_attention; the encoder's segment sums, segment_attention) and as
    key ranges on the kernel (GPU_CROSS_RANGES): outputs and the gradients of the queries, keys and
    values, the kernel in the program, and the time of a forward plus backward."""
    import jax
    import jax.numpy as jnp

    from fastblt.model import cross_attention as cross

    b, n, h, d, kk, patch = shape
    p = n // patch + 2
    keys = jax.random.split(jax.random.key(4), 6)
    byte_rows = jax.random.normal(keys[0], (b, n, h, d), jnp.float32).astype(jnp.bfloat16)
    slot_rows = [jax.random.normal(x, (b, p, kk, h, d), jnp.float32).astype(jnp.bfloat16) for x in keys[1:4]]
    # The patcher's ids: the BOS byte alone in patch 0, then patches of ``patch`` bytes.
    index = jnp.broadcast_to((jnp.arange(n, dtype=jnp.int32) + patch - 1) // patch, (b, n))
    calls = {
        # name: (inputs, reference, ranged on the CPU); the GPU runs the reference under the switch.
        "decoder cross-attention": (
            (byte_rows, slot_rows[0], slot_rows[1]),
            lambda q, k, v, index, impl: cross.latent_attention(q, k, v, index, impl),
            lambda q, k, v, index: cross.latent_ranges(q, k, v, index, interpret=True),
        ),
        "encoder cross-attention": (
            (slot_rows[2], byte_rows, jax.random.normal(keys[4], (b, n, h, d)).astype(jnp.bfloat16)),
            lambda q, k, v, index, impl: cross.segment_attention(q, k, v, index, impl),
            lambda q, k, v, index: cross.segment_ranges(q, k, v, index, interpret=True),
        ),
    }
    rows = []
    for call, (args, reference, ranged_cpu) in calls.items():
        weights = jax.random.normal(keys[5], args[0].shape, jnp.float32)

        def path(ranged: bool, reference=reference, ranged_cpu=ranged_cpu, weights=weights, args=args):
            def attend(q, k, v, index):
                if ranged and interpret:
                    return ranged_cpu(q, k, v, index)
                return reference(q, k, v, index, "cudnn" if ranged else "xla")

            return _compile_under(cross, {"GPU_CROSS_RANGES": ranged}, attend, weights, args, (index,))

        paths = {"reference": path(False), "ranged": path(True)}
        results = {name: fn(*args) for name, (fn, _) in paths.items()}
        for name, (fn, has_kernel) in paths.items():
            r = {"call": call, "path": name, "shape": list(shape), "device": str(jax.devices()[0])}
            r.update(_errors(results[name], results["reference"]))
            r["fwd_bwd_ms"] = _timed(fn, args, repeats)
            r["ok"] = max(e for key, e in r.items() if key.endswith("_rel_error")) < 2e-2
            if not interpret:
                r["range_kernel_in_program"] = has_kernel
                r["ok"] &= has_kernel == (name == "ranged")
            rows.append(r)
    return rows


def check_local(shape, interpret: bool, repeats: int = 20, sweep: bool = False) -> list[dict]:
    """Causal (windowed) self-attention within documents, the attention core's LocalMask: the XLA path,
    cuDNN as the core runs it (GPU), and the range kernel through the same call with
    attention.GPU_SELF_RANGES on (on the CPU, the kernel interpreted with local_ranges directly).
    Rows per path as :func:`check` (forward plus backward, the kernel in the program where it should
    be)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from fastblt.model import attention as attn_lib
    from fastblt.model import range_attention as ra

    name, b, n, h, d, window = shape
    keys = jax.random.split(jax.random.key(3), 4)
    q, k, v = (jax.random.normal(x, (b, n, h, d), jnp.float32).astype(jnp.bfloat16) for x in keys[:3])
    weights = jax.random.normal(keys[3], q.shape, jnp.float32)
    tokens = np.random.default_rng(1).integers(4, 260, (b, n))
    tokens[np.random.default_rng(2).random((b, n)) < 2 / n] = 2  # ~2 documents per row
    docs = attn_lib.document_ids(jnp.asarray(tokens, jnp.int32))
    positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))

    def compiled(attend, ranged: bool):
        return _compile_under(
            attn_lib, {"GPU_SELF_RANGES": ranged}, attend, weights, (q, k, v), (positions, docs)
        )

    def cudnn(q, k, v, positions, docs):
        with attn_lib.rows_checked():  # the train step's host-checked packed layout
            return attn_lib.attention(q, k, v, attn_lib.LocalMask(positions, docs, window), "cudnn")

    def xla(q, k, v, positions, docs):
        return attn_lib.attention(q, k, v, attn_lib.LocalMask(positions, docs, window), "xla")

    def ranged_cpu(q, k, v, positions, docs):
        lo, hi = ra.local_ranges(docs, n, window)
        return ra.range_attention(q, k, v, jnp.broadcast_to(lo, (b, n)), jnp.broadcast_to(hi, (b, n)))[0]

    paths = {"xla": compiled(xla, False)}
    if interpret:
        paths["ranged"] = compiled(ranged_cpu, False)
    else:
        paths["cudnn"] = compiled(cudnn, False)
        paths["ranged"] = compiled(cudnn, True)  # the same call, the switch on
        for values in SWEEP if sweep else []:
            with kernel_settings(values):
                paths[sweep_name(values)] = compiled(cudnn, True)
    results = {p: fn(q, k, v) for p, (fn, _) in paths.items()}
    rows = []
    for p, (fn, has_kernel) in paths.items():
        r = {"call": name, "path": p, "shape": list(shape[1:]), "device": str(jax.devices()[0])}
        r.update(_errors(results[p], results["xla"]))
        r["fwd_bwd_ms"] = _timed(fn, (q, k, v), repeats)
        r["ok"] = max(e for key, e in r.items() if key.endswith("_rel_error")) < 2e-2
        if not interpret:
            r["range_kernel_in_program"] = has_kernel
            r["ok"] &= has_kernel == p.startswith("ranged")
        rows.append(r)
    return rows


def winners(rows: list[dict]) -> list[str]:
    """train_speed.py's range switches as a GPU run's rows timed them, each ``--x`` where its
    range-kernel path was faster, forward plus backward, than the path without it and ``--no-x``
    elsewhere: ``range-kernel`` (the block rows against the tiles), ``cross-ranges`` (both
    cross-attentions together against their reference forms), ``self-ranges`` (the decoder's and the
    global model's self-attention together against cuDNN). Missing or failed rows give ``--no-x``."""

    def total(pick) -> float:
        times = [r["fwd_bwd_ms"] for r in rows if pick(r)]
        return sum(times) if times and all(r.get("ok") for r in rows if pick(r)) else float("nan")

    def flag(name: str, new, old) -> str:
        return ("--" if total(new) < total(old) else "--no-") + name  # NaN compares false

    cross = lambda r: "cross-attention" in r.get("call", "")  # noqa: E731
    local = lambda r: r.get("call") in ("decoder", "global")  # noqa: E731
    return [
        flag(
            "range-kernel",
            lambda r: r.get("path") == "ranged" and "call" not in r,
            lambda r: r.get("path") == "tiles",
        ),
        flag(
            "cross-ranges",
            lambda r: cross(r) and r["path"] == "ranged",
            lambda r: cross(r) and r["path"] == "reference",
        ),
        flag(
            "self-ranges",
            lambda r: local(r) and r["path"] == "ranged",
            lambda r: local(r) and r["path"] == "cudnn",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--interpret", action="store_true", help="run the kernel in Pallas interpret mode")
    p.add_argument("--out", default=None)
    p.add_argument("--no-sweep", action="store_true", help="time the kernel's default tiles alone")
    p.add_argument(
        "--sections",
        nargs="+",
        choices=("block", "cross", "local"),
        default=["block", "cross", "local"],
        help="which calls: BLT-D's block rows, both cross-attentions, the self-attention (default: all)",
    )
    p.add_argument(
        "--winners",
        metavar="JSONL",
        help="print train_speed.py's range switches as a GPU run's rows timed them",
    )
    args = p.parse_args(argv)
    if args.winners:
        with open(args.winners) as f:
            print(" ".join(winners([json.loads(line) for line in f if line.strip()])))
        return 0
    repeats = 2 if args.interpret else 20
    sections = []
    if "block" in args.sections:
        sections.append(
            lambda: check(SMALL if args.interpret else MID, args.interpret, repeats, not args.no_sweep)
        )
    if "cross" in args.sections:
        sections.append(
            lambda: check_cross(CROSS_SMALL if args.interpret else CROSS, args.interpret, repeats)
        )
    if "local" in args.sections:
        sections += [
            lambda s=s: check_local(s, args.interpret, repeats, not args.no_sweep)
            for s in (LOCAL_SMALL if args.interpret else LOCAL)
        ]
    path = None
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "range_check.jsonl")
        open(path, "w").close()
    rows = []
    for section in sections:  # each section's rows are kept as it ends: a call cut short keeps them
        new = section()
        rows += new
        for r in new:
            print(json.dumps(r), flush=True)
        if path:
            with open(path, "a") as f:
                f.write("".join(json.dumps(r) + "\n" for r in new))
    ok = all(r["ok"] for r in rows)  # every row gates phase 30's train rows
    print("ok" if ok else "MISMATCH", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
