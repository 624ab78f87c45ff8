"""The one validator of every config section: a frozen dataclass read from a mapping, key by key.

A section is a frozen dataclass. Its annotations are the types, its defaults the only defaults, and
:func:`setting` attaches per-key rules (bounds, choices, a converter). A section may define
``check(self, key)`` for rules between its keys (``n_heads`` divides ``dim``); it runs after the
section is built, with the section's dotted key (``model.encoder``) to put in the message.

:func:`build` walks a mapping (a dict, an ml-collections ``ConfigDict`` or a dataclass) into a
section and raises :class:`ConfigError` naming the dotted key and the fix for

* an unknown key (listing the valid keys at that level),
* a missing key (strict by default: experiment files start from the defaults, so a key left out is
  a mistake; ``fill=True`` takes the dataclass default, for code that builds one section by hand),
* a value of the wrong type, out of bounds or not one of the choices,
* a rule of the section's ``check``.

Values come out normalised: ints where a float is expected become floats, lists become tuples.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["ConfigError", "as_dict", "build", "join", "require", "setting"]


class ConfigError(ValueError):
    """A configuration value is unknown, missing or inconsistent; the message names the key."""


def setting(
    default: Any = dataclasses.MISSING,
    *,
    ge: float | None = None,
    gt: float | None = None,
    lt: float | None = None,
    choices: Iterable[Any] | None = None,
    convert: Callable[[Any, str], Any] | None = None,
    absent_is_none: bool = False,
) -> Any:
    """A dataclass field with rules that :func:`build` checks (None, where the type allows it, passes).

    ``ge``/``gt``/``lt``: bounds; ``choices``: the allowed values; ``convert(value, key)``: turns the
    given value into the field's type first (``data.paths``: a glob string becomes a 1-tuple).
    ``absent_is_none``: the key may be left out and then reads None (an experiment's ``model`` or
    ``entropy_model`` section: which one is there says what is trained); :func:`as_dict` leaves it out
    again when it is None.
    """
    metadata = {
        "ge": ge,
        "gt": gt,
        "lt": lt,
        "choices": None if choices is None else tuple(choices),
        "convert": convert,
        "absent_is_none": absent_is_none,
    }
    return dataclasses.field(default=default, metadata=metadata)


def join(section: str, name: str) -> str:
    """The dotted key of ``name`` in ``section`` (``""``: the top level)."""
    return f"{section}.{name}" if section else name


def require(cond: bool, key: str, message: str) -> None:
    """Raises ConfigError(``"{key}: {message}"``) unless ``cond``; for the sections' ``check``."""
    if not cond:
        raise ConfigError(f"{key}: {message}")


