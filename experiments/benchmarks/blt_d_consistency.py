"""Where does a trained BLT-D's one-step draft go wrong? One chain of checks on held-out rows.

BLT-D's training reports masked-cell accuracy averaged over noise levels t ~ U(0, 1); a one-step
draft is the t = 1 case (every cell of the block masked) run by the sampler. Each link of that chain
is measured on the same blocks (natural patch starts of held-out rows, the run's own eval split):

A. training layout, every cell masked (t = 1): accuracy per cell index, with the checkpoint's
   attention kernel and with the XLA reference kernel (they must agree: a fused kernel that let
   block rows see other keys would show here), and at the training's random t for reference;
B. the same blocks in the inference layout: the row cut at the block start, one block after it (no
   clean twin of any cell to see): must match A (a leak in the training layout would not);
C. the sampler: ``blt_d`` one-step with the prompt cut at the block start, ``B`` bytes: must match
   B's argmax (same model, same prefix, same patches; bf16 may flip near-ties).

If A, B and C agree, the drafts are what the model predicts at t = 1, and A's per-cell accuracy is
the model's one-step quality. One JSON object on stdout (and appended to ``--out``).

    PYTHONPATH=. python experiments/benchmarks/blt_d_consistency.py --checkpoint WORKDIR \\
        [--rows 8] [--blocks 16] [--out FILE]
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def _per_cell(right: np.ndarray, count: np.ndarray) -> list[float]:
    return [round(float(r) / max(1, int(c)), 4) for r, c in zip(right, count, strict=True)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a BLT-D training workdir")
    parser.add_argument("--rows", type=int, default=8, help="held-out rows (the run's eval split)")
    parser.add_argument("--blocks", type=int, default=16, help="blocks per row for B and C")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="JSON-lines file, appended to")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from fastblt.config import experiment_config, objective_config
    from fastblt.config.saved import upgrade_experiment
    from fastblt.data.pipeline import make_eval_batches
    from fastblt.io.loading import load_model, read_meta, training_dir
    from fastblt.model import BLT
    from fastblt.model.blt import blt_d_logits
    from fastblt.sampler import generate
    from fastblt.tokenizer import BOS, OFFSET
    from fastblt.train import blt_d as objective

    directory = training_dir(args.checkpoint)
    if directory is None:
        raise SystemExit(
            f"{args.checkpoint} is not a training workdir (the eval split comes from its config)"
        )
    experiment = experiment_config(upgrade_experiment(read_meta(directory)[1]["experiment"]))
    block = objective_config(experiment).block_size
    config, params = load_model(args.checkpoint)
    rows = [b for batch in make_eval_batches(experiment.data) for b in _rows(batch)][: args.rows]
    tokens, targets, mask = (
        jnp.asarray(np.stack([r[k] for r in rows])) for k in ("inputs", "targets", "mask")
    )
    n = tokens.shape[1]
    lengths = BLT(config).apply({"params": params}, tokens, method=BLT.patch).lengths
    layout = objective.block_layout(lengths, n, block)
    cells, valid = objective.block_cells(layout, tokens, targets, mask, config.document_masking)

    def block_logits(cfg, masked, toks=tokens, lens=lengths, lay=layout, cell=cells, ok=valid):
        blocks = objective.decoder_blocks(cfg, lay, toks, cell, ok, masked)
        return blt_d_logits(params, cfg, toks, lens, blocks)[1]

    result: dict = {"checkpoint": args.checkpoint, "block_size": block, "rows": len(rows), "row_bytes": n}
    all_masked = valid
    preds = {}
    for name, cfg in (("kernel", config), ("xla", config.replace(attention_impl="xla"))):
        logits = jax.jit(lambda m, cfg=cfg: block_logits(cfg, m))(all_masked)
        preds[name] = np.asarray(jnp.argmax(logits, -1))
        right = (preds[name] == np.asarray(cells)) & np.asarray(valid)
        result[f"A/t=1/{name}/accuracy_per_cell"] = _per_cell(
            right.sum((0, 1)), np.asarray(valid).sum((0, 1))
        )
    v = np.asarray(valid)
    result["A/t=1/kernel_vs_xla_agreement"] = float((preds["kernel"] == preds["xla"])[v].mean())
    _, noisy = objective.sample_noise(
        jax.random.key(args.seed), valid, objective_config(experiment).noise_eps
    )
    noisy_pred = np.asarray(jnp.argmax(jax.jit(lambda m: block_logits(config, m))(noisy), -1))
    m = np.asarray(noisy)
    result["A/random_t/masked_accuracy"] = float((noisy_pred == np.asarray(cells))[m].mean())

    # B and C: blocks at natural patch starts inside each row's first document, fully in the row.
    rng = np.random.default_rng(args.seed)
    toks_np, lens_np, starts_np = np.asarray(tokens), np.asarray(lengths), np.asarray(layout.starts)
    picks = []
    for r in range(len(rows)):
        if toks_np[r, 0] != BOS:  # a row that starts mid-document has no prompt form
            continue
        special = np.flatnonzero(toks_np[r, 1:] < OFFSET)  # the first document ends there
        end = int(special[0]) + 1 if len(special) else n
        ok = [q for q in range(starts_np.shape[1]) if 2 <= starts_np[r, q] and starts_np[r, q] + block <= end]
        ok = [q for q in ok if v[r, q].all()]
        picks += [(r, int(q)) for q in rng.permutation(ok)[: args.blocks]]
    infer = jax.jit(lambda toks, lens, lay, cell, ok: block_logits(config, ok, toks, lens, lay, cell, ok))
    b_pred, truth, prompts = [], [], []
    p = lens_np.shape[1]
    for r, q in picks:
        s = int(starts_np[r, q])
        prefix = np.where(np.arange(n) < s, toks_np[r], 0)[None]
        cut = np.zeros((1, p), np.int32)
        cut[0, : q + 1] = lens_np[r, : q + 1]
        cut[0, q + 1] = n + 1 - s  # one patch for the rest of the row
        lay = objective.BlockLayout(
            starts=jnp.full((1, 1), s, jnp.int32),
            positions=(s + jnp.arange(block, dtype=jnp.int32))[None, None],
            read_patch=jnp.full((1, 1), q, jnp.int32),
            in_row=jnp.ones((1, 1, block), bool),
        )
        cell, ok = jnp.asarray(cells[r, q])[None, None], jnp.ones((1, 1, block), bool)
        b_pred.append(
            np.asarray(jnp.argmax(infer(jnp.asarray(prefix), jnp.asarray(cut), lay, cell, ok), -1))[0, 0]
        )
        truth.append(np.asarray(cells[r, q]))
        prompts.append(bytes(int(t) - OFFSET for t in toks_np[r, 1:s]))  # ids 1..s-1 are bytes
    b_pred, truth = np.stack(b_pred), np.stack(truth)
    a_pred = np.stack([preds["kernel"][r, q] for r, q in picks])
    result["blocks"] = len(picks)
    result["B/accuracy_per_cell"] = _per_cell((b_pred == truth).sum(0), np.full(block, len(picks)))
    result["B/agreement_with_A"] = float((b_pred == a_pred).mean())
    draft = generate(
        params,
        config,
        prompts,
        method="blt_d",
        block_size=block,
        one_step=True,
        max_bytes=block,
        stop_at_eos=False,
    )
    c_pred = np.stack([np.asarray(ids[:block], np.int32) for ids in draft.ids])
    result["C/agreement_with_B"] = float((c_pred == b_pred).mean())
    result["C/accuracy_per_cell"] = _per_cell((c_pred == truth).sum(0), np.full(block, len(picks)))
    print(json.dumps(result))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")


def _rows(batch: dict) -> list[dict]:
    """The rows of an eval batch that hold a target, as dicts of arrays [N]."""
    keys = ("inputs", "targets", "mask")
    return [{k: batch[k][i] for k in keys} for i in range(len(batch["inputs"])) if batch["mask"][i].any()]


if __name__ == "__main__":
    main()
