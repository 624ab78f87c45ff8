"""Random-access document sources: plain-text files, JSON Lines and ArrayRecord.

Every source is a grain-compatible ``RandomAccessDataSource``: ``len(source)`` documents and
``source[i] -> bytes`` (the raw document, never tokenized). Each also yields a stable string key per
document (:meth:`DocumentSource.iter_keys`) from which the held-out split is hashed, and has a stable
``repr`` (no memory addresses, no absolute roots) so a pipeline description is the same in every process.

No grain or JAX import here: sources are cheap to build in tools and tests. Missing or unreadable files
raise :class:`~fastblt.config.ConfigError` (a path/glob in the config is wrong) or :class:`DataError`
(a file's content is wrong), naming the path, the line and the config key to fix.
"""

from __future__ import annotations

import bisect
import glob
import hashlib
import json
import mmap
import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from fastblt.config import ConfigError
from fastblt.errors import DataError  # noqa: F401  (raised here; importable from this module)


def _digest(items: Iterable[str]) -> str:
    h = hashlib.sha1()
    for item in items:
        h.update(item.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()[:12]


class DocumentSource:
    """Base of all sources: ``len``, ``[i] -> bytes``, stable keys, optional split and entropies."""

    has_entropies = False

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> bytes:
        raise NotImplementedError

    def iter_keys(self) -> Iterator[str]:
        """One stable string per document, in index order (the held-out split hashes these)."""
        raise NotImplementedError

    def heldout(self) -> np.ndarray | None:
        """``bool[len]`` fixed held-out flags if the corpus carries its own split, else None."""
        return None

    def entropies(self, index: int) -> np.ndarray:
        """``float16[len(doc) + 2]``: stored entropies of ``[BOS] + doc + [EOS]`` (tensorstore only)."""
        raise ConfigError(f"{self!r} stores no entropies; set data.entropies=False")

    def _check_index(self, index: int) -> int:
        n = len(self)
        index = int(index)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"document index {index} out of range for {n} documents")
        return index


# ---------------------------------------------------------------------------------------------------------
# Paths and the held-out rule.
# ---------------------------------------------------------------------------------------------------------


def expand_globs(patterns: Sequence[str], key: str, want_dirs: bool = False) -> list[str]:
    """Sorted unique absolute paths matched by ``patterns`` (files, or directories if ``want_dirs``).

    Raises ConfigError naming the pattern and ``key`` when a glob matches nothing or a path is missing.
    """
    if not patterns:
        raise ConfigError(f"{key} is empty; set a glob of the corpus files")
    found: set[str] = set()
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if glob.has_magic(expanded):
            matches = glob.glob(expanded, recursive=True)
            if not matches:
                raise ConfigError(f"{key}: glob {pattern!r} matched nothing; fix the pattern or the path")
        else:
            if not os.path.exists(expanded):
                raise ConfigError(f"{key}: {pattern!r} does not exist; fix the path")
            matches = [expanded]
        check = os.path.isdir if want_dirs else os.path.isfile
        kept = [m for m in matches if check(m)]
        if not kept:
            kind = "directory" if want_dirs else "file"
            hint = "" if want_dirs else " (for a directory use 'dir/**/*.txt')"
            raise ConfigError(f"{key}: {pattern!r} matched no {kind}{hint}")
        found.update(os.path.abspath(m) for m in kept)
    return sorted(found)


def relative_names(paths: Sequence[str]) -> list[str]:
    """Each path relative to the deepest directory holding them all (POSIX separators)."""
    if not paths:
        return []
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
    return [os.path.relpath(p, root).replace(os.sep, "/") for p in paths]


def key_fraction(key: str) -> float:
    """A stable pseudo-random number in ``[0, 1)`` from a document key (blake2b, not Python's hash)."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def heldout_mask(keys: Iterable[str], fraction: float) -> np.ndarray:
    """``bool[n]``: documents whose key hashes below ``fraction`` (at least one when fraction > 0).

    The rule depends on each key alone, so it ignores listing order. With ``fraction > 0`` and no key
    below it, the key with the smallest hash is held out, so a small corpus still has an eval split
    (unless it has a single document, which then stays in training).
    """
    u = np.fromiter((key_fraction(k) for k in keys), dtype=np.float64)
    mask = u < fraction
    if fraction > 0 and not mask.any() and u.size > 1:
        mask[int(np.argmin(u))] = True
    return mask


def read_bytes(path: str, key: str) -> bytes:
    """The bytes of ``path``; DataError naming the path and ``key`` if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror or e}); fix or remove it from {key}") from e


