"""The generation methods, one registry entry each: what a method checks, how its loop is built, and
how its counters are read. ``generate``/``prepare`` (and through them ``fastblt sample`` and
``fastblt eval``) read :data:`REGISTRY`; adding a method is one :func:`register` call next to its loop.

Every method is one round of the shared loop (fastblt.sampler.decoding.decode), which gives its
function one signature, ``run(params, prompts, rule_params, seed, temperature, top_p) -> dict``:
``rule_params`` (:class:`RuleParams`) holds the traced value of BLT-D's unmasking rule, which
the other methods ignore, so a caller never reorders arguments per method.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
from flax import struct

from fastblt.config import ModelConfig

# The exact mode's default step width (fastblt.sampler.api.prepare): blt_s with draft <= 15, blt_dv
# with block_size <= 16.
EXACT_WIDTH = 16


@struct.dataclass
class RuleParams:
    """The traced value of the unmasking rule (fastblt.sampler.rules; ``alpha``'s threshold,
    ``gamma``'s bound): changing it does not recompile. value: float32[]."""

    value: jax.Array


@dataclasses.dataclass(frozen=True)
class Request:
    """A generation request's method settings, as the caller gave them (see
    fastblt.sampler.api.prepare for their meaning)."""

    draft: int = 8
    block_size: int = 4
    rule: str = "alpha"  # BLT-D's unmasking rule, a name of fastblt.sampler.rules.RULES
    anchor: str = "forced"  # where diffusion blocks start, one of fastblt.sampler.rules.ANCHORS
    greedy: bool = True
    record_logits: bool = False
    exact: bool = False
    exact_width: int = EXACT_WIDTH


@dataclasses.dataclass(frozen=True)
class Method:
    """One generation method.

    build: ``build(config, *, n_bytes, n_patches, prefill_chunk, greedy, exact_width, **static)``
      -> the loop function (to be jitted), with the signature of the module docstring.
    static: the method's own static build arguments for a request (after ``check``).
    check: raises ValueError naming the argument at fault; None: nothing to check.
    patches_per_round: patches one round may complete (a row stops without room for them).
    step_bytes: bytes the widest append of a round takes (the exact mode's width must hold them).
    lossless: greedy output equals greedy ``ar`` (byte for byte in float32, or in exact mode; only
      these methods take ``exact``).
    paper_eg_per_round: the paper's encoder+global passes per round where it counts them per round
      (BLT-S, BLT-DV: 2); None: the passes as run.
    """

    name: str
    build: Callable[..., Callable]
    static: Callable[[Request], dict] = lambda request: {}
    check: Callable[[Request, ModelConfig], None] | None = None
    patches_per_round: Callable[[Request], int] = lambda request: 0
    step_bytes: Callable[[Request], int] = lambda request: 1
    lossless: bool = False
    paper_eg_per_round: int | None = None


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in REGISTRY:
        raise ValueError(f"a generation method named {method.name!r} is already registered")
    REGISTRY[method.name] = method
    return method


def get(name: str) -> Method:
    """The registered method ``name``; a clear error naming the choices otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"method={name!r} is not one of {tuple(REGISTRY)}")
    return REGISTRY[name]


def check_exact(method: Method, r: Request) -> None:
    """The exact mode's request checks, for every method: a lossless method, a width that holds its
    widest append."""
    if not r.exact:
        return
    if not method.lossless:
        lossless = tuple(name for name, m in REGISTRY.items() if m.lossless)
        raise ValueError(
            f"exact=True is for the lossless methods {lossless}; {method.name}'s output is not ar's "
            "in any mode"
        )
    need = method.step_bytes(r)
    if not isinstance(r.exact_width, int) or r.exact_width < need:
        raise ValueError(
            f"exact_width={r.exact_width!r} must be an int >= {need} for method={method.name!r} "
            "(blt_s: draft + 1; blt_dv: block_size); use the same exact_width for every method you compare"
        )


def _check_blt_s(r: Request, config: ModelConfig) -> None:
    del config
    if not isinstance(r.draft, int) or r.draft < 1:
        raise ValueError(f"draft={r.draft!r} must be a positive int (bytes drafted per BLT-S round)")
    if r.record_logits:
        raise ValueError("record_logits is only available with method='ar'")


def _check_unmasking(verify: bool) -> Callable[[Request, ModelConfig], None]:
    def check(r: Request, config: ModelConfig) -> None:
        from fastblt.sampler.rules import ANCHORS
        from fastblt.sampler.unmasking import check_mask_embedding

        check_mask_embedding(config)
        if verify and not r.greedy:
            # Speculative sampling needs each draft drawn given the drafts before it only; a block's
            # unmasking reveals cells in any order, so a cell's draw may depend on cells after it.
            raise ValueError(
                "method='blt_dv' verifies greedily: use temperature=0, or method='blt_d' (or 'blt_s', "
                "speculative sampling) to sample"
            )
        if r.record_logits:
            raise ValueError("record_logits is only available with method='ar'")
        if not isinstance(r.block_size, int) or r.block_size < (2 if verify else 1):
            raise ValueError(f"block_size={r.block_size!r} must be an int >= 1 (>= 2 for blt_dv)")
        if r.anchor not in ANCHORS:
            raise ValueError(f"anchor={r.anchor!r} is not one of {ANCHORS}")

    return check


def _build_ar(config, *, record_logits: bool, **common):
    from fastblt.sampler.ar import build_ar

    return build_ar(config, record=record_logits, **common)


def _build_blt_s(config, **kw):
    from fastblt.sampler.speculative import build_blt_s

    return build_blt_s(config, **kw)


def _build_unmasking(verify: bool):
    def build(config, **kw):
        from fastblt.sampler.unmasking import build_blt_d

        return build_blt_d(config, verify=verify, **kw)

    return build


register(
    Method(
        "ar",
        _build_ar,
        static=lambda r: {"record_logits": r.record_logits},
        lossless=True,
    )
)
register(
    Method(
        "blt_s",
        _build_blt_s,
        static=lambda r: {"draft": r.draft},
        check=_check_blt_s,
        patches_per_round=lambda r: r.draft + 1,
        step_bytes=lambda r: r.draft + 1,
        lossless=True,
        paper_eg_per_round=2,
    )
)
for _verify in (False, True):  # BLT-D; BLT-DV (its drafts verified: the AR byte rides along)
    register(
        Method(
            "blt_dv" if _verify else "blt_d",
            _build_unmasking(verify=_verify),
            static=lambda r: {"block_size": r.block_size, "rule": r.rule, "anchor": r.anchor},
            check=_check_unmasking(verify=_verify),
            patches_per_round=lambda r, v=_verify: r.block_size + int(v),
            step_bytes=lambda r: r.block_size,
            lossless=_verify,
            paper_eg_per_round=2 if _verify else None,
        )
    )
