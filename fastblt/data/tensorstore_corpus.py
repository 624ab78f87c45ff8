"""A preprocessed corpus on disk (zarr arrays through tensorstore) and its random-access source.

Layout of a corpus directory (written by :func:`fastblt.data.preprocess.preprocess`)::

    meta.json      {"format": "fastblt-corpus", "version": 1, "num_documents": n, "num_bytes": b,
                    "num_heldout": h, "has_entropies": bool, "source": ..., "paths": [...], ...}
    bytes/         zarr uint8[b]      every document's raw bytes, concatenated (no BOS/EOS, no ids)
    offsets/       zarr int64[n + 1]  document i is bytes[offsets[i]:offsets[i + 1]]; offsets[0] = 0
    heldout/       zarr uint8[n]      1 where document i belongs to the held-out (eval) split
    entropies/     zarr float16[b + 2n], only if an entropy function was given: the entropies of
                   document i's token stream [BOS] + ids + [EOS] (length len_i + 2) are
                   entropies[offsets[i] + 2i : offsets[i + 1] + 2(i + 1)]

Raw bytes (not uint16 ids) keep the corpus at one byte per byte; ids are ``byte + 4`` (tokenizer).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from fastblt.config import ConfigError
from fastblt.data.sources import DataError, DocumentSource

FORMAT = "fastblt-corpus"
VERSION = 1
META = "meta.json"
ARRAYS = ("bytes", "offsets", "heldout", "entropies")


def zarr_spec(path: str) -> dict[str, Any]:
    """Tensorstore spec of the zarr array at ``path`` (a local directory)."""
    return {"driver": "zarr", "kvstore": {"driver": "file", "path": os.path.abspath(path)}}


def _open(path: str, key: str) -> Any:
    import tensorstore as ts

    try:
        return ts.open(zarr_spec(path), open=True, read=True).result()
    except Exception as e:  # tensorstore raises ValueError/RuntimeError with its own status text
        raise DataError(f"cannot open the zarr array {path} ({e}); rewrite the corpus (check {key})") from e


def read_meta(path: str, key: str = "data.paths") -> dict[str, Any]:
    """The ``meta.json`` of the corpus directory ``path``; ConfigError/DataError if it is not one."""
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path):
        raise ConfigError(
            f"{key}: {path} is not a fastblt corpus (no {META}); write one with "
            "`fastblt preprocess` (fastblt.data.preprocess.preprocess) first"
        )
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read {meta_path} ({e}); rewrite the corpus") from e
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise DataError(
            f"{meta_path}: format {meta.get('format')!r} version {meta.get('version')!r} is not "
            f"{FORMAT!r} version {VERSION}; rewrite the corpus with this fastblt"
        )
    return meta


class TensorstoreSource(DocumentSource):
    """Random access to the documents (and entropies) of a preprocessed corpus directory.

    ``offsets`` and ``heldout`` are read into memory at construction (9 bytes per document); document
    bytes and entropies are read per access. The corpus carries its own split (:meth:`heldout`).
    """

    def __init__(self, path: str, key: str = "data.paths"):
        self._path = os.path.abspath(path)
        self._key = key
        self._meta = read_meta(self._path, key)
        self._offsets = np.asarray(
            _open(os.path.join(self._path, "offsets"), key).read().result(), dtype=np.int64
        )
        self._heldout = np.asarray(
            _open(os.path.join(self._path, "heldout"), key).read().result(), dtype=bool
        )
        n = int(self._meta["num_documents"])
        if self._offsets.shape != (n + 1,) or self._heldout.shape != (n,):
            raise DataError(
                f"{self._path}: offsets/heldout shapes {self._offsets.shape}/{self._heldout.shape} do not "
                f"match num_documents={n} in {META}; rewrite the corpus"
            )
        if n == 0:
            raise ConfigError(f"{key}: the corpus {self._path} holds no document")
        self.has_entropies = bool(self._meta.get("has_entropies", False))
        self._arrays: dict[str, Any] = {}

    def _array(self, name: str) -> Any:
        if name not in self._arrays:
            self._arrays[name] = _open(os.path.join(self._path, name), self._key)
        return self._arrays[name]

    def __len__(self) -> int:
        return int(self._offsets.shape[0] - 1)

    def __getitem__(self, index: int) -> bytes:
        i = self._check_index(index)
        start, stop = int(self._offsets[i]), int(self._offsets[i + 1])
        return np.asarray(self._array("bytes")[start:stop].read().result(), dtype=np.uint8).tobytes()

    def entropies(self, index: int) -> np.ndarray:
        if not self.has_entropies:
            return super().entropies(index)
        i = self._check_index(index)
        start, stop = int(self._offsets[i]) + 2 * i, int(self._offsets[i + 1]) + 2 * (i + 1)
        return np.asarray(self._array("entropies")[start:stop].read().result(), dtype=np.float16)

    def heldout(self) -> np.ndarray:
        return self._heldout.copy()

    def iter_keys(self) -> Iterator[str]:
        return (str(i) for i in range(len(self)))

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self._meta)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": {}}  # tensorstore handles are reopened on access

    def __repr__(self) -> str:
        return (
            f"TensorstoreSource(documents={len(self)}, bytes={int(self._offsets[-1])}, "
            f"entropies={self.has_entropies}, name={os.path.basename(self._path)})"
        )