# ---------------------------------------------------------------------------------------------------------
# Sources.
# ---------------------------------------------------------------------------------------------------------


class TextFileSource(DocumentSource):
    """One document per file: ``source[i]`` is the bytes of ``paths[i]``.

    Args:
      paths: absolute file paths, in document order.
      names: stable per-file keys (default: paths relative to their common directory).
      label: the name shown by ``repr`` (``"text"`` or ``"stdlib"``).
      key: the config key that named the files, for error messages.
    """

    def __init__(
        self,
        paths: Sequence[str],
        names: Sequence[str] | None = None,
        label: str = "text",
        key: str = "data.paths",
    ):
        if not paths:
            raise ConfigError(f"{key}: no files; the corpus is empty")
        self._paths = list(paths)
        self._names = list(names) if names is not None else relative_names(self._paths)
        self._label = label
        self._key = key

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> bytes:
        return read_bytes(self._paths[self._check_index(index)], self._key)

    def iter_keys(self) -> Iterator[str]:
        return iter(self._names)

    @property
    def paths(self) -> list[str]:
        return list(self._paths)

    def __repr__(self) -> str:
        return f"TextFileSource(label={self._label}, files={len(self)}, names_sha1={_digest(self._names)})"


_SCAN_BYTES = 1 << 26


def _index_lines(path: str, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(starts, ends, line_numbers)``, int64 each, of the non-blank lines of ``path``."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            empty = np.zeros((0,), np.int64)
            return empty, empty, empty
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            found = []
            for begin in range(0, size, _SCAN_BYTES):  # in pieces: a bool per byte of a huge file is too much
                piece = np.frombuffer(mm, dtype=np.uint8, count=min(_SCAN_BYTES, size - begin), offset=begin)
                found.append(np.flatnonzero(piece == ord("\n")).astype(np.int64) + begin)
                del piece  # release the buffer before the map closes
            newlines = np.concatenate(found)
            starts = np.concatenate([[0], newlines + 1])
            ends = np.concatenate([newlines, [size]])
            keep = ends > starts
            # Whitespace-only lines are blank too; only short lines can be, so check just those.
            for i in np.flatnonzero(keep & (ends - starts <= 16)):
                if not mm[starts[i] : ends[i]].strip():
                    keep[i] = False
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror or e}); fix or remove it from {key}") from e
    line_numbers = np.flatnonzero(keep).astype(np.int64) + 1
    return starts[keep], ends[keep], line_numbers


class JsonlSource(DocumentSource):
    """One document per non-blank line of JSON Lines files: the string under ``field``.

    Lines are indexed (byte offsets) at construction and parsed on access; a line that is not JSON,
    lacks ``field`` or holds a non-string there raises DataError naming ``file:line`` and
    ``data.jsonl_field``. Keys are ``"<relative path>:<line number>"``.
    """

    def __init__(self, paths: Sequence[str], field: str = "text", key: str = "data.paths"):
        self._paths = list(paths)
        self._names = relative_names(self._paths)
        self._field = field
        self._key = key
        index = [_index_lines(p, key) for p in self._paths]
        self._starts = [s for s, _, _ in index]
        self._ends = [e for _, e, _ in index]
        self._lines = [n for _, _, n in index]
        self._cumulative = np.cumsum([len(s) for s in self._starts]).tolist()
        if not self._cumulative or self._cumulative[-1] == 0:
            raise ConfigError(f"{key}: the JSONL files {self._paths[:3]} hold no non-blank line")
        self._maps: dict[int, mmap.mmap] = {}

    def __len__(self) -> int:
        return self._cumulative[-1]

    def _locate(self, index: int) -> tuple[int, int]:
        file = bisect.bisect_right(self._cumulative, index)
        return file, index - (self._cumulative[file - 1] if file else 0)

    def _line(self, file: int, row: int) -> bytes:
        mm = self._maps.get(file)
        if mm is None:
            try:
                with open(self._paths[file], "rb") as f:
                    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except OSError as e:
                raise DataError(
                    f"cannot read {self._paths[file]} ({e.strerror or e}); check {self._key}"
                ) from e
            self._maps[file] = mm
        return mm[int(self._starts[file][row]) : int(self._ends[file][row])]

    def __getitem__(self, index: int) -> bytes:
        file, row = self._locate(self._check_index(index))
        where = f"{self._paths[file]}:{int(self._lines[file][row])}"
        fix = f"every line must be a JSON object with a string under data.jsonl_field={self._field!r}"
        try:
            obj = json.loads(self._line(file, row))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{where}: not valid JSON ({e}); {fix}") from e
        if not isinstance(obj, dict) or self._field not in obj:
            present = sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
            raise DataError(
                f"{where}: no key {self._field!r} (data.jsonl_field); found {present}; "
                "set data.jsonl_field to the key that holds the text"
            )
        value = obj[self._field]
        if not isinstance(value, str):
            raise DataError(
                f"{where}: data.jsonl_field={self._field!r} holds a {type(value).__name__}; {fix}"
            )
        return value.encode("utf-8", errors="replace")

    def iter_keys(self) -> Iterator[str]:
        for name, lines in zip(self._names, self._lines, strict=True):
            for line in lines.tolist():
                yield f"{name}:{line}"

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": {}}  # memory maps do not pickle; reopened on access

    def __repr__(self) -> str:
        return (
            f"JsonlSource(files={len(self._paths)}, documents={len(self)}, field={self._field}, "
            f"names_sha1={_digest(self._names)})"
        )


