"""Packages whose public names load on first use, so importing the package stays light (the
``fastblt`` command's ``--help`` imports no JAX). PEP 562's module ``__getattr__``/``__dir__``."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``: name -> submodule (relative) it comes from.

    Use in a package's ``__init__``: ``__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)``.
    A loaded name is stored in the package, so later lookups skip ``__getattr__``.
    """

    def __getattr__(name: str) -> Any:
        if name in exports:
            module = importlib.import_module(package)
            value = getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
            setattr(module, name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(vars(importlib.import_module(package))) | set(exports))

    return __getattr__, __dir__
