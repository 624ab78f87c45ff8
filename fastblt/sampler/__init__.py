"""Generation with a cached BLT: autoregressive (``ar``), self-speculative (``blt_s``), and for
BLT-D checkpoints block diffusion (``blt_d``) and diffusion drafts with verification (``blt_dv``).

    from fastblt.sampler import generate
    result = generate(params, config, ["Hello"], method="ar", max_bytes=64)
    result.texts[0], result.counters.summary(), result.bytes_per_second

Modules: ``state`` (buffers and caches), ``cached`` (incremental stages: append bytes, draft a byte),
``ar``, ``speculative`` and ``diffusion`` (the jitted while-loops), ``sampling`` (greedy / temperature / top-p),
``cost`` (NFE counters and the paper's bandwidth estimate), ``naive`` (the no-cache test oracle).
"""

from fastblt.sampler.api import (
    METHODS,
    GenerationResult,
    Program,
    encode_prompts,
    generate,
    prepare,
    run_program,
)
from fastblt.sampler.cost import GenerationCounters, ParamCounts, bandwidth_bytes, param_counts
from fastblt.sampler.naive import naive_generate

__all__ = [
    "METHODS",
    "GenerationCounters",
    "GenerationResult",
    "ParamCounts",
    "Program",
    "bandwidth_bytes",
    "encode_prompts",
    "generate",
    "naive_generate",
    "param_counts",
    "prepare",
    "run_program",
]
