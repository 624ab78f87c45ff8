"""Would a generation program compile sooner as two programs compiled at once? A measurement.

    python experiments/benchmarks/split_compile.py --shape 1b --mode full|serial|parallel --out DIR

A sampler program (fastblt.sampler.decoding.decode) is the prompt's prefill followed by the
generation loop, and each holds a whole unrolled copy of the model. XLA compiles one module on
about one thread (16 compile threads did not shorten it: generate_speed.md, run 8). Cut at the loop
carry, the two halves can compile concurrently in two threads. This script times ``ar``'s program
three ways, one way per fresh process, each cold: an empty cache directory of its own, or
``JAX_COMPILATION_CACHE_DIR`` unset (run 10 ran its three with the variable set but empty, in this
order, and each found the one before's autotuning results: generate_speed.md, run 12):

* ``full``: the program as one module (the sampler's way before run 10);
* ``serial``: the prefill half, then the loop half;
* ``parallel``: both halves in two threads at once.

``--check`` compiles the full program as well and checks that the halves give its bytes.

The halves are fastblt.sampler.decoding.Generation's; since run 10 (generate_speed.md) the sampler
compiles them the ``parallel`` way (fastblt.sampler.api._compile_halves).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))


def halves(batch: int, shape: str):
    """(whole function, prefill half, loop half, args) of ``ar`` at ``shape`` (random weights): the
    halves of fastblt.sampler.decoding.Generation, as the sampler compiles them."""
    from experiments.benchmarks.generate_speed import method_kwargs, model_config
    from fastblt.sampler import api
    from fastblt.sampler.bench import random_params

    config = model_config(shape)
    params = random_params(config, 0, config.dtype)
    recorded: dict = {}
    real_compiled = api._compiled

    class Built(Exception):
        pass

    def capture(key, fn, args):
        recorded.update(fn=fn, args=args)
        raise Built

    api._compiled = capture
    try:
        api.prepare(
            params,
            config,
            [bytes(range(65, 129))] * batch,
            max_bytes=128,
            stop_at_eos=False,
            compilation_cache=False,
            **method_kwargs("ar", 1.0),
        )
    except Built:
        pass
    finally:
        api._compiled = real_compiled
    fn = recorded["fn"]
    return fn, fn.start, lambda *a: fn.results(fn.finish(*a)), recorded["args"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="1b", choices=("tiny", "mid", "1b"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--mode", required=True, choices=("full", "serial", "parallel"))
    p.add_argument("--check", action="store_true", help="compare the halves' bytes with the full program's")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import jax
    import numpy as np

    full, prefill_half, loop_half, call_args = halves(args.batch, args.shape)
    record = {"device": str(jax.devices()[0].device_kind), "shape": args.shape, "batch": args.batch}
    record["mode"] = args.mode
    t0 = time.perf_counter()
    if args.mode == "full":
        lowered = [jax.jit(full).lower(*call_args)]
    else:
        loop_shape = jax.eval_shape(prefill_half, *call_args)
        lowered = [
            jax.jit(prefill_half).lower(*call_args),
            jax.jit(loop_half).lower(*call_args, loop_shape),
        ]
    record["lower_s"] = time.perf_counter() - t0
    exes: list = [None] * len(lowered)

    def compile_one(i: int) -> None:
        start = time.perf_counter()
        exes[i] = lowered[i].compile()
        record[f"compile_{i}_s"] = time.perf_counter() - start

    t0 = time.perf_counter()
    if args.mode == "parallel":
        threads = [threading.Thread(target=compile_one, args=(i,)) for i in range(len(lowered))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for i in range(len(lowered)):
            compile_one(i)
    record["compile_s"] = time.perf_counter() - t0

    def run():
        if args.mode == "full":
            return jax.block_until_ready(exes[0](*call_args))["tokens"]
        loop = exes[0](*call_args)
        return jax.block_until_ready(exes[1](*call_args, loop))["tokens"]

    tokens = run()
    t0 = time.perf_counter()
    run()
    record["run_s"] = time.perf_counter() - t0
    if args.check and args.mode != "full":
        reference = jax.jit(full)(*call_args)["tokens"]
        record["same_tokens"] = bool(np.array_equal(np.asarray(reference), np.asarray(tokens)))
    line = json.dumps(record)
    print(line, flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "split_compile.jsonl"), "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
