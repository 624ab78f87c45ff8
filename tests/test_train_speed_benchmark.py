"""experiments/benchmarks/train_speed.py on CPU at the tiny shape: every output is written."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments", "benchmarks"))
import train_speed  # noqa: E402


@pytest.mark.slow
def test_train_speed_tiny_writes_table_and_plot(tmp_path):
    train_speed.main(
        ["--shape", "tiny", "--rows", "entropy", "--steps", "1", "--warmup", "0", "--out", str(tmp_path)]
    )
    rows = [json.loads(line) for line in (tmp_path / "train_speed.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rows] == ["entropy"]
    r = rows[0]
    assert "failed" not in r, r
    assert r["bytes_per_sec"] > 0 and r["batch"] == 8 and r["seq_len"] == 512
    assert r["model_tflops_per_step"] > 0 and r["compile_s"] > 0
    # the loop's timing, a second measurement of the same step: positive and of the same order
    assert 0 < r["loop_step_ms"] < 3 * r["step_ms"]
    assert "| entropy |" in (tmp_path / "train_speed.md").read_text()
    assert (tmp_path / "train_speed.png").stat().st_size > 0
