"""Concatenate-and-split packing of token streams into fixed-length rows, as a grain ``IterDataset``.

Documents (dicts of equal-length 1-D arrays, ``{"ids": int32[n], ...}``) are concatenated in stream
order and cut into rows of exactly ``row_len`` positions; a document longer than what is left of a row
continues at the start of the next one. Nothing is dropped or reordered, and padding (0 in every
field) appears only in the last row of a finite stream. Row ``k`` therefore equals
``concat(all documents)[k * row_len : (k + 1) * row_len]``.

The iterator state is small and exact: the parent's state just before the document currently being
cut, plus the offset already emitted from it. Restoring re-reads that one document and skips the
offset, so a restored iterator continues with the very next row.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

Document = dict[str, np.ndarray]


class PackIterDataset(grain.IterDataset):
    """Packs a stream of documents ``{field: array[n_i]}`` into rows ``{field: array[row_len]}``."""

    def __init__(self, parent: grain.IterDataset, row_len: int):
        super().__init__(parent)
        if row_len < 1:
            raise ValueError(f"row_len must be >= 1, got {row_len}")
        self._row_len = int(row_len)

    def __iter__(self) -> _PackIterator:
        return _PackIterator(self._parent.__iter__(), self._row_len)

    def __str__(self) -> str:
        return f"PackIterDataset(row_len={self._row_len})"


class _PackIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, row_len: int):
        super().__init__(parent)
        self._row_len = row_len
        self._doc: Document | None = None
        self._doc_len = 0
        self._pos = 0
        self._doc_state: Any = None  # parent state just before self._doc was read
        self._exhausted = False

    def _read_doc(self) -> bool:
        """Reads the next document into the buffer; False at the end of the parent stream."""
        self._doc_state = self._parent.get_state()
        try:
            doc = next(self._parent)
        except StopIteration:
            self._doc, self._doc_len, self._pos = None, 0, 0
            self._exhausted = True
            return False
        lengths = {k: np.shape(v) for k, v in doc.items()}
        if "ids" not in doc or len({s for s in lengths.values()}) != 1 or len(lengths["ids"]) != 1:
            raise ValueError(f"packing needs equal-length 1-D fields including 'ids', got shapes {lengths}")
        self._doc = {k: np.asarray(v) for k, v in doc.items()}
        self._doc_len = int(lengths["ids"][0])
        self._pos = 0
        return True

    def __next__(self) -> Document:
        if self._exhausted:
            raise StopIteration
        pieces: dict[str, list[np.ndarray]] = {}
        filled = 0
        while filled < self._row_len:
            if self._doc is None or self._pos >= self._doc_len:
                if not self._read_doc():
                    break
                continue  # an empty document adds nothing
            take = min(self._row_len - filled, self._doc_len - self._pos)
            for k, v in self._doc.items():
                pieces.setdefault(k, []).append(v[self._pos : self._pos + take])
            self._pos += take
            filled += take
        if filled == 0:
            raise StopIteration
        row = {}
        for k, parts in pieces.items():
            out = np.zeros((self._row_len,), dtype=parts[0].dtype)  # 0 = BOE padding id
            out[:filled] = np.concatenate(parts)
            row[k] = out
        return row

    def get_state(self) -> dict[str, Any]:
        if self._doc is not None and self._pos < self._doc_len:
            return {"parent": self._doc_state, "offset": int(self._pos)}
        return {"parent": self._parent.get_state(), "offset": 0}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._doc, self._doc_len, self._pos = None, 0, 0
        self._exhausted = False
        offset = int(state["offset"])
        if offset:
            if not self._read_doc() or offset > self._doc_len:
                raise ValueError(
                    f"cannot restore the packing state {state}: the data no longer matches the checkpoint "
                    "(same data.* settings and corpus files are needed to resume)"
                )
            self._pos = offset

    def __str__(self) -> str:
        return f"PackDatasetIterator(row_len={self._row_len})"
