"""From a ``data`` config to the train/eval document sources, and plain iteration over documents.

The held-out rule, in order:

1. ``data.eval_paths`` set: ``paths`` is all training, ``eval_paths`` all evaluation.
2. the corpus carries its own split (a tensorstore corpus's ``heldout`` array): it is used.
3. otherwise each document whose key hashes below ``data.eval_fraction`` is held out
   (:func:`fastblt.data.sources.heldout_mask`); train and eval are disjoint by construction.

No grain or JAX import: the preprocessing tools and tests use this module directly.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from fastblt.config import ConfigError
from fastblt.data.settings import DataConfig, parse_data_config
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


def _open_split(cfg: DataConfig, split: str, required: bool) -> DocumentSource | None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if cfg.eval_paths:
        return open_corpus(cfg, "data.paths" if split == "train" else "data.eval_paths")
    base = open_corpus(cfg)
    mask = base.heldout()
    if mask is None:
        mask = heldout_mask(base.iter_keys(), cfg.eval_fraction)
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


def open_split(data_cfg: Any, split: str) -> DocumentSource:
    """The documents of ``split`` ("train" or "eval") as a random-access source, in corpus order.

    Raises ConfigError when the split is empty, naming the key that controls it.
    """
    cfg = data_cfg if isinstance(data_cfg, DataConfig) else parse_data_config(data_cfg)
    source = _open_split(cfg, split, required=True)
    assert source is not None
    return source


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
