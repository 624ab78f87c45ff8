"""Where a sampler program's start-up time goes: tracing + lowering vs XLA compilation, per layer count.

    python experiments/benchmarks/compile_time.py --shape 1b --methods ar blt_s8 \\
        --variants full global5 small --out /tmp/compile_time
    python experiments/benchmarks/compile_time.py --shape tiny --variants full small   # CPU

Each row prepares one method's program at batch 1 (random weights, 64-byte prompt, 128 bytes, no
persistent compilation cache) and splits ``prepare``'s compile into ``lower_s`` (Python tracing and
StableHLO lowering) and ``compile_s`` (XLA), with the optimized module's instruction count. Variants
change only layer counts, so how compile time scales with the number of layers shows what scanning
the layers (one compiled body per stack) can save:

* ``full``: the shape's layers;
* ``global5``: the global model cut to 5 layers;
* ``small``: every stack cut to its first 2 layers (global 5).

``--scan both`` measures each variant with ``model.scan_decode_layers`` off and on. The first compile
of a process also pays one-time costs: for figures comparable across settings run one setting per
process, each with its own empty ``JAX_COMPILATION_CACHE_DIR`` (it holds XLA's autotuning results too),
or with the variable unset. Set but empty, JAX used to keep XLA's autotuning results in a directory
relative to the working directory, so the next process's compile was warm (generate_speed.md, run 12);
``prepare`` now clears an empty value (fastblt.compile_cache) before it compiles.
``--jax-timers`` adds the seconds of JAX's compile stages (cache key, cache read, XLA's compile, cache
write; summed over the two halves' threads) to each row; ``--compiler-option`` sets XLA options of both
halves, ``--prefill-compiler-option`` the prefill half's own (fastblt.sampler.api);
``--no-trace-layers-once`` traces every layer on its own (fastblt.sampler.cached.TRACE_LAYERS_ONCE).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))


def variant_config(config, variant: str):
    """The config with the variant's layer counts (see the module docstring)."""
    if variant == "full":
        return config
    glob = dataclasses.replace(config.global_model, n_layers=min(5, config.global_model.n_layers))
    if variant == "global5":
        return config.replace(global_model=glob)
    if variant == "small":
        small = lambda c: dataclasses.replace(c, n_layers=min(2, c.n_layers))  # noqa: E731
        return config.replace(
            global_model=glob,
            decoder=small(config.decoder),
            entropy_model=small(config.entropy_model),
            encoder=small(config.encoder),
        )
    raise ValueError(f"unknown variant {variant!r}: full, global5, small")


def timed_compiled(record: dict):
    """A stand-in for ``fastblt.sampler.api._compiled`` that records lowering and compile times."""
    import jax

    from fastblt.sampler import api
    from fastblt.sampler.decoding import Generation

    def compiled(key, fn, args):
        t0 = time.perf_counter()
        if isinstance(fn, Generation):  # the sampler's way: two programs compiled at once
            exe = api._compile_halves(fn, args, record)
        else:
            lowered = jax.jit(fn).lower(*args)
            t1 = time.perf_counter()
            exe = lowered.compile(compiler_options=api.compiler_options())
            record.update(lower_s=t1 - t0, compile_s=time.perf_counter() - t1)
        text = exe.as_text() or ""
        record["hlo_instructions"] = sum(1 for line in text.splitlines() if " = " in line)
        return exe, time.perf_counter() - t0

    return compiled


JAX_COMPILE_STAGES = ("_get_cache_key", "_cache_read", "backend_compile_and_load", "_cache_write")
_STAGES: dict = {}  # the row being timed (time_jax_compile_stages)


def time_jax_compile_stages(stages: dict) -> None:
    """Adds into ``stages`` the wall seconds of each stage of ``jax._src.compiler.compile_or_get_cached``
    (cache key, cache read, XLA's compile, cache write) from now on, summed over the two halves, which
    compile in two threads at once: where a compile with a persistent cache directory spends what one
    without does not. The wrappers go in once per process; later calls only redirect them."""
    import threading

    from jax._src import compiler

    global _STAGES
    _STAGES = stages
    if getattr(compiler, "_fastblt_timed", False):
        return
    lock = threading.Lock()

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                with lock:
                    _STAGES[name] = _STAGES.get(name, 0.0) + time.perf_counter() - t0

        return wrapper

    for name in JAX_COMPILE_STAGES:
        if hasattr(compiler, name):
            setattr(compiler, name, timed(name, getattr(compiler, name)))
    compiler._fastblt_timed = True


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="1b", choices=("tiny", "mid", "1b"))
    p.add_argument("--methods", nargs="+", default=["ar"])
    p.add_argument("--variants", nargs="+", default=["full", "global5", "small"])
    p.add_argument("--scan", choices=("off", "on", "both"), default="off")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--out", default=None)
    p.add_argument(
        "--jax-timers",
        action="store_true",
        help="time JAX's compile stages (cache key, cache read, XLA compile, cache write) per row",
    )
    p.add_argument(
        "--compiler-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an XLA option of both halves (fastblt.sampler.api.GPU_COMPILER_OPTIONS)",
    )
    p.add_argument(
        "--prefill-compiler-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an XLA option of the prefill half only (fastblt.sampler.api.GPU_PREFILL_COMPILER_OPTIONS)",
    )
    p.add_argument(
        "--trace-layers-once",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="override fastblt.sampler.cached.TRACE_LAYERS_ONCE (on by default): an unrolled stack's "
        "layers traced and lowered once per program",
    )
    args = p.parse_args(argv)

    import jax

    from experiments.benchmarks.generate_speed import method_kwargs, model_config, xla_options
    from fastblt.sampler import api, cached
    from fastblt.sampler.bench import random_params

    if args.trace_layers_once is not None:
        cached.TRACE_LAYERS_ONCE = args.trace_layers_once

    api.GPU_COMPILER_OPTIONS.update(xla_options(args.compiler_option, "--compiler-option"))
    api.GPU_PREFILL_COMPILER_OPTIONS.update(
        xla_options(args.prefill_compiler_option, "--prefill-compiler-option")
    )

    out = None
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        out = open(os.path.join(args.out, "compile_time.jsonl"), "a")
    base = model_config(args.shape)
    scans = {"off": [False], "on": [True], "both": [False, True]}[args.scan]
    prompts = [bytes(range(65, 65 + 64))] * args.batch
    for variant in args.variants:
        for scan in scans:
            config = variant_config(base, variant).replace(scan_decode_layers=scan)
            params = random_params(config, 0, config.dtype)
            for name in args.methods:
                record = {
                    "device": str(jax.devices()[0].device_kind),
                    "compiler_options": dict(api.GPU_COMPILER_OPTIONS),
                    "prefill_compiler_options": dict(api.GPU_PREFILL_COMPILER_OPTIONS),
                    "trace_layers_once": cached.TRACE_LAYERS_ONCE,
                    "shape": args.shape,
                    "variant": variant,
                    "scan_layers": scan,
                    "method": name,
                    "batch": args.batch,
                    "layers": {
                        "global": config.global_model.n_layers,
                        "decoder": config.decoder.n_layers,
                        "entropy": config.entropy_model.n_layers,
                        "encoder": config.encoder.n_layers,
                    },
                }
                stages: dict = {}
                if args.jax_timers:
                    time_jax_compile_stages(stages)
                api._COMPILED.clear()
                real = api._compiled
                api._compiled = timed_compiled(record)
                try:
                    t0 = time.perf_counter()
                    program = api.prepare(
                        params,
                        config,
                        prompts,
                        max_bytes=128,
                        stop_at_eos=False,
                        compilation_cache=False,
                        **method_kwargs(name, 1.0),
                    )
                    record["prepare_s"] = time.perf_counter() - t0
                finally:
                    api._compiled = real
                if args.jax_timers:  # prepare's own compiles only, and the directory they used
                    record["jax_stages"] = dict(stages)
                    record["cache_dir"] = jax.config.jax_compilation_cache_dir
                    record["xla_caches"] = jax.config.jax_persistent_cache_enable_xla_caches
                api.run_program(program)
                runs = [api.run_program(program).seconds for _ in range(2)]
                record["run_s"] = min(runs)
                line = json.dumps(record)
                print(line, flush=True)
                if out:
                    out.write(line + "\n")
                    out.flush()


if __name__ == "__main__":
    main()
