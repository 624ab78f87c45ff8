"""``preprocess``: write any configured corpus as a tensorstore corpus, optionally with entropies.

The corpus layout is described in :mod:`fastblt.data.tensorstore_corpus`. Writing goes to a hidden
temporary directory next to ``dst`` that is renamed to ``dst`` only once complete, so a crash never
leaves a half-written corpus at ``dst`` (at worst a ``.<name>.tmp-*`` directory to delete). An
existing ``dst`` is refused unless ``overwrite=True``.

The written corpus keeps the train/eval split of the source config (its ``heldout`` array), so
``data.source='tensorstore'`` on it evaluates on the same documents as the original source.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

from fastblt import tokenizer
from fastblt.config import DataConfig, parse_data_config
from fastblt.data.splits import iterate_labeled
from fastblt.data.tensorstore_corpus import FORMAT, META, VERSION, zarr_spec

EntropyFn = Callable[[np.ndarray], np.ndarray]

BYTES_CHUNK = 1 << 22  # elements per zarr chunk (4 MiB of bytes, 8 MiB of float16 entropies)
FLUSH_ELEMENTS = 1 << 24  # elements buffered in memory before a write


class _GrowingArray:
    """A 1-D zarr array appended to in large writes (resized as it grows)."""

    def __init__(self, path: str, dtype: str, chunk: int = BYTES_CHUNK):
        import tensorstore as ts

        self._array = ts.open(
            zarr_spec(path),
            create=True,
            dtype=ts.dtype(dtype),
            shape=[0],
            chunk_layout=ts.ChunkLayout(chunk_shape=[chunk]),
        ).result()
        self._dtype = np.dtype(dtype)
        self._size = 0
        self._pending: list[np.ndarray] = []
        self._pending_size = 0

    def append(self, values: np.ndarray) -> None:
        self._pending.append(np.asarray(values, dtype=self._dtype))
        self._pending_size += values.shape[0]
        if self._pending_size >= FLUSH_ELEMENTS:
            self.flush()

    def flush(self) -> None:
        if not self._pending_size:
            return
        data = np.concatenate(self._pending)
        new_size = self._size + data.shape[0]
        self._array = self._array.resize(exclusive_max=[new_size], resize_metadata_only=True).result()
        self._array[self._size : new_size].write(data).result()
        self._size = new_size
        self._pending, self._pending_size = [], 0

    @property
    def size(self) -> int:
        return self._size + self._pending_size


def _write_whole(path: str, values: np.ndarray, chunk: int = 1 << 20) -> None:
    array = _GrowingArray(path, values.dtype.name, chunk)
    array.append(values)
    array.flush()


def _entropies(entropy_fn: EntropyFn, doc: bytes, index: int) -> np.ndarray:
    tokens = tokenizer.encode(doc, add_bos=True, add_eos=True)
    values = np.asarray(entropy_fn(tokens))
    if values.shape != tokens.shape:
        raise ValueError(
            f"entropy_fn returned shape {values.shape} for document {index} of {tokens.shape[0]} tokens; "
            "it must return one entropy per token of [BOS] + ids + [EOS]"
        )
    values = values.astype(np.float16)
    if not np.isfinite(values).all():
        raise ValueError(f"entropy_fn returned non-finite values (after float16) for document {index}")
    return values


def _write(cfg: DataConfig, out: str, entropy_fn: EntropyFn | None) -> dict[str, Any]:
    data = _GrowingArray(os.path.join(out, "bytes"), "uint8")
    entropies = _GrowingArray(os.path.join(out, "entropies"), "float16") if entropy_fn else None
    offsets, heldout = [0], []
    for index, (doc, is_heldout) in enumerate(iterate_labeled(cfg)):
        data.append(np.frombuffer(doc, dtype=np.uint8))
        offsets.append(offsets[-1] + len(doc))
        heldout.append(is_heldout)
        if entropies is not None:
            entropies.append(_entropies(entropy_fn, doc, index))
    if not heldout:
        raise ValueError(f"the corpus of data.source={cfg.source!r} has no document; nothing to preprocess")
    data.flush()
    if entropies is not None:
        entropies.flush()
    _write_whole(os.path.join(out, "offsets"), np.asarray(offsets, dtype=np.int64))
    _write_whole(os.path.join(out, "heldout"), np.asarray(heldout, dtype=np.uint8))
    from fastblt import __version__

    meta = {
        "format": FORMAT,
        "version": VERSION,
        "source": cfg.source,
        "paths": list(cfg.paths),
        "eval_paths": list(cfg.eval_paths),
        "eval_fraction": cfg.eval_fraction,
        "jsonl_field": cfg.jsonl_field,
        "num_documents": len(heldout),
        "num_heldout": int(sum(heldout)),
        "num_bytes": offsets[-1],
        "has_entropies": entropies is not None,
        "entropies_layout": "per document [BOS] + ids + [EOS]: entropies[offsets[i] + 2i : offsets[i + 1] + 2(i + 1)]",
        "fastblt_version": __version__,
    }
    with open(os.path.join(out, META), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    return meta


def preprocess(
    data_cfg: Any, dst: str, entropy_fn: EntropyFn | None = None, overwrite: bool = False
) -> dict[str, Any]:
    """Writes the documents of ``data_cfg`` (train split, then eval split) as a corpus at ``dst``.

    Args:
      data_cfg: a ``config.data`` section naming the source corpus (any ``data.source``).
      dst: the corpus directory to create (a local path).
      entropy_fn: optional ``entropy_fn(tokens: int32[n]) -> float[n]`` called once per document with
        ``[BOS] + (bytes + 4) + [EOS]``; its values are stored as float16.
      overwrite: replace an existing ``dst`` (only after the new corpus is complete).

    Returns the corpus ``meta.json`` as a dict. Raises FileExistsError if ``dst`` exists and
    ``overwrite`` is False.
    """
    cfg = data_cfg if isinstance(data_cfg, DataConfig) else parse_data_config(data_cfg)
    dst = os.path.abspath(os.path.expanduser(dst))
    if os.path.exists(dst) and not overwrite:
        raise FileExistsError(
            f"{dst} already exists; pass overwrite=True (`fastblt preprocess --overwrite`) or choose "
            "another destination"
        )
    if cfg.source == "tensorstore" and any(os.path.abspath(os.path.expanduser(p)) == dst for p in cfg.paths):
        raise ValueError(f"data.paths names the destination {dst}; write the new corpus elsewhere")
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=parent)
    try:
        meta = _write(cfg, tmp, entropy_fn)
        if os.path.exists(dst):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.old-", dir=parent)
            os.rename(dst, os.path.join(old, "corpus"))
            os.rename(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta
