"""Generation with a cached BLT: autoregressive (``ar``), self-speculative (``blt_s``), and for
BLT-D checkpoints block diffusion (``blt_d``) and diffusion drafts with verification (``blt_dv``).

    from fastblt.sampler import generate
    result = generate(params, config, ["Hello"], method="ar", max_bytes=64)
    result.texts[0], result.counters.summary(), result.bytes_per_second

Modules: ``state`` (buffers and caches), ``cached`` (incremental stages: append bytes, draft a byte),
``decoding`` (the loop every method shares: prefill, then one round per ``lax.while_loop`` step),
``ar``, ``speculative`` and ``unmasking`` (each method's round; BLT-D's blocks), ``methods`` and
``rules`` (the registries of methods and of BLT-D's unmasking rules that ``generate`` and the
commands read), ``sampling`` (greedy / temperature / top-p), ``cost`` (NFE counters and the paper's bandwidth estimate), ``command`` (``fastblt sample``). The
no-cache oracle the tests check generation against is tests/naive_sampler.py.

Names below load on first access, so ``import fastblt.sampler.command`` (which ``fastblt --help``
does) does not import JAX.
"""

from __future__ import annotations

from fastblt.lazy_exports import lazy_exports

_EXPORTS = {
    "METHODS": "api",
    "GenerationResult": "api",
    "Program": "api",
    "encode_prompts": "api",
    "generate": "api",
    "prepare": "api",
    "run_program": "api",
    "GenerationCounters": "cost",
    "ParamCounts": "cost",
    "bandwidth_bytes": "cost",
    "param_counts": "cost",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
