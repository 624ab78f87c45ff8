"""experiments/benchmarks/paper_tables.py: several models' evaluations in one table and one plot."""

from __future__ import annotations

import json

from experiments.benchmarks import paper_tables


def _row(method: str, setting: dict, key: str, chrf: float, bandwidth: float = 0.07) -> dict:
    return {
        "task": "code_completion", "method": method, "setting": setting, "examples": 2, "max_bytes": 4,
        "exact_first_line": 0.5, "chrf": chrf, "judge_bits_per_byte": 1.25, "generated_bytes": 8.0,
        "decoder_passes_per_byte": 1.0, "eg_passes_per_byte": 0.25, "bandwidth_gb_per_byte": bandwidth,
        "decoder_passes_per_byte_implementation": 1.0, "eg_passes_per_byte_implementation": 0.25,
        "bandwidth_gb_per_byte_implementation": 0.06, "bytes_per_s": 100.0, "key": key,
    }  # fmt: skip


def _write(path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_tables_and_plot_of_two_models(tmp_path):
    root = tmp_path / "root"
    for model, method, setting in (("plain", "blt_s", {"draft": 8}), ("d4", "blt_d", {"block_size": 4})):
        ev = root / "eval" / model
        k_ar, k_m, stale = (
            json.dumps([f, "code_completion", 2, m]) for f, m in ((3, "ar"), (3, method), (2, "ar"))
        )
        rows = [_row("ar", {}, k_ar, 30.0), _row(method, setting, k_m, 12.5, 0.0175)]
        # A row of an older row format (a rerun into an old directory): left out, and not the ar compared with.
        _write(ev / "results.jsonl", [_row("ar", {"draft": 99}, stale, 99.0, 1.0), *rows])
        # Against ar's "abcd" + "wxyz": 3 of 4 and 2 of 4 bytes equal at the same positions.
        _write(ev / "generations.jsonl", [{"key": stale, "outputs": ["zzzz", "zzzz"]},
                                          {"key": k_ar, "outputs": ["abcd", "wxyz"]},
                                          {"key": k_m, "outputs": ["abXd", "wx wx"]}])  # fmt: skip
        metrics = [{"step": 10, "loss": 1.0, "bytes_per_sec": 5.0}, {"step": 20, "bytes_per_sec": 7.0},
                   {"step": 20, "eval_loss": 0.7, "eval_bits_per_byte": 1.0099}]  # fmt: skip
        _write(root / model / "blt" / "tensorboard" / "metrics.jsonl", metrics)
    # A BLT-D diagnostic: the last line of ROOT/consistency_d4.jsonl, a column for d4 only.
    _write(root / "consistency_d4.jsonl", [{"checkpoint": "x", "C/agreement_with_B": 0.5},
                                           {"checkpoint": "x", "B/accuracy_per_cell": [0.5, 0.25],
                                            "C/agreement_with_B": 1.0}])  # fmt: skip
    out = tmp_path / "out"
    paper_tables.main([str(root), "--out", str(out)])
    table = (out / "paper_tables.md").read_text()
    assert "| plain | 20 | 1.0099 | 0.7000 | 7 |" in table  # the first speed (compile) is left out
    # word type-token ratio from the generations: "abXd" 1/1, "wx wx" 1/2
    assert "| plain | blt_s draft=8 | 0.500 | 12.50 | 0.750 |" in table and "| 0.62 |" in table
    assert "| 0.01750 | 0.25 |" in table and "| 0.07000 | 1.00 |" in table  # bandwidth and its ratio to ar's
    assert "| d4 | blt_d |" in table  # block_size is the model's, not a column
    assert "99.00" not in table and "draft=99" not in table
    assert table.index("| plain | ar") < table.index("| d4 | ar")
    assert "| figure | d4 |" in table and "| B/accuracy_per_cell | 0.500 / 0.250 |" in table
    assert "| C/agreement_with_B | 1.000 |" in table and "checkpoint" not in table
    assert (out / "paper_tables.png").stat().st_size > 0
