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
    assert ref["fwd_ms"] > 0 and ref["fwd_bwd_ms"] > 0 and ref["max_out_diff"] == ref["max_grad_diff"] == 0
    # The step's own path and cuDNN without a mask are there, and every row is timed or says why not
    # (the GPU kernels, on this CPU); the Mosaic GPU rows are there where JAX has that kernel.
    assert {"fastblt cudnn (documents packed, the step's path)", "jax.nn cudnn, no mask"} <= set(rows)
    for name, row in rows.items():
        assert "failed" in row or row["fwd_ms"] > 0, row
        assert row["compared_with"] == attention_speed.REFERENCE.get(name, "fastblt xla (dense mask)")
