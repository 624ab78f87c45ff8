"""Training speed: fastblt's train step next to the PyTorch port at the same shapes and patches.

    python experiments/benchmarks/train_speed.py --shape mid --out /tmp/train_speed
    python experiments/benchmarks/train_speed.py --shape tiny --steps 3 --warmup 1   # CPU smoke run

Rows (each in its own process, so peak memory and failures are its own):

* ``entropy``: the entropy model trained alone (stage 1 of an entropy-patched run);
* ``blt``: plain BLT, static 4-byte patches (the port is given the same patch lengths);
* ``blt_p8``: plain BLT, static 8-byte patches: half the patches of ``blt`` and a patch buffer sized
  to them, so the global model's share of the step should fall (compare ``--profile blt blt_p8``);
* ``blt_entropy``: plain BLT patched in the step by a (random) frozen entropy model, threshold set
  to the quantile that gives ~4.5 bytes per patch;
* ``blt_d4``, ``blt_d8``: BLT-D with blocks of 4 / 8 bytes (static 4-byte patches);
* ``torch``, ``torch_compile``: transformers' ``BltForCausalLM`` at the ``blt`` row's shape and
  patch lengths: eager and ``torch.compile``d, sdpa attention, bf16 autocast, fused AdamW;
* ``matmul``: an 8192^3 bf16 matmul and a large copy, the measured ceilings of this run.

Per row: bytes/s (median of the timed steps, each waited for), the step time as the train loop runs
steps (``loop step ms``: the next step dispatched before the last is waited for; the port's steps
queued back to back), MFU against the chip's spec peak and against the
matmul rate measured in the same run, peak memory (XLA's memory analysis; the allocator's peak),
compile seconds. ``--profile ROW [ROW ...]`` also traces those rows and prints time per component
(fastblt/profiling.py). Results: JSON lines, a markdown table and a PNG bar chart under ``--out``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import statistics
import subprocess
import sys
import time

ROWS = ("matmul", "entropy", "blt", "blt_p8", "blt_entropy", "blt_d4", "blt_d8", "torch", "torch_compile")


# ----------------------------------------------------------------------------------------- configs


def experiment(
    shape: str,
    row: str,
    batch: int | None,
    seq_len: int | None,
    remat: str | None = None,
    attention_impl: str | None = None,
    scan_layers: str | None = None,
):
    """The ml-collections config of a row at a shape (tiny | mid | 1b); ``remat`` (off | a
    ``model.remat_policy``) overrides the shape's recomputation, ``attention_impl`` its
    ``model.attention_impl``, ``scan_layers`` (on | off) its ``model.scan_layers``."""
    import ml_collections

    from experiments import base, blt_1b, blt_mid, tiny

    cfg = {"tiny": tiny, "mid": blt_mid, "1b": blt_1b}[shape].get_config()
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    if shape == "1b":  # one H200: BLT-1B with remat and scanned global layers, bf16
        cfg.model.dtype = "bfloat16"
        cfg.model.remat = True
        cfg.model.scan_layers = True
        cfg.data.batch_size, cfg.data.seq_len = 8, 4096
        cfg.model.patcher.max_patches = 1100
    if batch:
        cfg.data.batch_size = batch
    if seq_len:
        cfg.data.seq_len = seq_len
    if attention_impl:
        cfg.model.attention_impl = attention_impl
    if remat:
        cfg.model.remat = remat != "off"
        cfg.model.remat_policy = "full" if remat == "off" else remat
    if scan_layers:
        cfg.model.scan_layers = scan_layers == "on"
    cfg.train.steps = 1000
    cfg.checkpoint.async_save = False
    if row in ("blt", "blt_p8", "blt_d4", "blt_d8", "torch", "torch_compile"):
        size = 8 if row == "blt_p8" else 4
        cfg.model.patcher.mode = "static"
        cfg.model.patcher.patch_size = size
        # The real patch count of static patches, no padded slots: BOS + ceil(N / size) + next.
        cfg.model.patcher.max_patches = cfg.data.seq_len // size + 2
    if row.startswith("blt_d"):
        base.blt_d(cfg, int(row.removeprefix("blt_d")))
    return cfg


def batches(cfg, n: int = 4) -> list[dict]:
    from fastblt.data import make_train_iterator

    it = make_train_iterator(cfg.data, 0, 1)
    return [next(it) for _ in range(n)]


# ----------------------------------------------------------------------------------------- rows


# Our Pallas kernels by their names in a lowered program (every pallas_call of fastblt is named
# "fastblt_..."): a row run with a switch on records whether its kernels are really in the step (a
# switch can be on and its path not taken).
_PALLAS_NAME = re.compile(r"\bfastblt_\w+")


def pallas_kernels(text: str) -> list[str]:
    """The distinct names of our Pallas kernels in a lowered program's text (forward and backward
    kernels have their own names)."""
    return sorted(set(_PALLAS_NAME.findall(text)))


def _memory(compiled) -> dict:
    import jax

    out = {}
    try:
        ma = compiled.memory_analysis()
        out["xla_temp_gb"] = ma.temp_size_in_bytes / 1e9
        out["xla_args_gb"] = ma.argument_size_in_bytes / 1e9
        out["xla_total_gb"] = (
            ma.temp_size_in_bytes
            + ma.argument_size_in_bytes
            + ma.output_size_in_bytes
            - ma.alias_size_in_bytes
        ) / 1e9
    except Exception as e:  # some backends keep no analysis
        out["xla_memory"] = f"unavailable: {e}"
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["peak_gb"] = stats["peak_bytes_in_use"] / 1e9
    return out


def run_jax_row(args, row: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from fastblt import sharding
    from fastblt.config import experiment_config
    from fastblt.model import EntropyModel
    from fastblt.model.attention import segments_needed
    from fastblt.model.patcher import entropy as entropy_of
    from fastblt.train.loop import Trainer, entropy_stage_config
    from fastblt.train.metrics import entropy_model_flops_per_byte, model_flops_per_byte, peak_flops

    cfg = experiment(
        args.shape, row, args.batch, args.seq_len, args.remat, args.attention_impl, args.scan_layers
    )
    data = batches(cfg)
    frozen = None
    if row == "entropy":
        cfg = entropy_stage_config(cfg)
    elif row == "blt_entropy":
        # A random frozen entropy model, threshold at the quantile for ~4.5 bytes per patch.
        em = EntropyModel(_entropy_cfg(cfg))
        frozen = jax.jit(lambda k: em.init(k, jnp.ones((1, 8), jnp.int32))["params"])(jax.random.key(1))
        frozen = jax.tree.map(lambda x: getattr(x, "value", x), frozen, is_leaf=lambda x: hasattr(x, "value"))
        ent = np.asarray(
            jax.jit(lambda p, t: entropy_of(em.apply({"params": p}, t)))(frozen, data[0]["inputs"])
        )
        cfg.model.patcher.threshold = float(np.quantile(ent[:, 1:], 1 - 1 / 4.5))
    cfg = experiment_config(cfg)
    mesh = sharding.make_mesh(cfg.mesh)
    trainer = Trainer(cfg, mesh, frozen)
    state = trainer.init_state(0)
    gb = [sharding.global_batch(b, trainer.batch_sharding) for b in data]

    t0 = time.perf_counter()
    # The step the train loop runs for these batches (Trainer.step_for: rows checked on the host),
    # or with --checked-step the one that checks documents per row on the device in every layer.
    # Batches of different segment tiers all take the step of the one that needs the most.
    step, tier = trainer.train_step, None
    inputs = np.concatenate([b["inputs"] for b in data])
    if not args.checked_step:
        step = trainer.step_for(inputs)
        tier = next((m for m, s in trainer.packed_train_steps.items() if s is step), None)
    lowered = step.lower(state, trainer.frozen, gb[0])
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    times, metrics = [], None
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        state, metrics = compiled(state, trainer.frozen, gb[i % len(gb)])
        jax.block_until_ready(metrics)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    step_s = statistics.median(times)
    # As the train loop runs (fastblt.train.loop): step i+1 is dispatched before step i is waited for,
    # so the host's dispatch of a step overlaps the device's work on the one before.
    t = time.perf_counter()
    in_flight = None
    for i in range(args.steps):
        state, metrics = compiled(state, trainer.frozen, gb[i % len(gb)])
        if in_flight is not None:
            jax.block_until_ready(in_flight)
        in_flight = metrics
    jax.block_until_ready(in_flight)
    loop_step_s = (time.perf_counter() - t) / args.steps
    seq_len = int(cfg.data.seq_len)
    bytes_per_step = int(cfg.data.batch_size) * seq_len
    task = trainer.task
    if row == "entropy":
        fpb = entropy_model_flops_per_byte(task.config, seq_len, training=True)
    else:
        fpb = model_flops_per_byte(
            task.config, seq_len, m.get("avg_patch_len", 4.0), objective=getattr(task, "objective", None)
        )
        if task.config.patcher.mode == "entropy":
            fpb += entropy_model_flops_per_byte(task.config, seq_len)
    bps = bytes_per_step / step_s
    peak = peak_flops(jax.devices()[0].device_kind)
    out = {
        "row": row,
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "batch": int(cfg.data.batch_size),
        "seq_len": seq_len,
        "remat": None if cfg.model is None else cfg.model.remat_policy if cfg.model.remat else "off",
        "attention_impl": None if cfg.model is None else cfg.model.attention_impl,
        "scan_layers": None if cfg.model is None else bool(cfg.model.scan_layers),
        "step_ms": 1e3 * step_s,
        "step_ms_min": 1e3 * min(times),
        "bytes_per_sec": bps,
        "loop_step_ms": 1e3 * loop_step_s,
        "loop_bytes_per_sec": bytes_per_step / loop_step_s,
        "compile_s": compile_s,
        "model_tflops_per_step": fpb * bytes_per_step / 1e12,
        "mfu_spec": fpb * bps / peak if peak else None,
        "loss": m.get("loss"),
        "avg_patch_len": m.get("avg_patch_len"),
        "patches_per_row": m.get("patches_per_row"),
        "patch_overflow": m.get("patch_overflow"),
        **_memory(compiled),
        "pallas_kernels": pallas_kernels(lowered.as_text()),
        "packed_segments": tier,  # the host-checked step's segments per row (None: checked per layer)
        "segments_needed": segments_needed(inputs),
    }
    if row in args.profile:
        from fastblt.profiling import format_table, profile_components

        prof = profile_components(
            compiled, (state, trainer.frozen, gb[0]), steps=3, carry=lambda o, a: (o[0], a[1], a[2]), top=5000
        )
        out["profile"] = prof
        print(format_table(prof, f"{row} ({args.shape})"), file=sys.stderr)
    return out


def _entropy_cfg(cfg):
    from fastblt.config import model_config

    return model_config(cfg).entropy_model


def run_matmul_row(args) -> dict:
    import jax
    import jax.numpy as jnp

    n = 8192 if jax.default_backend() != "cpu" else 1024
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    mm = jax.jit(lambda a, b: a @ b)
    mm(a, b).block_until_ready()
    reps = 20
    t = time.perf_counter()
    for _ in range(reps):
        c = mm(a, b)
    c.block_until_ready()
    mm_s = (time.perf_counter() - t) / reps
    x = jax.random.normal(jax.random.key(2), (1 << 28 if n == 8192 else 1 << 22,), jnp.float32)
    cp = jax.jit(lambda x: x * 1.0001)
    cp(x).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        y = cp(x)
    y.block_until_ready()
    cp_s = (time.perf_counter() - t) / reps
    return {
        "row": "matmul",
        "device": jax.devices()[0].device_kind,
        "matmul_tflops": 2 * n**3 / mm_s / 1e12,
        "copy_tb_per_s": 2 * x.size * 4 / cp_s / 1e12,
    }


def run_torch_row(args, row: str) -> dict:
    import numpy as np
    import torch
    import transformers

    from fastblt.config import model_config
    from fastblt.io.huggingface import config_to_hf
    from fastblt.model import patcher as patching

    cfg = experiment(args.shape, row, args.batch, args.seq_len)
    model_cfg = model_config(cfg)
    hf_model_cfg = model_cfg.replace(patcher=model_cfg.patcher.__class__(mode="entropy"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = transformers.BltConfig(**config_to_hf(hf_model_cfg))
    hf.patch_in_forward = False
    hf._attn_implementation = "sdpa"
    model = transformers.BltForCausalLM(hf).to(device)
    model.train()
    fused = device == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    data = batches(cfg)
    lengths = [
        np.asarray(
            patching.patch(b["inputs"], None, model_cfg.patcher, model_cfg.patcher.max_patches).lengths
        )
        for b in data
    ]
    inputs = [torch.from_numpy(np.asarray(b["inputs"], np.int64)).to(device) for b in data]
    plens = [torch.from_numpy(pl.astype(np.int64)).to(device) for pl in lengths]
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=model_cfg.dtype == "bfloat16")

    def step(ids, pl):
        with autocast:
            out = model(input_ids=ids, labels=ids, patch_lengths=pl, use_cache=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    fn = torch.compile(step) if row == "torch_compile" else step
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    try:
        fn(inputs[0], plens[0])
        sync()
    except Exception as e:
        return {"row": row, "failed": f"{type(e).__name__}: {str(e)[:300]}"}
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        loss = fn(inputs[i % len(inputs)], plens[i % len(plens)])
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    t = time.perf_counter()  # steps back to back, waited for once: eager PyTorch queues its kernels
    for i in range(args.steps):
        loss = fn(inputs[i % len(inputs)], plens[i % len(plens)])
    sync()
    loop_step_s = (time.perf_counter() - t) / args.steps
    out = {
        "row": row,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "batch": int(cfg.data.batch_size),
        "seq_len": int(cfg.data.seq_len),
        "step_ms": 1e3 * step_s,
        "bytes_per_sec": int(cfg.data.batch_size) * int(cfg.data.seq_len) / step_s,
        "loop_step_ms": 1e3 * loop_step_s,
        "loop_bytes_per_sec": int(cfg.data.batch_size) * int(cfg.data.seq_len) / loop_step_s,
        "compile_s": compile_s,
        "loss": float(loss.detach()),
    }
    if device == "cuda":
        out["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return out


# ----------------------------------------------------------------------------------------- driver


# Model switches a row can set or clear (--x / --no-x; default: the module's own setting): the flag's
# attribute -> (module, switch, what it does). Set in the row's own process before its step is traced;
# each row records every switch as it ran.
SWITCHES = {
    "fused_norm": (
        "fastblt.model.layers",
        "GPU_FUSED_NORM",
        "training-sized RMSNorms as one Pallas kernel per direction (one GPU)",
    ),
    "norm_parts": (
        "fastblt.model.layers",
        "GPU_NORM_PARTS",
        "each layer's pre-norms with their products as one op whose backward runs the norm kernel on the "
        "products' unsummed gradients and the residual's (fastblt.model.prenorm; one GPU)",
    ),
    "pool_kernel": (
        "fastblt.model.blt",
        "GPU_POOL_KERNEL",
        "the encoder's patch max-pool as one Pallas kernel instead of XLA's scatters (one GPU)",
    ),
    "range_kernel": (
        "fastblt.model.block_rows",
        "GPU_RANGE_KERNEL",
        "BLT-D's block rows attend their context through the key-range Pallas kernel "
        "(fastblt.model.range_attention) instead of tiles",
    ),
    "own_in_kernel": (
        "fastblt.model.block_rows",
        "OWN_BLOCK_IN_KERNEL",
        "BLT-D's block cells attend their own block's cells as the range kernel's second key set, in the "
        "context's softmax, instead of XLA's products per block merged by log-sum-exp (only where the "
        "block rows take the range kernel: not with --no-range-kernel)",
    ),
    "cross_ranges": (
        "fastblt.model.cross_attention",
        "GPU_CROSS_RANGES",
        "both cross-attentions on the range kernel (the decoder's rows read their patch's slots, the "
        "encoder's slots their patch's bytes, as key ranges)",
    ),
    "self_ranges": (
        "fastblt.model.attention",
        "GPU_SELF_RANGES",
        "the stacks' causal (windowed) self-attention within documents on the range kernel instead of cuDNN",
    ),
}


def run_row(args, row: str) -> dict:
    if row == "matmul":
        return run_matmul_row(args)
    if row.startswith("torch"):
        return run_torch_row(args, row)
    settings = apply_switches(args)
    settings["segment_tiers"] = apply_segment_tiers(args)
    from fastblt.model import range_attention

    # The key-range kernel's settings as the row ran (the kernel runs where pallas_kernels names it).
    settings["range_kernel_settings"] = range_attention.settings()
    return {**run_jax_row(args, row), **settings}


def apply_switches(args) -> dict[str, bool]:
    """Sets each switch the command line names (``--x``: on, ``--no-x``: off, neither: the module's
    own setting) in this process; returns every switch as the row will run, defaults included."""
    settings = {}
    for flag, (module, switch, _) in SWITCHES.items():
        module = importlib.import_module(module)
        if getattr(args, flag) is not None:
            setattr(module, switch, getattr(args, flag))
        settings[flag] = bool(getattr(module, switch))
    return settings


def apply_segment_tiers(args) -> list[int]:
    """Sets fastblt.model.attention.SEGMENT_TIERS from ``--segment-tiers`` (if given) in this
    process; returns the tiers the row runs with."""
    from fastblt.model import attention

    if args.segment_tiers:
        tiers = list(args.segment_tiers)
        if tiers != sorted(set(tiers)) or tiers[0] < 1:
            raise SystemExit(f"--segment-tiers must rise and be >= 1, e.g. 4 8; got {tiers}")
        attention.SEGMENT_TIERS = tuple(tiers)
    return list(attention.SEGMENT_TIERS)


def write_results(results: list[dict], out_dir: str, command: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "train_speed.jsonl"), "w") as f:
        for r in results:
            f.write(json.dumps({k: v for k, v in r.items() if k != "profile"}) + "\n")
    mm = next((r for r in results if r["row"] == "matmul" and "matmul_tflops" in r), None)
    lines = [
        f"command: `{command}`",
        "",
        "| row | bytes/s | step ms | loop step ms | MFU spec | MFU measured mm | peak GB | XLA GB | compile s |",
    ]
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        if r["row"] == "matmul" or "bytes_per_sec" not in r:
            if "failed" in r:
                lines.append(f"| {r['row']} | failed: {r['failed'][:80]} | | | | | | | |")
            continue
        mfu = r.get("mfu_spec")
        mfu_mm = None
        if mfu is not None and mm:
            mfu_mm = r["model_tflops_per_step"] / (r["step_ms"] / 1e3) / mm["matmul_tflops"]
        fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
        label = r["row"] + (
            f" (remat {r['remat']}, {r['attention_impl']}{', scanned' if r.get('scan_layers') else ''})"
            if r.get("attention_impl")
            else ""
        )
        lines.append(
            f"| {label} | {r['bytes_per_sec'] / 1e3:.1f} k | {r['step_ms']:.1f} | {fmt(r.get('loop_step_ms'), '.1f')} | "
            f"{fmt(mfu and 100 * mfu, '.1f')} % | "
            f"{fmt(mfu_mm and 100 * mfu_mm, '.1f')} % | {fmt(r.get('peak_gb'), '.1f')} | {fmt(r.get('xla_total_gb'), '.1f')} | "
            f"{r['compile_s']:.1f} |"
        )
    if mm:
        lines += [
            "",
            f"measured: bf16 matmul {mm['matmul_tflops']:.0f} TFLOP/s, copy {mm['copy_tb_per_s']:.2f} TB/s",
        ]
    for r in results:
        if "profile" in r:
            from fastblt.profiling import format_table

            lines += ["", format_table(r["profile"], f"profile: {r['row']}")]
            lines += ["", "top ops (ms/step, hlo op, op name):"]
            lines += [f"- {ms:.2f} `{op}` {name[:160]}" for ms, op, name in r["profile"]["top_ops"][:15]]
            with open(os.path.join(out_dir, f"profile_{r['row']}.json"), "w") as f:
                json.dump(r["profile"], f)
    with open(os.path.join(out_dir, "train_speed.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    _plot(results, os.path.join(out_dir, "train_speed.png"))


def _plot(results: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [r for r in results if "bytes_per_sec" in r]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(8, 4))
    colors = ["tab:orange" if r["row"].startswith("torch") else "tab:blue" for r in rows]
    ax.bar([r["row"] for r in rows], [r["bytes_per_sec"] / 1e3 for r in rows], color=colors)
    ax.set_ylabel("training kB/s (median step)")
    ax.set_title(
        f"train step, {rows[0].get('device', '')}, batch {rows[0]['batch']} x {rows[0]['seq_len']} bytes"
    )
    for i, r in enumerate(rows):
        ax.text(
            i,
            r["bytes_per_sec"] / 1e3,
            f"{r['bytes_per_sec'] / 1e3:.0f}",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parser() -> argparse.ArgumentParser:
    from fastblt.config import ATTENTION_IMPLS, REMAT_POLICIES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="mid", choices=("tiny", "mid", "1b"))
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument("--steps", type=int, default=20, help="timed steps per row (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument(
        "--remat",
        default=None,
        choices=("off", *REMAT_POLICIES),
        help="fastblt's rows: model.remat off, or on with this model.remat_policy (default: the shape's, "
        "full at 1b, off otherwise); the port never recomputes",
    )
    p.add_argument(
        "--attention-impl",
        default=None,
        choices=ATTENTION_IMPLS,
        help="fastblt's rows: model.attention_impl (default: the shape's config, auto at mid and 1b)",
    )
    p.add_argument(
        "--scan-layers",
        default=None,
        choices=("on", "off"),
        help="fastblt's rows: model.scan_layers, the global layers as one lax.scan over stacked parameters "
        "(default: the shape's, on at 1b, off otherwise)",
    )
    p.add_argument(
        "--profile", nargs="*", default=[], choices=ROWS, help="also trace these rows: time per component"
    )
    p.add_argument("--out", default=None, help="directory for train_speed.{jsonl,md,png}")
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)  # internal: run one row here
    p.add_argument("--timeout", type=int, default=900, help="seconds per row")
    p.add_argument(
        "--checked-step",
        action="store_true",
        help="time the step that checks documents per row in every layer (the train loop's choice for "
        "a batch with a row of more documents than the largest of attention.SEGMENT_TIERS) instead of the "
        "host-checked one",
    )
    p.add_argument(
        "--segment-tiers",
        type=int,
        nargs="+",
        default=None,
        help="the packed layouts' segments per row a host-checked step may take, smallest first "
        "(default: fastblt.model.attention.SEGMENT_TIERS); --segment-tiers 8 is the one layout of "
        "before the tiers",
    )
    for flag, (module, switch, what) in SWITCHES.items():
        p.add_argument(
            "--" + flag.replace("_", "-"),
            action=argparse.BooleanOptionalAction,
            help=f"{module}.{switch} on or off (default: as the module sets it): {what}",
        )
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.row:
        print("RESULT " + json.dumps(run_row(args, args.row)), flush=True)
        return
    results = []
    for row in args.rows:
        cmd = [sys.executable, os.path.abspath(__file__), "--row", row] + _forward(args)
        env = dict(os.environ)
        if row.startswith("torch"):
            # The port's process uses JAX only for its data and patch lengths: on the CPU, so JAX's
            # preallocation (75% of the GPU) does not leave PyTorch too little on an 80 GB card.
            env["JAX_PLATFORMS"] = "cpu"
        if row in args.profile:
            # Kernels inside CUDA graphs carry no HLO op name in the trace: plain launches here.
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=").strip()
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if lines:
                result = json.loads(lines[-1][len("RESULT ") :])
            else:
                result = {"row": row, "failed": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
            sys.stderr.write("".join(ln + "\n" for ln in proc.stderr.splitlines() if not ln.startswith("W")))
        except subprocess.TimeoutExpired:
            result = {"row": row, "failed": f"timed out after {args.timeout} s"}
        result["wall_s"] = time.perf_counter() - t0
        if row in args.profile:
            result["note"] = "profiled process: plain kernel launches (no CUDA graphs)"
        print(json.dumps({k: v for k, v in result.items() if k != "profile"}), flush=True)
        results.append(result)
        if args.out:  # after every row: a run cut short keeps what it measured
            write_results(results, args.out, "python " + " ".join(sys.argv))
    if args.out:
        with open(os.path.join(args.out, "train_speed.md")) as f:
            print(f.read())


def _forward(args) -> list[str]:
    out = ["--shape", args.shape, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    out += ["--checked-step"] if args.checked_step else []
    if args.segment_tiers:
        out += ["--segment-tiers", *map(str, args.segment_tiers)]
    for flag in SWITCHES:
        if getattr(args, flag) is not None:
            out.append(("--" if getattr(args, flag) else "--no-") + flag.replace("_", "-"))
    if args.batch:
        out += ["--batch", str(args.batch)]
    if args.seq_len:
        out += ["--seq-len", str(args.seq_len)]
    if args.remat:
        out += ["--remat", args.remat]
    if args.attention_impl:
        out += ["--attention-impl", args.attention_impl]
    if args.scan_layers:
        out += ["--scan-layers", args.scan_layers]
    if args.profile:
        out += ["--profile", *args.profile]
    return out


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    main()
