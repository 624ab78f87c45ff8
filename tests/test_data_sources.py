"""Data sources, the held-out rule, the stdlib corpus and the config errors of the data section.

Oracles: hand-made corpora written here, and hashes recomputed naively with hashlib.
"""

from __future__ import annotations

import hashlib
import json
import os
import random

import pytest

from fastblt.config import ConfigError, parse_data_config
from fastblt.data.sources import DataError, JsonlSource, TextFileSource, heldout_mask
from fastblt.data.splits import iterate_documents, open_split
from fastblt.data.stdlib import StdlibSource, stdlib_files, stdlib_root


def _cfg(**overrides):
    return {"seq_len": 16, "batch_size": 2, **overrides}


def _write_texts(root, docs: dict[str, bytes]) -> None:
    for name, content in docs.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


# ---------------------------------------------------------------------------------------------------------
# Config section.
# ---------------------------------------------------------------------------------------------------------


def test_defaults_and_paths_as_string():
    cfg = parse_data_config(_cfg(source="text", paths="a/*.txt"))
    assert cfg.paths == ("a/*.txt",)
    assert (cfg.shuffle, cfg.seed, cfg.num_epochs, cfg.worker_count, cfg.eval_fraction) == (
        True,
        0,
        None,
        0,
        0.02,
    )


def test_config_dict_is_accepted():
    ml_collections = pytest.importorskip("ml_collections")
    section = ml_collections.ConfigDict(_cfg(source="stdlib", seed=3))
    assert parse_data_config(section).seed == 3


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"batchsize": 4}, "data.batchsize"),
        ({"seq_len": None}, "data.seq_len is missing"),
        ({"seq_len": 0}, "data.seq_len"),
        ({"batch_size": 2.5}, "data.batch_size"),
        ({"source": "parquet"}, "data.source='parquet'"),
        ({"source": "text"}, "data.paths is required"),
        ({"source": "stdlib", "paths": "x/*.py"}, "data.paths"),
        ({"eval_fraction": 1.0}, "data.eval_fraction"),
        ({"seed": -1}, "data.seed"),
        ({"seed": 2**32}, "data.seed"),
        ({"num_epochs": 0}, "data.num_epochs"),
        ({"shuffle": 1}, "data.shuffle"),
        ({"paths": 3, "source": "text"}, "data.paths"),
        ({"entropies": True}, "data.entropies"),
    ],
)
def test_bad_config_names_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        parse_data_config(_cfg(**overrides))


def test_batch_not_divisible_by_processes():
    with pytest.raises(ConfigError, match="data.batch_size=6 is not divisible by process_count=4"):
        parse_data_config(_cfg(batch_size=6)).local_batch_size(4)


# ---------------------------------------------------------------------------------------------------------
# Text files.
# ---------------------------------------------------------------------------------------------------------


def test_text_source_reads_files_sorted(tmp_path):
    docs = {"b.txt": b"bravo", "a.txt": "alpha \u00e9".encode(), "sub/c.txt": b"\xff\x00raw"}
    _write_texts(tmp_path, docs)
    source = open_split(_cfg(source="text", paths=str(tmp_path / "**/*.txt"), eval_fraction=0.0), "train")
    assert len(source) == 3
    assert [source[i] for i in range(3)] == [docs["a.txt"], docs["b.txt"], docs["sub/c.txt"]]
    assert list(source.iter_keys()) == ["a.txt", "b.txt", "sub/c.txt"]
    # The repr is stable (no addresses) and the same for an identical corpus.
    again = open_split(_cfg(source="text", paths=[str(tmp_path / "**/*.txt")], eval_fraction=0.0), "train")
    assert repr(source) == repr(again) and "0x" not in repr(source)


def test_glob_matching_nothing_names_glob_and_key(tmp_path):
    pattern = str(tmp_path / "*.nothing")
    with pytest.raises(ConfigError, match=r"data\.paths: glob .*\*\.nothing.* matched nothing"):
        open_split(_cfg(source="text", paths=pattern), "train")


def test_missing_path_and_directory(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.paths: .*missing\.txt.* does not exist"):
        open_split(_cfg(source="text", paths=str(tmp_path / "missing.txt")), "train")
    with pytest.raises(ConfigError, match="matched no file"):
        open_split(_cfg(source="text", paths=str(tmp_path)), "train")


def test_unreadable_file_names_path(tmp_path):
    _write_texts(tmp_path, {"a.txt": b"a", "b.txt": b"b"})
    source = TextFileSource([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")])
    os.remove(tmp_path / "b.txt")
    assert source[0] == b"a"
    with pytest.raises(DataError, match=r"cannot read .*b\.txt.*data\.paths"):
        source[1]


def test_eval_paths_split(tmp_path):
    _write_texts(tmp_path, {"train/a.txt": b"A", "train/b.txt": b"B", "eval/c.txt": b"C"})
    cfg = _cfg(source="text", paths=str(tmp_path / "train/*.txt"), eval_paths=str(tmp_path / "eval/*.txt"))
    assert list(iterate_documents(cfg, "train")) == [b"A", b"B"]
    assert list(iterate_documents(cfg, "eval")) == [b"C"]
    assert list(iterate_documents(cfg, "all")) == [b"A", b"B", b"C"]


def test_empty_splits_raise(tmp_path):
    _write_texts(tmp_path, {"only.txt": b"x"})
    cfg = _cfg(source="text", paths=str(tmp_path / "*.txt"), eval_fraction=0.0)
    with pytest.raises(ConfigError, match="held-out split .* is empty .*data.eval_fraction"):
        open_split(cfg, "eval")
    assert list(iterate_documents(cfg, "all")) == [b"x"]


# ---------------------------------------------------------------------------------------------------------
# JSONL.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scan_bytes", [1 << 26, 7])  # 7: lines straddle the indexing pieces
def test_jsonl_source(tmp_path, monkeypatch, scan_bytes):
    monkeypatch.setattr("fastblt.data.sources._SCAN_BYTES", scan_bytes)
    lines = [
        json.dumps({"text": "one"}),
        "",
        "   ",
        json.dumps({"text": "tw\u00f6", "id": 2}),
        json.dumps({"text": ""}),
    ]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "three"}))  # no final newline
    source = JsonlSource(sorted(str(p) for p in tmp_path.glob("*.jsonl")))
    assert [source[i] for i in range(len(source))] == [b"one", "tw\u00f6".encode(), b"", b"three"]
    assert list(source.iter_keys()) == ["a.jsonl:1", "a.jsonl:4", "a.jsonl:5", "b.jsonl:1"]


def test_jsonl_custom_field(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "hi"}) + "\n")
    cfg = _cfg(source="jsonl", paths=str(tmp_path / "a.jsonl"), jsonl_field="body", eval_fraction=0.0)
    assert list(iterate_documents(cfg)) == [b"hi"]


@pytest.mark.parametrize(
    "bad_line, match",
    [
        ("{not json", r"a\.jsonl:3: not valid JSON.*data\.jsonl_field='text'"),
        (json.dumps({"body": "x"}), r"a\.jsonl:3: no key 'text' \(data\.jsonl_field\); found \['body'\]"),
        (json.dumps({"text": 5}), r"a\.jsonl:3: data\.jsonl_field='text' holds a int"),
        (json.dumps(["text"]), r"a\.jsonl:3: no key 'text'"),
    ],
)
def test_jsonl_bad_line_names_file_line_and_key(tmp_path, bad_line, match):
    (tmp_path / "a.jsonl").write_text("\n".join([json.dumps({"text": "ok"}), "", bad_line]) + "\n")
    source = JsonlSource([str(tmp_path / "a.jsonl")])
    assert source[0] == b"ok"
    with pytest.raises(DataError, match=match):
        source[1]


