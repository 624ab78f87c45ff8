"""The ``data`` section: every key the data pipeline reads, its default and its rules.

Keys (``data.<key>``; defaults in brackets):

- ``source`` ["stdlib"]: where documents come from.
    - ``"stdlib"``: the running interpreter's standard-library ``.py`` files (no ``paths`` needed).
    - ``"text"``: plain-text files, one document per file.
    - ``"jsonl"``: JSON Lines files, one document per non-blank line, taken from ``jsonl_field``.
    - ``"array_record"``: ArrayRecord files, one document per record (raw bytes, usually UTF-8).
    - ``"tensorstore"``: a corpus directory written by ``fastblt preprocess`` (fastblt/data/preprocess.py).
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
- ``seq_len`` [4096]: ids per training row (``inputs`` and ``targets`` are ``[batch, seq_len]``; BOS
  included); the reference counts patches instead.
- ``batch_size`` [8]: GLOBAL rows per step; each of ``process_count`` hosts gets
  ``batch_size // process_count`` rows, so it must divide evenly.
- ``shuffle`` [True]: shuffle documents (a fresh permutation each epoch) before packing.
- ``seed`` [0]: shuffle seed, an integer in ``[0, 2**32)``; the same seed gives the same batches.
- ``num_epochs`` [None]: passes over the training documents; None repeats forever. A finite stream ends
  with one last row padded with id 0 (mask 0) and a last batch padded with empty rows.
- ``worker_count`` [0]: processes that read and encode documents (grain ``mp_prefetch``); 0 reads in
  the main process. Batches and checkpoints do not depend on it: documents are packed in the main
  process, in the same order. A program using workers needs an ``if __name__ == "__main__"`` guard.
- ``eval_batches`` [8]: how many global batches ``make_eval_batches`` returns at most (fewer if the
  held-out split is smaller); None takes the whole held-out split.
- ``entropies`` [False]: add ``entropies: float32[batch, seq_len]`` to each batch, read from a
  tensorstore corpus preprocessed with an entropy function (aligned with ``inputs``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fastblt.config.schema import ConfigError, build, join, require, setting

SOURCES = ("stdlib", "text", "jsonl", "array_record", "tensorstore")


def _globs(value: Any, key: str) -> tuple[str, ...]:
    """``data.paths`` as given (a glob, a list of globs, or none) -> a tuple of globs."""
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list | tuple) and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    raise ConfigError(f"{key} must be a glob string or a list of glob strings, got {value!r}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The ``data`` section; see the module docstring for each key."""

    source: str = setting("stdlib", choices=SOURCES)
    paths: tuple[str, ...] = setting((), convert=_globs)
    eval_paths: tuple[str, ...] = setting((), convert=_globs)
    eval_fraction: float = setting(0.02, ge=0, lt=1)
    jsonl_field: str = "text"
    seq_len: int = setting(4096, ge=1)
    batch_size: int = setting(8, ge=1)
    shuffle: bool = True
    seed: int = setting(0, ge=0, lt=2**32)
    num_epochs: int | None = setting(None, ge=1)
    worker_count: int = setting(0, ge=0)
    eval_batches: int | None = setting(8, ge=1)
    entropies: bool = False

    def local_batch_size(self, process_count: int) -> int:
        """Rows per host: ``batch_size // process_count``; raises ConfigError if it does not divide."""
        if self.batch_size % process_count:
            raise ConfigError(
                f"data.batch_size={self.batch_size} is not divisible by process_count={process_count}; "
                f"set data.batch_size to a multiple of {process_count}"
            )
        return self.batch_size // process_count

    def check(self, key: str) -> None:
        require(bool(self.jsonl_field), join(key, "jsonl_field"), "must be a non-empty string")
        if self.source == "stdlib" and (self.paths or self.eval_paths):
            raise ConfigError(
                f"{join(key, 'paths')} / {join(key, 'eval_paths')} are not used by {key}.source='stdlib'; "
                f"remove them or pick another {key}.source"
            )
        if self.source != "stdlib" and not self.paths:
            raise ConfigError(
                f"{join(key, 'paths')} is required for {key}.source={self.source!r}; set a glob of the files"
            )
        if self.entropies and self.source != "tensorstore":
            raise ConfigError(
                f"{key}.entropies=True needs {key}.source='tensorstore' (a corpus preprocessed with an "
                f"entropy model); set {key}.entropies=False or preprocess the corpus first"
            )


def parse_data_config(data_cfg: Any) -> DataConfig:
    """The validated DataConfig of one ``data`` section (a DataConfig, ConfigDict or mapping).

    Keys left out take DataConfig's defaults: this builds the section by hand (tests, scripts); a whole
    experiment is read strictly by :func:`fastblt.config.experiment_config`. Raises ConfigError
    naming the key (``data.seq_len``) and the fix.
    """
    if isinstance(data_cfg, DataConfig):
        return data_cfg
    return build(DataConfig, data_cfg, "data.", fill=True)
