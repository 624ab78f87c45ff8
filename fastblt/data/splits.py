"""From a ``data`` config to the train/eval document sources, and plain iteration over documents.

The held-out rule, in order:

1. ``data.eval_paths`` set: ``paths`` is all training, ``eval_paths`` all evaluation.
2. the corpus carries its own split (a tensorstore corpus's ``heldout`` array): it is used.
3. otherwise each document whose key hashes below ``data.eval_fraction`` is held out
   (:func:`fastblt.data.sources.heldout_mask`); train and eval are disjoint by construction;
4. where that leaves a split empty (a corpus of one document), the tail of the last document is held
   out instead: its last ``eval_fraction`` of bytes (at least one) evaluate, the rest trains
   (:class:`TailSplit`, with a warning). ``data.eval_fraction=0`` means no held-out evaluation.

No grain or JAX import: the preprocessing tools and tests use this module directly.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from fastblt.config import ConfigError, DataConfig, parse_data_config
from fastblt.data.sources import (
    ArrayRecordSource,
    DocumentSource,
    JsonlSource,
    Subset,
    TextFileSource,
    expand_globs,
    heldout_mask,
)

SPLITS = ("train", "eval")


def open_corpus(cfg: DataConfig, key: str = "data.paths") -> DocumentSource:
    """The whole corpus named by ``data.paths`` (or ``data.eval_paths`` with that ``key``)."""
    if key not in ("data.paths", "data.eval_paths"):
        raise ValueError(f"key must be 'data.paths' or 'data.eval_paths', got {key!r}")
    patterns = cfg.paths if key == "data.paths" else cfg.eval_paths
    if cfg.source == "stdlib":
        from fastblt.data.stdlib import StdlibSource

        return StdlibSource()
    if cfg.source == "tensorstore":
        from fastblt.data.tensorstore_corpus import TensorstoreSource

        dirs = expand_globs(patterns, key, want_dirs=True)
        if len(dirs) != 1:
            raise ConfigError(
                f"{key} matched {len(dirs)} directories ({dirs[:3]}...); data.source='tensorstore' reads "
                "one corpus directory: name exactly one"
            )
        return TensorstoreSource(dirs[0], key=key)
    files = expand_globs(patterns, key)
    if cfg.source == "text":
        return TextFileSource(files, key=key)
    if cfg.source == "jsonl":
        return JsonlSource(files, field=cfg.jsonl_field, key=key)
    if cfg.source == "array_record":
        return ArrayRecordSource(files, key=key)
    raise ConfigError(f"data.source={cfg.source!r} is not supported")  # parse_data_config checks first


class TailSplit(DocumentSource):
    """One side of a byte-level split of a corpus's last document (rule 4 of the module docstring).

    "train": every document, the last one without its tail; "eval": that tail, one document.
    """

    def __init__(self, base: DocumentSource, fraction: float, split: str):
        last = base[len(base) - 1]
        if len(last) < 2:
            raise ConfigError(
                f"{base!r} has too few documents for a held-out split and its last document has "
                f"{len(last)} byte(s): set data.eval_paths, or data.eval_fraction=0 (no held-out evaluation)"
            )
        self.cut = len(last) - min(len(last) - 1, max(1, round(fraction * len(last))))
        self._base, self._split = base, split
        self._last = last[self.cut :] if split == "eval" else last[: self.cut]
        self._n = 1 if split == "eval" else len(base)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int) -> bytes:
        index = self._check_index(index)
        return self._last if index == self._n - 1 else self._base[index]

    def iter_keys(self) -> Iterator[str]:
        keys = list(self._base.iter_keys())
        tail = keys[-1] + f"#bytes[{self.cut}:]"
        return iter([tail] if self._split == "eval" else keys[:-1] + [keys[-1] + f"#bytes[:{self.cut}]"])

    def __repr__(self) -> str:
        return f"TailSplit({self._base!r}, {self._split}, cut={self.cut})"


def _open_split(cfg: DataConfig, split: str, required: bool) -> DocumentSource | None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if cfg.eval_paths:
        return open_corpus(cfg, "data.paths" if split == "train" else "data.eval_paths")
    base = open_corpus(cfg)
    mask = base.heldout()
    if mask is None:
        mask = heldout_mask(base.iter_keys(), cfg.eval_fraction)
        if cfg.eval_fraction > 0 and (mask.all() or not mask.any()) and not base.has_entropies:
            tail = TailSplit(base, cfg.eval_fraction, split)
            if split == "eval":
                warnings.warn(
                    f"{base!r}: {len(base)} document(s) are too few for a held-out split by documents "
                    f"(data.eval_fraction={cfg.eval_fraction}); the last {len(tail[0])} bytes of the last "
                    "document are held out instead (set data.eval_paths for a held-out corpus)",
                    stacklevel=3,
                )
            return tail
    indices = np.flatnonzero(mask if split == "eval" else ~mask)
    if indices.size == 0:
        if not required:
            return None
        if split == "eval":
            raise ConfigError(
                f"the held-out split of {base!r} is empty (data.eval_fraction={cfg.eval_fraction}); "
                "raise data.eval_fraction or set data.eval_paths"
            )
        raise ConfigError(
            f"every one of the {len(base)} documents of {base!r} is held out; lower "
            "data.eval_fraction or add documents to data.paths"
        )
    return Subset(base, indices, split)


def open_split(data_cfg: Any, split: str, required: bool = True) -> DocumentSource | None:
    """The documents of ``split`` ("train" or "eval") as a random-access source, in corpus order.

    An empty split raises ConfigError naming the key that controls it, or gives None where not
    ``required`` (``data.eval_fraction=0``: no held-out evaluation).
    """
    cfg = data_cfg if isinstance(data_cfg, DataConfig) else parse_data_config(data_cfg)
    return _open_split(cfg, split, required=required)


def iterate_labeled(data_cfg: Any) -> Iterator[tuple[bytes, bool]]:
    """Yields ``(document bytes, is_heldout)`` for every document: the train split, then the eval split.

    Either split may be empty here (e.g. ``data.eval_fraction=0``). Sources open (and config errors
    raise) at the call, not at the first ``next``.
    """
    cfg = data_cfg if isinstance(data_cfg, DataConfig) else parse_data_config(data_cfg)
    parts = [
        (_open_split(cfg, "train", required=False), False),
        (_open_split(cfg, "eval", required=False), True),
    ]
    return ((source[i], flag) for source, flag in parts if source is not None for i in range(len(source)))


def iterate_documents(data_cfg: Any, split: str = "train") -> Iterator[bytes]:
    """Yields the raw bytes of every document of ``split`` ("train", "eval" or "all" = train then eval).

    Corpus order, no shuffling, no sharding: for preprocessing (entropies, statistics) and tools.
    "train"/"eval" raise ConfigError (at the call) if that split is empty; "all" accepts an empty one.
    """
    cfg = data_cfg if isinstance(data_cfg, DataConfig) else parse_data_config(data_cfg)
    if split == "all":
        return (doc for doc, _ in iterate_labeled(cfg))
    if split not in SPLITS:
        raise ValueError(f"split must be 'train', 'eval' or 'all', got {split!r}")
    source = open_split(cfg, split)
    return (source[i] for i in range(len(source)))
