"""``preprocess`` writes a tensorstore corpus that reads back equal to its source, with entropies."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from fastblt.config import ConfigError
from fastblt.data.pipeline import make_eval_batches, make_train_iterator
from fastblt.data.preprocess import preprocess
from fastblt.data.splits import iterate_documents, open_split
from fastblt.data.tensorstore_corpus import TensorstoreSource

DOCS = [b"alpha", "b\u00e9ta".encode(), b"", b"\x00\xff raw bytes " * 5, b"delta" * 40, b"epsilon"]


@pytest.fixture
def text_cfg(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i, d in enumerate(DOCS):
        (src / f"{i}.txt").write_bytes(d)
    return {
        "source": "text",
        "paths": str(src / "*.txt"),
        "seq_len": 8,
        "batch_size": 2,
        "eval_fraction": 0.3,
    }


def _fake_entropies(tokens: np.ndarray) -> np.ndarray:
    """An independent, recognisable function of the tokens (exact in float16)."""
    return (tokens % 64).astype(np.float32) / 8.0


def _ts_cfg(path, **overrides):
    return {"source": "tensorstore", "paths": str(path), "seq_len": 8, "batch_size": 2, **overrides}


def test_round_trip_keeps_documents_and_split(text_cfg, tmp_path):
    dst = tmp_path / "corpus"
    meta = preprocess(text_cfg, str(dst))
    assert meta["num_documents"] == len(DOCS) and meta["num_bytes"] == sum(map(len, DOCS))
    assert not meta["has_entropies"]
    assert json.loads((dst / "meta.json").read_text()) == meta
    source = TensorstoreSource(str(dst))
    assert sorted(source[i] for i in range(len(source))) == sorted(DOCS)
    # The same train/eval documents as the original source.
    for split in ("train", "eval"):
        assert list(iterate_documents(_ts_cfg(dst), split)) == list(iterate_documents(text_cfg, split))
    assert meta["num_heldout"] == len(open_split(text_cfg, "eval"))
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary directory left
    with pytest.raises(ConfigError, match="data.entropies=True but .* stores no entropies"):
        make_train_iterator(_ts_cfg(dst, entropies=True))


def test_entropies_stored_read_and_batched(text_cfg, tmp_path):
    dst = tmp_path / "corpus"
    seen = []

    def entropy_fn(tokens):
        seen.append(tokens.copy())
        return _fake_entropies(tokens)

    meta = preprocess(text_cfg, str(dst), entropy_fn=entropy_fn)
    assert meta["has_entropies"]
    assert all(t[0] == 1 and t[-1] == 2 for t in seen)  # [BOS] + ids + [EOS]
    source = TensorstoreSource(str(dst))
    for i in range(len(source)):
        ids = np.concatenate([[1], np.frombuffer(source[i], np.uint8).astype(np.int32) + 4, [2]])
        ent = source.entropies(i)
        assert ent.dtype == np.float16
        np.testing.assert_array_equal(ent.astype(np.float32), _fake_entropies(ids))
    # Batches carry entropies aligned with their inputs.
    cfg = _ts_cfg(dst, entropies=True, num_epochs=1, shuffle=False)
    for batch in list(make_train_iterator(cfg)) + make_eval_batches(cfg):
        real = batch["inputs"] != 0
        np.testing.assert_array_equal(batch["entropies"][real], _fake_entropies(batch["inputs"][real]))
        assert not batch["entropies"][~real].any()


def test_refuses_to_overwrite_unless_asked(text_cfg, tmp_path):
    dst = tmp_path / "corpus"
    preprocess(text_cfg, str(dst))
    with pytest.raises(FileExistsError, match="corpus already exists; pass overwrite=True"):
        preprocess(text_cfg, str(dst))
    meta = preprocess(text_cfg, str(dst), entropy_fn=_fake_entropies, overwrite=True)
    assert meta["has_entropies"] and TensorstoreSource(str(dst)).has_entropies
    assert sorted(p for p in os.listdir(tmp_path)) == ["corpus", "src"]


def test_failure_leaves_no_corpus(text_cfg, tmp_path):
    dst = tmp_path / "corpus"
    with pytest.raises(ValueError, match="entropy_fn returned shape"):
        preprocess(text_cfg, str(dst), entropy_fn=lambda t: np.zeros(3))
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_not_a_corpus_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"data\.paths: .*empty is not a fastblt corpus \(no meta\.json\)"):
        open_split(_ts_cfg(tmp_path / "empty"), "train")
