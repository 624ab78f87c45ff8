"""The grain training pipeline and the fixed evaluation batches.

Training (:func:`make_train_iterator`), on every host::

    documents of the train split (random access, raw bytes; see fastblt.data.splits)
      -> encode: [BOS] + (byte + 4) + [EOS]                      (fastblt.tokenizer)
      -> shuffle (data.seed; a new permutation every epoch)      MapDataset.shuffle
      -> repeat (data.num_epochs; None = forever)                MapDataset.repeat
      -> this host's documents: [process_index::process_count]   disjoint, covering
      -> to_iter_dataset (+ mp_prefetch if data.worker_count > 0)
      -> pack into rows of seq_len + 1 ids (concatenate and split) PackIterDataset
      -> batch of batch_size / process_count rows -> inputs, targets, mask

Each batch is a dict of numpy arrays (``local_batch = data.batch_size // process_count``)::

    inputs:  int32[local_batch, seq_len]    row[:-1]
    targets: int32[local_batch, seq_len]    row[1:]
    mask:    float32[local_batch, seq_len]  1.0 where targets != 0 (0 = BOE padding)
    entropies: float32[local_batch, seq_len] only with data.entropies: the stored entropy of inputs[t]

The returned ``grain.DatasetIterator`` checkpoints with ``get_state``/``set_state`` and as an Orbax item
(``grain.checkpoint.CheckpointSave(iterator)`` / ``CheckpointRestore(iterator)``); restored into a
freshly built pipeline with the same ``data`` config it yields exactly the next batch. The state is a
few integers per host, so restoring needs the same ``process_count``.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from fastblt import tokenizer
from fastblt.config import ConfigError, DataConfig, parse_data_config
from fastblt.data.packing import PackIterDataset
from fastblt.data.sources import DataError, DocumentSource
from fastblt.data.splits import open_split

Batch = dict[str, np.ndarray]

# Threads that read documents ahead of the packer, and how many documents they may hold.
READ_THREADS = 2
READ_BUFFER = 32


class EncodedDocuments:
    """Random-access ``{"ids": int32[n + 2], ("entropies": float32[n + 2])}`` of a document source."""

    def __init__(self, source: DocumentSource, with_entropies: bool = False):
        if with_entropies and not source.has_entropies:
            raise ConfigError(
                f"data.entropies=True but {source!r} stores no entropies; preprocess the corpus with an "
                "entropy function or set data.entropies=False"
            )
        self._source = source
        self._with_entropies = with_entropies

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        ids = tokenizer.encode(self._source[index], add_bos=True, add_eos=True)
        doc = {"ids": ids}
        if self._with_entropies:
            entropies = np.asarray(self._source.entropies(index), dtype=np.float32)
            if entropies.shape != ids.shape:
                raise DataError(
                    f"document {index} of {self._source!r}: {entropies.shape[0]} entropies for {ids.shape[0]} "
                    "ids; rewrite the corpus"
                )
            doc["entropies"] = entropies
        return doc

    def __repr__(self) -> str:
        return f"EncodedDocuments({self._source!r}, entropies={self._with_entropies})"


class MakeBatch:
    """Stacks up to ``local_batch`` packed rows (``int32[seq_len + 1]``) into one fixed-shape batch.

    Missing rows (the end of a finite stream) are all padding, with mask 0.
    """

    def __init__(self, local_batch: int, seq_len: int, with_entropies: bool = False):
        self.local_batch = local_batch
        self.seq_len = seq_len
        self.with_entropies = with_entropies

    def __call__(self, rows: Sequence[dict[str, np.ndarray]]) -> Batch:
        if len(rows) > self.local_batch:
            raise ValueError(f"got {len(rows)} rows for a batch of {self.local_batch}")
        ids = np.zeros((self.local_batch, self.seq_len + 1), np.int32)
        for i, row in enumerate(rows):
            ids[i] = row["ids"]
        targets = np.ascontiguousarray(ids[:, 1:])
        batch = {
            "inputs": np.ascontiguousarray(ids[:, :-1]),
            "targets": targets,
            "mask": (targets != tokenizer.BOE).astype(np.float32),
        }
        if self.with_entropies:
            entropies = np.zeros((self.local_batch, self.seq_len), np.float32)
            for i, row in enumerate(rows):
                entropies[i] = row["entropies"][:-1]
            batch["entropies"] = entropies
        return batch


def _check_process(process_index: int, process_count: int) -> None:
    if not isinstance(process_count, int) or process_count < 1:
        raise ValueError(f"process_count must be a positive integer, got {process_count!r}")
    if not isinstance(process_index, int) or not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index!r}")


def _ensure_absl_flags_parsed() -> None:
    """grain's multiprocessing reads absl flags; outside an absl app they are unparsed, so use defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _read_options() -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=READ_BUFFER)