def test_jsonl_without_documents(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n  \n\n")
    (tmp_path / "b.jsonl").write_text("")
    with pytest.raises(ConfigError, match="data.paths: the JSONL files .* hold no non-blank line"):
        open_split(_cfg(source="jsonl", paths=str(tmp_path / "*.jsonl")), "train")


# ---------------------------------------------------------------------------------------------------------
# ArrayRecord.
# ---------------------------------------------------------------------------------------------------------


def test_array_record_source(tmp_path):
    array_record_module = pytest.importorskip("array_record.python.array_record_module")
    records = {"a.array_record": [b"first", "s\u00e9cond".encode()], "b.array_record": [b"\x00\xffraw"]}
    for name, recs in records.items():
        writer = array_record_module.ArrayRecordWriter(str(tmp_path / name), "group_size:1")
        for r in recs:
            writer.write(r)
        writer.close()
    cfg = _cfg(source="array_record", paths=str(tmp_path / "*.array_record"), eval_fraction=0.0)
    source = open_split(cfg, "train")
    assert [source[i] for i in range(len(source))] == records["a.array_record"] + records["b.array_record"]
    assert list(source.iter_keys()) == ["a.array_record#0", "a.array_record#1", "b.array_record#0"]


def test_array_record_corrupt_file_names_path(tmp_path):
    pytest.importorskip("array_record")
    (tmp_path / "bad.array_record").write_bytes(b"this is not an array record file")
    with pytest.raises(DataError, match=r"bad\.array_record is not a readable ArrayRecord file.*data\.paths"):
        open_split(_cfg(source="array_record", paths=str(tmp_path / "*.array_record")), "train")


# ---------------------------------------------------------------------------------------------------------
# Held-out rule and the stdlib corpus.
# ---------------------------------------------------------------------------------------------------------


def _naive_fraction(key: str) -> float:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2**64


def test_heldout_rule_is_per_key_and_order_free():
    keys = [f"pkg/module_{i}.py" for i in range(500)]
    mask = heldout_mask(keys, 0.1)
    assert sorted(k for k, m in zip(keys, mask, strict=True) if m) == sorted(
        k for k in keys if _naive_fraction(k) < 0.1
    )
    shuffled = keys[:]
    random.Random(0).shuffle(shuffled)
    shuffled_mask = heldout_mask(shuffled, 0.1)
    assert {k for k, m in zip(shuffled, shuffled_mask, strict=True) if m} == {
        k for k, m in zip(keys, mask, strict=True) if m
    }
    # A tiny corpus still gets one held-out document (the smallest hash); fraction 0 holds none out.
    small = ["a", "b", "c"]
    assert heldout_mask(small, 0.01).tolist() == [k == min(small, key=_naive_fraction) for k in small]
    assert not heldout_mask(small, 0.0).any()


def test_stdlib_corpus_is_nontrivial():
    names = stdlib_files()
    assert len(names) > 200
    assert names == sorted(names)
    assert not any(
        part in {"test", "tests", "idlelib", "site-packages"} for n in names for part in n.split("/")
    )
    total = sum(os.path.getsize(os.path.join(stdlib_root(), n)) for n in names)
    assert total > 1_000_000


def test_stdlib_split_disjoint_stable_and_nonempty():
    cfg = _cfg()
    train, held = open_split(cfg, "train"), open_split(cfg, "eval")
    train_keys, eval_keys = list(train.iter_keys()), list(held.iter_keys())
    assert 0 < len(eval_keys) < 0.1 * len(train_keys)
    assert not set(train_keys) & set(eval_keys)
    assert sorted(train_keys + eval_keys) == stdlib_files()
    # Whole files are held out, chosen by the hash of their path alone.
    assert set(eval_keys) == {k for k in stdlib_files() if _naive_fraction(k) < 0.02} or len(eval_keys) == 1
    assert list(open_split(cfg, "eval").iter_keys()) == eval_keys
    assert held[0] == open(os.path.join(stdlib_root(), eval_keys[0]), "rb").read()
    assert "StdlibSource" in repr(held) and "0x" not in repr(held)
    assert len(StdlibSource()) == len(train_keys) + len(eval_keys)
