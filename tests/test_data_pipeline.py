"""The grain training pipeline and the eval batches, checked against naive re-computation.

The corpus is a handful of text files with unique contents, so every document can be recognised in
the packed stream; the oracle concatenates ``[1] + (bytes + 4) + [2]`` per document in Python and cuts
rows of ``seq_len + 1``.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fastblt.config import ConfigError
from fastblt.data.pipeline import make_eval_batches, make_train_iterator
from fastblt.data.splits import open_split

SEQ_LEN = 24
N_DOCS = 13


def _docs() -> list[bytes]:
    # Unique, varied lengths (some longer than a row, one empty), no byte that maps to BOS/EOS issues.
    return [(f"doc{i:02d}:" + "abcdefg"[: i % 7] * (i % 5 + 1)).encode() for i in range(N_DOCS - 1)] + [b""]


@pytest.fixture
def corpus(tmp_path):
    docs = _docs()
    for i, d in enumerate(docs):
        (tmp_path / f"{i:02d}.txt").write_bytes(d)
    return tmp_path, docs


def _cfg(root, **overrides):
    cfg = {
        "source": "text",
        "paths": str(root / "*.txt"),
        "seq_len": SEQ_LEN,
        "batch_size": 4,
        "eval_fraction": 0.0,
        "num_epochs": 1,
    }
    return {**cfg, **overrides}


def _naive_rows(docs: list[bytes], row_len: int) -> np.ndarray:
    stream: list[int] = []
    for d in docs:
        stream += [1] + [b + 4 for b in d] + [2]
    n_rows = -(-len(stream) // row_len)
    stream += [0] * (n_rows * row_len - len(stream))
    return np.array(stream, np.int32).reshape(n_rows, row_len)


def _rows(batches) -> np.ndarray:
    """``int32[n, seq_len + 1]``: the packed rows behind a list of batches (inputs + last target)."""
    rows = [np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1) for b in batches]
    return np.concatenate(rows)


def _doc_order(rows: np.ndarray, docs: list[bytes], complete: bool = True) -> list[int]:
    """Which documents, in order, the packed stream holds (split at BOS).

    With ``complete=False`` the stream may stop inside a document (a prefix of an infinite stream).
    """
    stream = rows.reshape(-1).tolist()
    while stream and stream[-1] == 0:
        stream.pop()
    lookup = {d: i for i, d in enumerate(docs)}
    order, current = [], None
    for t in stream:
        if t == 1:
            current = []
        elif t == 2:
            order.append(lookup[bytes(current)])
            current = None
        else:
            current.append(t - 4)
    assert current is None or not complete, "the stream must end with EOS"
    return order


def _take(it, n=None):
    return list(itertools.islice(it, n))


def test_batch_shapes_dtypes_and_mask(corpus):
    root, _ = corpus
    batches = _take(make_train_iterator(_cfg(root)))
    for b in batches:
        assert set(b) == {"inputs", "targets", "mask"}
        assert b["inputs"].shape == b["targets"].shape == b["mask"].shape == (4, SEQ_LEN)
        assert b["inputs"].dtype == b["targets"].dtype == np.int32 and b["mask"].dtype == np.float32
        np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
        np.testing.assert_array_equal(b["mask"], (b["targets"] != 0).astype(np.float32))
    # Padding only at the very end of the finite stream: every mask is all ones until the last batch.
    flat = np.concatenate([b["mask"].reshape(-1) for b in batches])
    assert flat[: int(flat.sum())].all() and not flat[int(flat.sum()) :].any()


def test_unshuffled_packing_equals_naive_concatenation(corpus):
    root, docs = corpus
    batches = _take(make_train_iterator(_cfg(root, shuffle=False)))
    expected = _naive_rows(docs, SEQ_LEN + 1)
    rows = _rows(batches)
    assert rows.shape[0] == -(-expected.shape[0] // 4) * 4  # whole batches; extra rows are padding
    np.testing.assert_array_equal(rows[: expected.shape[0]], expected)
    assert not rows[expected.shape[0] :].any()


def test_shuffled_packing_equals_naive_concatenation_in_shuffled_order(corpus):
    root, docs = corpus
    rows = _rows(_take(make_train_iterator(_cfg(root, num_epochs=2, seed=7))))
    order = _doc_order(rows, docs)
    # Each epoch is a permutation of all documents, and the two epochs use different permutations.
    assert sorted(order[:N_DOCS]) == sorted(order[N_DOCS:]) == list(range(N_DOCS))
    assert order[:N_DOCS] != order[N_DOCS:]
    assert order[:N_DOCS] != list(range(N_DOCS))
    expected = _naive_rows([docs[i] for i in order], SEQ_LEN + 1)
    np.testing.assert_array_equal(rows[: expected.shape[0]], expected)


def test_same_seed_same_batches_other_seed_other_order(corpus):
    root, docs = corpus
    first = _rows(_take(make_train_iterator(_cfg(root, seed=3, num_epochs=None)), 6))
    again = _rows(_take(make_train_iterator(_cfg(root, seed=3, num_epochs=None)), 6))
    other = _rows(_take(make_train_iterator(_cfg(root, seed=4, num_epochs=None)), 6))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert (
        _doc_order(first, docs, complete=False)[:N_DOCS] != _doc_order(other, docs, complete=False)[:N_DOCS]
    )


def test_hosts_are_disjoint_and_cover_one_epoch(corpus):
    root, docs = corpus
    seen = []
    for host in range(2):
        batches = _take(make_train_iterator(_cfg(root, seed=5), process_index=host, process_count=2))
        assert all(b["inputs"].shape == (2, SEQ_LEN) for b in batches)
        seen.append(_doc_order(_rows(batches), docs))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(N_DOCS))
    assert abs(len(seen[0]) - len(seen[1])) <= 1


def test_batch_size_must_divide_by_process_count(corpus):
    root, _ = corpus
    with pytest.raises(ConfigError, match="data.batch_size=4 is not divisible by process_count=3"):
        make_train_iterator(_cfg(root), process_index=0, process_count=3)
    with pytest.raises(ValueError, match="process_index"):
        make_train_iterator(_cfg(root), process_index=2, process_count=2)


def test_get_state_set_state_resumes_mid_document(corpus):
    root, _ = corpus
    cfg = _cfg(root, num_epochs=None, seed=1)
    it = make_train_iterator(cfg)
    for _ in range(10):  # stop where the checkpoint falls inside a document
        next(it)
        state = it.get_state()
        if state["offset"] > 0:
            break
    assert state["offset"] > 0
    expected = _take(it, 5)
    fresh = make_train_iterator(cfg)
    fresh.set_state(state)
    for want, got in zip(expected, _take(fresh, 5), strict=True):
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])


def test_iterator_state_round_trips_through_orbax(corpus, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    import grain

    root, _ = corpus
    cfg = _cfg(root, num_epochs=None, seed=2)
    it = make_train_iterator(cfg)
    next(it)
    while it.get_state()["offset"] == 0:  # save inside a document: the hardest place to resume
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as manager:
        manager.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    expected = _take(it, 4)

    fresh = make_train_iterator(cfg)  # a new pipeline object, never iterated
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as manager:
        assert manager.latest_step() == 4
        restored = manager.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert restored["data"] is fresh
    for want, got in zip(expected, _take(fresh, 4), strict=True):
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])


def test_finite_stream_ends_and_state_after_end(corpus):
    root, _ = corpus
    it = make_train_iterator(_cfg(root))
    n = len(_take(it))
    assert n > 0 and _take(it) == []
    fresh = make_train_iterator(_cfg(root))
    fresh.set_state(it.get_state())
    assert _take(fresh) == []


def test_eval_batches_fixed_and_split_across_hosts(corpus):
    root, docs = corpus
    cfg = _cfg(root, eval_fraction=0.4, eval_batches=None, batch_size=2, seq_len=8)
    held = open_split(cfg, "eval")
    held_docs = [held[i] for i in range(len(held))]
    assert 0 < len(held_docs) < N_DOCS
    single = make_eval_batches(cfg)
    again = make_eval_batches(cfg)
    assert len(single) == len(again) and all(
        np.array_equal(a[k], b[k]) for a, b in zip(single, again, strict=True) for k in a
    )
    expected = _naive_rows(held_docs, 9)
    rows = _rows(single)
    np.testing.assert_array_equal(rows[: expected.shape[0]], expected)
    # Two hosts: same number of batches, each takes its half of every global batch.
    hosts = [make_eval_batches(cfg, process_index=h, process_count=2) for h in range(2)]
    assert len(hosts[0]) == len(hosts[1]) == len(single)
    for b, (h0, h1) in enumerate(zip(*hosts, strict=True)):
        np.testing.assert_array_equal(np.concatenate([h0["inputs"], h1["inputs"]]), single[b]["inputs"])
    # Held-out documents never reach training.
    train_order = _doc_order(_rows(_take(make_train_iterator(cfg))), docs)
    assert not {docs[i] for i in train_order} & set(held_docs)
    assert sorted(train_order) == sorted(i for i, d in enumerate(docs) if d not in held_docs)


def test_eval_batches_limit(corpus):
    root, _ = corpus
    cfg = _cfg(root, eval_fraction=0.5, eval_batches=1, batch_size=2, seq_len=4)
    batches = make_eval_batches(cfg)
    assert len(batches) == 1 and batches[0]["inputs"].shape == (2, 4)


def test_stdlib_default_pipeline():
    cfg = {"source": "stdlib", "seq_len": 64, "batch_size": 4, "eval_batches": 2}
    batch = next(make_train_iterator(cfg))
    assert batch["inputs"].shape == (4, 64) and batch["mask"].all()
    evals = make_eval_batches(cfg)
    assert len(evals) == 2 and evals[0]["inputs"][0, 0] == 1  # the first eval row starts a document


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_restore(corpus):
    root, _ = corpus
    cfg = _cfg(root, num_epochs=None, seed=9)
    expected = _take(make_train_iterator(cfg), 8)
    it = make_train_iterator({**cfg, "worker_count": 2})
    try:
        got = _take(it, 4)
        state = it.get_state()
        got += _take(it, 4)
    finally:
        it.close()
    resumed = make_train_iterator({**cfg, "worker_count": 2})
    try:
        resumed.set_state(state)
        got += _take(resumed, 4)
    finally:
        resumed.close()
    for want, have in zip(expected + expected[4:], got, strict=True):
        np.testing.assert_array_equal(want["inputs"], have["inputs"])


def test_one_document_corpus_holds_out_its_tail_with_a_warning(tmp_path):
    doc = bytes(range(40, 140))  # 100 bytes
    (tmp_path / "only.txt").write_bytes(doc)
    cfg = _cfg(tmp_path, eval_fraction=0.1, batch_size=2, seq_len=16)
    with pytest.warns(UserWarning, match="last 10 bytes of the last document are held out"):
        heldout = open_split(cfg, "eval")
    train = open_split(cfg, "train")
    assert (len(train), len(heldout)) == (1, 1)
    assert train[0] == doc[:90] and heldout[0] == doc[90:]  # disjoint, together the whole document
    with pytest.warns(UserWarning):
        batches = make_eval_batches(cfg)
    assert bytes(int(t) - 4 for t in _rows(batches)[0][1:11]) == doc[90:]  # BOS, then the tail


def test_eval_fraction_zero_means_no_heldout_evaluation(tmp_path):
    (tmp_path / "only.txt").write_bytes(b"a single short document")
    cfg = _cfg(tmp_path, eval_fraction=0.0, batch_size=2, seq_len=64)
    assert make_eval_batches(cfg) == []
    assert open_split(cfg, "eval", required=False) is None
    with pytest.warns(UserWarning, match="fewer than one row of data.seq_len \\+ 1 = 65"):
        rows = _rows(_take(make_train_iterator(cfg), 1))
    assert bytes(int(t) - 4 for t in rows[0][1:24]) == b"a single short document"
