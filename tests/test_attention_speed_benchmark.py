"""experiments/benchmarks/attention_speed.py on CPU at a small shape: every variant gives a row, the
GPU-only kernels their errors, the reference its times."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments", "benchmarks"))
import attention_speed  # noqa: E402


def test_each_variant_reports_times_or_its_error(tmp_path, monkeypatch):
    monkeypatch.setattr(attention_speed, "CASES", {"global_1024": (2, 128, 2, 64, None, 2)})
    monkeypatch.setattr(attention_speed, "_time", lambda fn, *a: (fn(*a), 1e-3)[1])  # one call, no reps
    out = tmp_path / "rows.jsonl"
    attention_speed.run(str(out), ["global_1024"])
    rows = {r["variant"]: r for r in map(json.loads, out.read_text().splitlines())}
    ref = rows["fastblt xla (dense mask)"]
    assert (
        ref["fwd_ms"] > 0 and ref["fwd_bwd_ms"] > 0 and ref["max_grad_diff_vs_fastblt xla (dense mask)"] == 0
    )
    # The comparison rows of the global_1024 case are there, each timed or with the reason it was not.
    for name in (
        "jax.nn cudnn, no mask",
        "mosaic gpu (FA3 design), no mask",
        "mosaic gpu (FA3 design) causal, no docs",
    ):
        assert name in rows and ("failed" in rows[name] or rows[name]["fwd_ms"] > 0), rows.get(name)