class ArrayRecordSource(DocumentSource):
    """One document per record of ArrayRecord files (records are the raw document bytes).

    Keys are ``"<relative path>#<record index>"``. Each file is opened at construction so a missing or
    corrupt file fails early, naming it and the config key.
    """

    def __init__(self, paths: Sequence[str], key: str = "data.paths"):
        from array_record.python import array_record_module

        self._paths = list(paths)
        self._names = relative_names(self._paths)
        self._key = key
        counts = []
        for path in self._paths:
            try:
                reader = array_record_module.ArrayRecordReader(path)
                counts.append(int(reader.num_records()))
                reader.close()
            except Exception as e:  # the C++ reader raises RuntimeError/ValueError/OSError
                raise DataError(f"{path} is not a readable ArrayRecord file ({e}); check {key}") from e
        self._counts = counts
        self._cumulative = np.cumsum(counts).tolist()
        if not self._cumulative or self._cumulative[-1] == 0:
            raise ConfigError(f"{key}: the ArrayRecord files {self._paths[:3]} hold no record")
        self._reader = None

    def __len__(self) -> int:
        return self._cumulative[-1]

    def __getitem__(self, index: int) -> bytes:
        index = self._check_index(index)
        if self._reader is None:
            from array_record.python import array_record_data_source

            self._reader = array_record_data_source.ArrayRecordDataSource(self._paths)
        return bytes(self._reader[index])

    def iter_keys(self) -> Iterator[str]:
        for name, count in zip(self._names, self._counts, strict=True):
            for record in range(count):
                yield f"{name}#{record}"

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_reader": None}

    def __repr__(self) -> str:
        return f"ArrayRecordSource(files={len(self._paths)}, records={len(self)}, names_sha1={_digest(self._names)})"


class Subset(DocumentSource):
    """Documents ``indices`` of ``base`` (a split), in that order; entropies pass through."""

    def __init__(self, base: DocumentSource, indices: np.ndarray, split: str):
        self._base = base
        self._indices = np.asarray(indices, dtype=np.int64)
        self._split = split
        self.has_entropies = base.has_entropies

    def __len__(self) -> int:
        return int(self._indices.shape[0])

    def __getitem__(self, index: int) -> bytes:
        return self._base[int(self._indices[self._check_index(index)])]

    def entropies(self, index: int) -> np.ndarray:
        return self._base.entropies(int(self._indices[self._check_index(index)]))

    def iter_keys(self) -> Iterator[str]:
        keys = list(self._base.iter_keys())
        return (keys[i] for i in self._indices.tolist())

    @property
    def base(self) -> DocumentSource:
        return self._base

    @property
    def indices(self) -> np.ndarray:
        return self._indices.copy()

    def __repr__(self) -> str:
        digest = hashlib.sha1(self._indices.tobytes()).hexdigest()[:12]
        return f"Subset({self._split}, {self._base!r}, documents={len(self)}, indices_sha1={digest})"
