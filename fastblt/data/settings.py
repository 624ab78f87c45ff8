"""The ``data`` config section: every key the data pipeline reads, its default and its checks.

An experiment's ``config.data`` (an ml-collections ``ConfigDict`` or a plain mapping) is turned into a
frozen :class:`DataConfig` by :func:`parse_data_config`, which rejects unknown keys (a typo such as
``data.batchsize`` would otherwise be ignored silently) and bad values, naming the key and the fix.

Keys (``data.<key>``; defaults in brackets):

- ``source`` ["stdlib"]: where documents come from.
    - ``"stdlib"``: the running interpreter's standard-library ``.py`` files (no ``paths`` needed).
    - ``"text"``: plain-text files, one document per file.
    - ``"jsonl"``: JSON Lines files, one document per non-blank line, taken from ``jsonl_field``.
    - ``"array_record"``: ArrayRecord files, one document per record (raw bytes, usually UTF-8).
    - ``"tensorstore"``: a corpus directory written by ``fastblt preprocess`` (:mod:`.preprocess`).
- ``paths`` [none]: a glob or a list of globs (``~`` expanded, ``**`` recursive) of the corpus files;
  for ``"tensorstore"`` the one corpus directory. Unused (and refused) for ``"stdlib"``.
- ``eval_paths`` [none]: globs of a separate held-out corpus of the same kind. When set, every document
  of ``paths`` trains and every document of ``eval_paths`` evaluates, and ``eval_fraction`` is unused.
- ``eval_fraction`` [0.02]: without ``eval_paths``, the share of documents held out for evaluation.
  A document is held out when a hash of its stable key (its path relative to the corpus root, plus the
  line or record number for JSONL/ArrayRecord) falls below this fraction, so the split is independent
  of listing order and machine; at least one document is held out when the fraction is > 0. A
  tensorstore corpus keeps the split it was written with (its ``heldout`` array).
- ``jsonl_field`` ["text"]: the JSON key that holds a JSONL document's text.
- ``seq_len`` [required]: ids per training row (``inputs`` and ``targets`` are ``[batch, seq_len]``).
- ``batch_size`` [required]: GLOBAL rows per step; each of ``process_count`` hosts gets
  ``batch_size // process_count`` rows, so it must divide evenly.
- ``shuffle`` [True]: shuffle documents (a fresh permutation each epoch) before packing.
- ``seed`` [0]: shuffle seed, an integer in ``[0, 2**32)``; the same seed gives the same batches.
- ``num_epochs`` [None]: passes over the training documents; None repeats forever. A finite stream ends
  with one last row padded with id 0 (mask 0) and a last batch padded with empty rows.
- ``worker_count`` [0]: processes that read and encode documents (grain ``mp_prefetch``); 0 reads in
  the main process. Batches and checkpoints do not depend on it: documents are packed in the main
  process, in the same order. A program using workers needs an ``if __name__ == "__main__"`` guard.
- ``eval_batches`` [8]: how many global batches :func:`make_eval_batches` returns at most (fewer if
  the held-out split is smaller); None takes the whole held-out split.
- ``entropies`` [False]: add ``entropies: float32[batch, seq_len]`` to each batch, read from a
  tensorstore corpus preprocessed with an entropy function (aligned with ``inputs``).
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping
from typing import Any

from fastblt.config import ConfigError

SOURCES = ("stdlib", "text", "jsonl", "array_record", "tensorstore")

DEFAULTS: dict[str, Any] = {
    "source": "stdlib",
    "paths": None,
    "eval_paths": None,
    "eval_fraction": 0.02,
    "jsonl_field": "text",
    "shuffle": True,
    "seed": 0,
    "num_epochs": None,
    "worker_count": 0,
    "eval_batches": 8,
    "entropies": False,
}
REQUIRED = ("seq_len", "batch_size")
KNOWN_KEYS = frozenset(DEFAULTS) | frozenset(REQUIRED)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The validated ``data`` section; see the module docstring for each field."""

    source: str
    paths: tuple[str, ...]
    eval_paths: tuple[str, ...]
    eval_fraction: float
    jsonl_field: str
    seq_len: int
    batch_size: int
    shuffle: bool
    seed: int
    num_epochs: int | None
    worker_count: int
    eval_batches: int | None
    entropies: bool

    def local_batch_size(self, process_count: int) -> int:
        """Rows per host: ``batch_size // process_count``; raises ConfigError if it does not divide."""
        if self.batch_size % process_count:
            raise ConfigError(
                f"data.batch_size={self.batch_size} is not divisible by process_count={process_count}; "
                f"set data.batch_size to a multiple of {process_count}"
            )
        return self.batch_size // process_count