def train_dataset(data_cfg: Any, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """The training pipeline of this host as a grain ``IterDataset`` (see the module docstring)."""
    cfg = data_cfg if isinstance(data_cfg, DataConfig) else parse_data_config(data_cfg)
    _check_process(process_index, process_count)
    local_batch = cfg.local_batch_size(process_count)
    source = open_split(cfg, "train")
    _warn_if_shorter_than_a_row(source, cfg.seq_len + 1)
    docs = EncodedDocuments(source, with_entropies=cfg.entropies)
    ds = grain.MapDataset.source(docs)
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    ds = ds.repeat(cfg.num_epochs)
    ds = ds[process_index::process_count]
    it = ds.to_iter_dataset(_read_options())
    if cfg.worker_count > 0:
        # Workers read and encode interleaved slices; the main process packs them in the original order.
        _ensure_absl_flags_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count))
    it = PackIterDataset(it, row_len=cfg.seq_len + 1)
    return it.batch(local_batch, batch_fn=MakeBatch(local_batch, cfg.seq_len, cfg.entropies))


def _warn_if_shorter_than_a_row(source, row_len: int, few: int = 64) -> None:
    """A corpus (of a few documents: larger ones are not read for this) that is shorter than one packed
    row trains, its documents repeated in every row; say so."""
    if len(source) > few:
        return
    total = sum(len(source[i]) + 2 for i in range(len(source)))  # + BOS and EOS
    if total < row_len:
        warnings.warn(
            f"the training split of {source!r} holds {total} tokens, fewer than one row of "
            f"data.seq_len + 1 = {row_len}: every row repeats it (add text or lower data.seq_len)",
            stacklevel=3,
        )


def make_train_iterator(
    data_cfg: Any, process_index: int = 0, process_count: int = 1
) -> grain.DatasetIterator:
    """A checkpointable iterator over this host's training batches (see the module docstring).

    Args:
      data_cfg: the ``config.data`` section (ConfigDict or mapping; keys in fastblt/config/data.py).
      process_index: this host's index, ``jax.process_index()``.
      process_count: the number of hosts, ``jax.process_count()``; must divide ``data.batch_size``.
    """
    return iter(train_dataset(data_cfg, process_index, process_count))


def make_eval_batches(data_cfg: Any, process_index: int = 0, process_count: int = 1) -> list[Batch]:
    """The fixed evaluation batches of this host: the held-out split, packed in corpus order.

    The held-out documents are packed (no shuffling) into global batches of ``data.batch_size`` rows;
    at most ``data.eval_batches`` of them are kept (all if None), the last padded with empty rows.
    Host ``p`` gets rows ``[p * local_batch, (p + 1) * local_batch)`` of every global batch, so every
    host returns the same number of batches and together they cover the set exactly once. The result
    is the same on every call. Returns a list of batches shaped as in the module docstring.
    """
    cfg = data_cfg if isinstance(data_cfg, DataConfig) else parse_data_config(data_cfg)
    _check_process(process_index, process_count)
    local_batch = cfg.local_batch_size(process_count)
    heldout = open_split(cfg, "eval", required=bool(cfg.eval_paths) or cfg.eval_fraction > 0)
    if heldout is None:  # data.eval_fraction=0: no held-out evaluation
        return []
    docs = EncodedDocuments(heldout, with_entropies=cfg.entropies)
    rows_ds = PackIterDataset(grain.MapDataset.source(docs).to_iter_dataset(_read_options()), cfg.seq_len + 1)
    limit = None if cfg.eval_batches is None else cfg.eval_batches * cfg.batch_size
    rows = list(itertools.islice(iter(rows_ds), limit))
    make = MakeBatch(local_batch, cfg.seq_len, cfg.entropies)
    start = process_index * local_batch
    batches = []
    for b in range(math.ceil(len(rows) / cfg.batch_size)):
        global_rows = rows[b * cfg.batch_size : (b + 1) * cfg.batch_size]
        batches.append(make(global_rows[start : start + local_batch]))
    return batches
