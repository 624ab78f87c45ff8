"""Data: document sources, the embedded stdlib corpus, the grain pipeline and corpus preprocessing.

Modules, one job each:

- ``sources``: text / JSONL / ArrayRecord random-access sources and the held-out hash rule.
- ``stdlib``: the default corpus, the interpreter's standard-library source.
- ``tensorstore_corpus``: the preprocessed corpus format and its source.
- ``splits``: config -> train/eval sources; :func:`iterate_documents`.
- ``packing``: concatenate-and-split packing as a grain ``IterDataset``.
- ``pipeline``: :func:`make_train_iterator`, :func:`make_eval_batches` (imports grain, hence JAX).
- ``preprocess``: ``preprocess.preprocess`` writes a tensorstore corpus (optionally with entropies);
  import it from its module (``from fastblt.data.preprocess import preprocess``): the package attribute
  ``fastblt.data.preprocess`` is the module.

The ``data`` config section (its keys, defaults and rules) is :class:`fastblt.config.DataConfig`.

Names below load on first access, so ``import fastblt.data`` does not import grain or JAX.
"""

from __future__ import annotations

from fastblt.lazy_exports import lazy_exports

_EXPORTS = {
    "DataError": "sources",
    "open_split": "splits",
    "iterate_documents": "splits",
    "StdlibSource": "stdlib",
    "TensorstoreSource": "tensorstore_corpus",
    "make_train_iterator": "pipeline",
    "make_eval_batches": "pipeline",
    "train_dataset": "pipeline",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