def _as_dict(data_cfg: Any) -> dict[str, Any]:
    if isinstance(data_cfg, DataConfig):
        return dataclasses.asdict(data_cfg)
    if hasattr(data_cfg, "to_dict"):  # ml_collections.ConfigDict / FrozenConfigDict
        return dict(data_cfg.to_dict())
    if isinstance(data_cfg, Mapping):
        return dict(data_cfg)
    raise ConfigError(
        f"the data section must be a ConfigDict or a mapping, got {type(data_cfg).__name__}; pass config.data"
    )


def _int(d: dict[str, Any], key: str, minimum: int, allow_none: bool = False) -> int | None:
    value = d[key]
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        what = f"an integer >= {minimum}" + (" or None" if allow_none else "")
        raise ConfigError(f"data.{key} must be {what}, got {value!r}")
    return int(value)


def _globs(d: dict[str, Any], key: str) -> tuple[str, ...]:
    value = d[key]
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    raise ConfigError(f"data.{key} must be a glob string or a list of glob strings, got {value!r}")


def parse_data_config(data_cfg: Any) -> DataConfig:
    """Validates ``config.data`` and fills defaults. Raises ConfigError naming the bad key."""
    given = _as_dict(data_cfg)
    unknown = sorted(set(given) - KNOWN_KEYS)
    if unknown:
        raise ConfigError(
            f"unknown key(s) in the data section: {', '.join('data.' + k for k in unknown)}; "
            f"known keys are {', '.join(sorted(KNOWN_KEYS))}"
        )
    for key in REQUIRED:
        if given.get(key) is None:
            raise ConfigError(f"data.{key} is missing; set it in the experiment config")
    d = {**DEFAULTS, **given}

    source = d["source"]
    if source not in SOURCES:
        raise ConfigError(f"data.source={source!r} is not one of {', '.join(map(repr, SOURCES))}")
    paths, eval_paths = _globs(d, "paths"), _globs(d, "eval_paths")
    if source == "stdlib" and (paths or eval_paths):
        raise ConfigError(
            "data.paths / data.eval_paths are not used by data.source='stdlib'; remove them or pick "
            "another data.source"
        )
    if source != "stdlib" and not paths:
        raise ConfigError(f"data.paths is required for data.source={source!r}; set a glob of the files")

    fraction = d["eval_fraction"]
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0 <= fraction < 1:
        raise ConfigError(f"data.eval_fraction must be a number in [0, 1), got {fraction!r}")
    if not isinstance(d["jsonl_field"], str) or not d["jsonl_field"]:
        raise ConfigError(f"data.jsonl_field must be a non-empty string, got {d['jsonl_field']!r}")
    for key in ("shuffle", "entropies"):
        if not isinstance(d[key], bool):
            raise ConfigError(f"data.{key} must be True or False, got {d[key]!r}")
    seed = _int(d, "seed", 0)
    if seed >= 2**32:
        raise ConfigError(f"data.seed must be below 2**32, got {seed}")
    if d["entropies"] and source != "tensorstore":
        raise ConfigError(
            "data.entropies=True needs data.source='tensorstore' (a corpus preprocessed with an entropy "
            "model); set data.entropies=False or preprocess the corpus first"
        )
    return DataConfig(
        source=source,
        paths=paths,
        eval_paths=eval_paths,
        eval_fraction=float(fraction),
        jsonl_field=d["jsonl_field"],
        seq_len=_int(d, "seq_len", 1),
        batch_size=_int(d, "batch_size", 1),
        shuffle=d["shuffle"],
        seed=seed,
        num_epochs=_int(d, "num_epochs", 1, allow_none=True),
        worker_count=_int(d, "worker_count", 0),
        eval_batches=_int(d, "eval_batches", 1, allow_none=True),
        entropies=d["entropies"],
    )