def as_dict(obj: Any) -> Any:
    """Plain nested dict (tuples as lists) of a config dataclass, JSON-serialisable.

    Fields marked ``absent_is_none`` are left out when None (an entropy-model experiment has no
    ``model`` key), so that ``build(type(obj), as_dict(obj))`` gives ``obj`` back.
    """
    if dataclasses.is_dataclass(obj):
        return {
            f.name: as_dict(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if not (f.metadata.get("absent_is_none") and getattr(obj, f.name) is None)
        }
    if isinstance(obj, tuple | list):
        return [as_dict(v) for v in obj]
    return obj


def plain(values: Any) -> Any:
    """A dict of a ConfigDict (``to_dict``) or a dataclass; other values as they are."""
    if dataclasses.is_dataclass(values) and not isinstance(values, type):
        return as_dict(values)
    if hasattr(values, "to_dict") and callable(values.to_dict):
        return values.to_dict()
    return values


def build(cls: type, values: Any, prefix: str = "", *, fill: bool = False) -> Any:
    """The validated ``cls`` of ``values`` (a mapping, a ConfigDict or a ``cls``).

    ``prefix`` is the dotted key of the section with a trailing dot (``"model.encoder."``), or
    ``""`` at the top level. ``fill``: keys left out take their defaults (else they are errors).
    """
    values = plain(values)
    section = prefix.rstrip(".")
    if not isinstance(values, Mapping):
        raise ConfigError(
            f"{section or 'the config'} must be a section (a mapping of keys: "
            f"{', '.join(_names(cls))}), got {values!r}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]}; valid keys under {section or 'the top level'}: "
            f"{', '.join(sorted(fields))}"
        )
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for name, field in fields.items():
        key = f"{prefix}{name}"
        if name not in values:
            if field.metadata.get("absent_is_none"):
                kwargs[name] = None
                continue
            if fill and field.default is not dataclasses.MISSING:
                continue
            raise ConfigError(_missing(key, field))
        if values[name] is None and field.metadata.get("absent_is_none"):
            raise ConfigError(
                f"{key} must be a section (a mapping of keys), got None; leave the key out for none"
            )
        kwargs[name] = _value(hints[name], field, values[name], key, fill)
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        check(section)
    return obj


# ---------------------------------------------------------------------------------------------------------
# One key.
# ---------------------------------------------------------------------------------------------------------


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _missing(key: str, field: dataclasses.Field) -> str:
    default = field.default
    if default is dataclasses.MISSING:
        return f"{key} is missing; set it in the experiment config"
    if dataclasses.is_dataclass(default):
        shown = "its section of defaults"
    else:
        shown = repr(as_dict(default))
    return (
        f"{key} is missing; set it (the default is {shown}). Experiment files start from the defaults "
        "(experiments/base.py, fastblt.config.config_dict), so every key is there unless removed"
    )


def _value(hint: Any, field: dataclasses.Field, value: Any, key: str, fill: bool) -> Any:
    convert = field.metadata.get("convert")
    if convert is not None:
        value = convert(value, key)
    value = _typed(hint, value, key, fill)
    if value is None:
        return None
    ge, gt, lt = field.metadata.get("ge"), field.metadata.get("gt"), field.metadata.get("lt")
    if ge is not None and not value >= ge:
        raise ConfigError(f"{key}: must be >= {ge}, got {value!r}")
    if gt is not None and not value > gt:
        raise ConfigError(f"{key}: must be > {gt}, got {value!r}")
    if lt is not None and not value < lt:
        raise ConfigError(f"{key}: must be < {lt}, got {value!r}")
    choices = field.metadata.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(repr, choices))}")
    return value


def _typed(hint: Any, value: Any, key: str, fill: bool) -> Any:
    """``value`` checked against the annotation ``hint`` and normalised (int -> float, list -> tuple)."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            if len(options) < len(typing.get_args(hint)):
                return None
            raise ConfigError(f"{key} is missing (None); set it to {_expected(options[0])}")
        (hint,) = options  # the sections use `X | None` only
    elif value is None:
        raise ConfigError(f"{key} is missing (None); set it to {_expected(hint)}")
    if dataclasses.is_dataclass(hint):
        return build(hint, value, f"{key}.", fill=fill)
    if typing.get_origin(hint) is tuple:
        (item, _) = typing.get_args(hint)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be {_expected(hint)}, got {value!r}")
        return tuple(_typed(item, v, f"{key}[{i}]", fill) for i, v in enumerate(value))
    if hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, hint)
    if not ok:
        raise ConfigError(f"{key} must be {_expected(hint)}, got {value!r}")
    return value


def _expected(hint: Any) -> str:
    if dataclasses.is_dataclass(hint):
        return f"a section of keys ({', '.join(_names(hint))})"
    if typing.get_origin(hint) is tuple:
        return f"a list of {_expected(typing.get_args(hint)[0]).removeprefix('a ').removeprefix('an ')}s"
    return {
        int: "an int",
        float: "a finite number",
        bool: "a bool (True or False)",
        str: "a string",
    }.get(hint, getattr(hint, "__name__", str(hint)))
