"""The sampler's test oracle: generation by re-running the whole model on the whole prefix for every byte.

This is the reference's ``generate_nocache``: for each new byte, ``BLT.apply`` runs its own entropy
model and patcher (``patch_lengths=None``, include_next_token) over the full prefix and the next
byte is chosen from ``logits[:, -1]``. No cache of any kind. Rows are generated one at a time, so
there is no batching or padding question. Slow (O(L^2) work) by design.

``pad_to``: with an int, each prefix is right-padded with BOE (0) to that length and the logits of
the last real byte are read. Every BLT component is causal (entropy model, patch boundaries, patch
pooling of complete patches, global and decoder masks), so this is the same computation with one
compiled shape instead of one per prefix length; tests check it against ``pad_to=None``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fastblt.config import ModelConfig
from fastblt.model import BLT
from fastblt.sampler.sampling import sample_logits, step_keys
from fastblt.tokenizer import BOE, EOS


@functools.lru_cache(maxsize=32)
def _forward(config: ModelConfig):
    return jax.jit(lambda params, tokens: BLT(config).apply({"params": params}, tokens))


def naive_generate(
    params: dict,
    config: ModelConfig,
    prompts: list[np.ndarray],
    max_new: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_at_eos: bool = True,
    pad_to: int | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Generates up to ``max_new`` ids after each prompt.

    Args:
      prompts: per row, int[len] token ids (BOS first).
      temperature, top_p, seed: as :func:`fastblt.sampler.sampling.sample_logits`, with the per-row
        per-step keys of :func:`~fastblt.sampler.sampling.step_keys` (row = index in ``prompts``).
      stop_at_eos: stop a row after it generates EOS.
      pad_to: see the module docstring; None runs each prefix at its exact length.

    Returns:
      (ids, logits): per row, the generated ids int32[g] and the logits they were chosen from
      float32[g, V].
    """
    forward = _forward(config)
    greedy = temperature == 0.0
    out_ids, out_logits = [], []
    for row, prompt in enumerate(prompts):
        seq = [int(x) for x in np.asarray(prompt)]
        ids, logits_seen = [], []
        for step in range(max_new):
            tokens = np.asarray(seq, np.int32)
            if pad_to is not None:
                if len(seq) > pad_to:
                    raise ValueError(f"prefix of {len(seq)} ids exceeds pad_to={pad_to}; raise pad_to")
                tokens = np.pad(tokens, (0, pad_to - len(seq)), constant_values=BOE)
            logits = forward(params, jnp.asarray(tokens)[None])[:, len(seq) - 1]
            keys = None if greedy else step_keys(jnp.int32(seed), jnp.array([row]), jnp.array([step]))
            x = int(sample_logits(logits, keys, temperature, top_p, greedy)[0])
            ids.append(x)
            logits_seen.append(np.asarray(logits[0]))
            seq.append(x)
            if stop_at_eos and x == EOS:
                break
        out_ids.append(np.asarray(ids, np.int32))
        out_logits.append(
            np.stack(logits_seen) if logits_seen else np.zeros((0, config.vocab_size), np.float32)
        )
    return out_ids, out_logits
