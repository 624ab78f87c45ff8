"""BLT-D's unmasking rules: which masked cells of a block one decoder pass reveals (Fast BLT §3.1),
and the block anchors (:data:`ANCHORS`).

Each rule is one :class:`Rule` in :data:`RULES`, and everything that offers rules reads this registry:
``generate``/``prepare`` take a rule by name as a keyword (``alpha=0.7``, ``gamma=1.0``,
``one_step=True``), ``fastblt sample`` as a flag (``--alpha 0.7``, ``--one-step``), ``fastblt eval``
as a setting (``--setting alpha=0.7,0.9``), and the sampler's loop calls its ``pick`` through
:func:`fastblt.sampler.unmasking.reveal`. Adding a rule is one entry here (and its test).

A rule's value is traced (changing it does not recompile); which rule runs is static. This module
imports JAX only inside the rules' functions: ``fastblt --help`` reads the registry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class Rule:
    """One unmasking rule.

    name: the keyword, flag and setting that choose it.
    help: one line for ``--help`` (the value's meaning, for a rule that takes one).
    pick: ``pick(logits float32[b, B, V], masked bool[b, B], value float32[]) -> (pick bool[b, B],
      best int32[b] | None)``: the masked cells the pass reveals, and the cell revealed where a row
      picks none (None: the rule always picks every cell it needs).
    metavar: the value's name in ``--help``; None: the rule takes no value (a flag, chosen with True).
    default: the value when this rule runs by default (only the default rule has one).
    check: the value's domain as ``(test, "in (0, 1]")``, or None.
    """

    name: str
    help: str
    pick: Callable[[Any, Any, Any], tuple[Any, Any]]
    metavar: str | None = None
    default: float | None = None
    check: tuple[Callable[[float], bool], str] | None = None

    @property
    def takes_value(self) -> bool:
        return self.metavar is not None


def _confidence(logits, masked, alpha):
    """Every masked cell whose most likely byte has probability >= alpha."""
    import jax
    import jax.numpy as jnp

    conf = jnp.exp(jnp.max(jax.nn.log_softmax(logits, axis=-1), axis=-1))
    return masked & (conf >= alpha), jnp.argmax(jnp.where(masked, conf, -1.0), axis=-1)


def _entropy_bound(logits, masked, gamma):
    """Masked cells in order of increasing entropy (nats) while the cumulative entropy <= gamma."""
    import jax
    import jax.numpy as jnp

    logp = jax.nn.log_softmax(logits, axis=-1)
    ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    key = jnp.where(masked, ent, jnp.inf)
    order = jnp.argsort(key, axis=-1, stable=True)
    cum = jnp.cumsum(jnp.take_along_axis(key, order, axis=-1), axis=-1)
    rank = jnp.argsort(order, axis=-1)
    return masked & jnp.take_along_axis(cum <= gamma, rank, axis=-1), order[:, 0]


def _all(logits, masked, value):
    """The whole block in one pass."""
    del logits, value
    return masked, None


RULES: dict[str, Rule] = {
    r.name: r
    for r in (
        Rule(
            "alpha",
            "reveal the cells whose confidence is >= A (at least the most confident one)",
            _confidence,
            metavar="A",
            default=0.7,
            check=(lambda v: 0 < v <= 1, "in (0, 1]"),
        ),
        Rule(
            "gamma",
            "reveal cells by increasing entropy while their summed entropy is <= G nats (at least one)",
            _entropy_bound,
            metavar="G",
            check=(lambda v: v >= 0, ">= 0"),
        ),
        Rule("one_step", "reveal the whole block in one decoder pass", _all),
    )
}
DEFAULT = "alpha"

# Where BLT-D's blocks start (fastblt.sampler.unmasking): "forced", the paper's Algorithm 1, or
# "patch", at the open patch's first byte as training places blocks. Read by the same places.
ANCHORS = ("forced", "patch")


def choose(given: Mapping[str, Any]) -> tuple[str, float]:
    """The rule a request names and its value, from keywords such as ``{"gamma": 1.0}``.

    Values of None and flags set to False name nothing; none named: the default rule at its default.
    Raises TypeError for a keyword that is not a rule, ValueError for two rules or a value outside
    the rule's domain.
    """
    unknown = sorted(set(given) - set(RULES))
    if unknown:
        raise TypeError(
            f"unexpected keyword argument(s) {', '.join(unknown)} (unmasking rules: {', '.join(RULES)})"
        )
    named = {k: v for k, v in given.items() if v is not None and v is not False}
    if len(named) > 1:
        raise ValueError(
            f"give at most one of {', '.join(RULES)} (the unmasking rule), got {', '.join(named)}"
        )
    if not named:
        return DEFAULT, float(RULES[DEFAULT].default)
    name, value = next(iter(named.items()))
    rule = RULES[name]
    if not rule.takes_value:
        if value is not True:
            raise ValueError(f"{name}={value!r}: the rule takes no value; pass {name}=True")
        return name, 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r} must be a number")
    if rule.check is not None and not rule.check[0](float(value)):
        raise ValueError(f"{name}={value} must be {rule.check[1]}")
    return name, float(value)
