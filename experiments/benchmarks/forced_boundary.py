"""Does a BLT-D block drafted after a *forced* patch boundary lose quality?

Training anchors every block at a natural entropy-patch start: its rows read the latent of a patch
the patcher closed. Generation starts a block wherever the previous one ended (the prompt's end, then
every B bytes), closing the last patch there whatever the patcher would have done
(shared/reference/fast-blt-methods.md §1.6; the community re-implementation measured such latents to be
weak). This script measures the gap on held-out text: for each prompt it finds a natural patch start
``s`` and drafts the first block twice, with the prompt cut just before ``s`` (the last patch ends
where the patcher ends it) and one byte later (the patch that ``s`` opens is cut after one byte).
Both drafts are scored against the true continuation and against greedy ``ar`` from the same cut.

    PYTHONPATH=. python experiments/benchmarks/forced_boundary.py --checkpoint WORKDIR [--block-size 4] \\
        [--prompts 64] [--prompt-bytes 256] [--out FILE]
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def natural_cuts(config, params, texts: list[bytes], block: int, min_prompt: int) -> list[int]:
    """Per text, a byte offset ``c`` where the patcher opens a patch at byte ``c`` that is at least two
    bytes long, with ``c >= min_prompt`` and room for a block after ``c + 1``; -1 where none."""
    import jax.numpy as jnp

    from fastblt.model import BLT
    from fastblt.tokenizer import encode

    ids = np.stack([encode(t, add_bos=True, add_eos=False) for t in texts])
    lengths = np.asarray(BLT(config).apply({"params": params}, jnp.asarray(ids), method=BLT.patch).lengths)
    cuts = []
    for text, row in zip(texts, lengths, strict=True):
        starts = np.cumsum(row)[:-1]  # id position where each patch after the first starts
        ok = [
            int(s) - 1  # id position s holds text byte s - 1 (BOS first)
            for s, n in zip(starts, row[1:], strict=True)
            if n >= 2 and int(s) - 1 >= min_prompt and int(s) + block < len(text)
        ]
        cuts.append(ok[-1] if ok else -1)
    return cuts


def score(outputs: list[bytes], references: list[bytes]) -> float:
    """Share of bytes equal at the same position (over the references' bytes)."""
    same = sum(
        sum(a == b for a, b in zip(o, r, strict=False)) for o, r in zip(outputs, references, strict=True)
    )
    return same / max(1, sum(len(r) for r in references))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a BLT-D training workdir or export")
    parser.add_argument("--block-size", type=int, help="B (default: the trained one)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--prompt-bytes", type=int, default=256, help="held-out chunk length")
    parser.add_argument("--out", help="JSON-lines file, appended to")
    args = parser.parse_args(argv)

    from experiments.benchmarks.sampler_trained import heldout_prompts
    from fastblt.io.loading import load_model, trained_block_size
    from fastblt.sampler import generate

    config, params = load_model(args.checkpoint)
    block = args.block_size or trained_block_size(args.checkpoint) or 4
    texts = heldout_prompts(args.prompts, args.prompt_bytes)
    cuts = natural_cuts(config, params, texts, block, args.prompt_bytes // 2)
    kept = [(t, c) for t, c in zip(texts, cuts, strict=True) if c >= 0]
    result: dict = {"checkpoint": args.checkpoint, "block_size": block, "prompts": len(kept)}
    for name, shift in (("natural", 0), ("forced", 1)):
        prompts = [t[: c + shift] for t, c in kept]
        truth = [t[c + shift : c + shift + block] for t, c in kept]
        kw = dict(max_bytes=block, stop_at_eos=False)
        ar = generate(params, config, prompts, method="ar", **kw).texts
        for rule, extra in (("one_step", dict(one_step=True)), ("alpha0.7", dict(alpha=0.7))):
            d = generate(params, config, prompts, method="blt_d", block_size=block, **extra, **kw).texts
            result[f"{name}/{rule}/vs_truth"] = score(d, truth)
            result[f"{name}/{rule}/vs_ar"] = score(d, ar)
        result[f"{name}/ar/vs_truth"] = score(ar, truth)
    print(json.dumps(result))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
