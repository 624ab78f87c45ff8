"""fastblt: train and serve Byte Latent Transformers (BLT) in JAX/Flax.

``import fastblt`` stays light (no JAX import) so that the CLI starts quickly and ``--help`` never waits
for a backend. Submodules load on first attribute access: ``fastblt.model`` imports JAX and Flax then.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Submodules reachable as attributes of the package; each is imported only when first touched.
_LAZY_SUBMODULES = frozenset({"config", "io", "model", "sampler", "tokenizer", "train"})

__all__ = ["__version__", *sorted(_LAZY_SUBMODULES)]


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBMODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module  # later lookups skip __getattr__
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY_SUBMODULES)
