"""Generation speed on random weights: ``python -m fastblt.sampler.bench [--size 1b|tiny] ...``.

Random weights, so text quality means nothing; the patch threshold is set to the entropy quantile
that gives ``--bytes-per-patch`` (BLT-1B averages about 4.5), so the global model runs about as
often as with trained weights. Prints one JSON line per measurement: method, batch, bytes/s,
seconds, compile seconds, counters. The uncached peer (the reference's ``generate_nocache`` as
transformers runs it) is ``experiments/benchmarks/generate_speed.py``'s ``hf`` row.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np

from fastblt.config import (
    EntropyModelConfig,
    HashConfig,
    LocalModelConfig,
    ModelConfig,
    TransformerConfig,
)
from fastblt.model import BLT, abstract_params
from fastblt.sampler.api import encode_prompts, generate


def _config(size: str, dtype: str) -> ModelConfig:
    if size == "1b":
        base = ModelConfig()
    else:
        base = ModelConfig(
            encoder=LocalModelConfig(dim=256, n_layers=1, n_heads=4),
            global_model=TransformerConfig(dim=512, n_layers=4, n_heads=8),
            decoder=LocalModelConfig(dim=256, n_layers=4, n_heads=4, cross_attn_all_layers=True),
            entropy_model=EntropyModelConfig(dim=256, n_layers=2, n_heads=4),
            # A small hash vocabulary: with the reference's 50 002 rows the six tables were 77 M of the
            # shape's 98 M parameters, and drawing them took 10 of 14 s of a CPU run's set-up.
            hash=HashConfig(vocab=4099),
        )
    entropy = dataclasses.replace(base.entropy_model, dtype=dtype)
    return base.replace(dtype=dtype, entropy_model=entropy)


def random_params(config: ModelConfig, seed: int, dtype: str) -> dict:
    """N(0, 1/fan_in) kernels and tables, unit norm scales, created on the device."""
    shapes = abstract_params(config)
    leaves, treedef = jax.tree.flatten_with_path(shapes)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = []
    for (path, leaf), key in zip(leaves, keys, strict=True):
        name = jax.tree_util.keystr(path)
        if name.endswith("['scale']"):
            out.append(jnp.ones(leaf.shape, dtype))
            continue
        fan_in = leaf.shape[-1] if name.endswith("['embedding']") else leaf.shape[0]
        out.append((jax.random.normal(key, leaf.shape, jnp.float32) / np.sqrt(fan_in)).astype(dtype))
    return jax.tree.unflatten(treedef, out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", choices=["1b", "tiny"], default="1b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-bytes", type=int, default=64)
    parser.add_argument("--max-bytes", type=int, default=256)
    parser.add_argument("--drafts", type=int, nargs="*", default=[8])
    parser.add_argument("--bytes-per-patch", type=float, default=4.5)
    args = parser.parse_args(argv)

    config = _config(args.size, args.dtype)
    params = random_params(config, 0, args.dtype)
    rng = np.random.default_rng(0)
    prompts = [bytes(rng.integers(32, 127, args.prompt_bytes).tolist()) for _ in range(max(args.batch))]
    ids = jnp.asarray(encode_prompts(prompts[:1])[0])[None]
    ent = jax.jit(lambda p, x: BLT(config).apply({"params": p}, x, method=BLT.entropies))(params, ids)
    threshold = float(np.quantile(np.asarray(ent)[0, 1:], 1 - 1 / args.bytes_per_patch))
    config = config.replace(patcher=dataclasses.replace(config.patcher, threshold=threshold))
    print(
        json.dumps({"device": str(jax.devices()[0]), "size": args.size, "threshold": threshold}), flush=True
    )

    def report(name: str, batch: int, warmup, result) -> None:
        summary = result.counters.summary()
        row = {"method": name, "batch": batch, "bytes_per_s": round(result.bytes_per_second, 1)}
        row |= {"seconds": round(result.seconds, 3), "compile_s": round(warmup.compile_seconds, 1)}
        row |= {k: round(v, 3) for k, v in summary.items()}
        print(json.dumps(row), flush=True)

    for batch in args.batch:
        kw = dict(max_bytes=args.max_bytes, stop_at_eos=False)
        runs = [("ar", dict(method="ar"))]
        runs += [(f"blt_s{d}", dict(method="blt_s", draft=d)) for d in args.drafts]
        for name, method in runs:
            warmup = generate(params, config, prompts[:batch], **method, **kw)  # compiles
            report(name, batch, warmup, generate(params, config, prompts[:batch], **method, **kw))


if __name__ == "__main__":
    main()
