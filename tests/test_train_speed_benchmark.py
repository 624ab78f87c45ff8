"""experiments/benchmarks/train_speed.py on CPU at the tiny shape: every output is written."""

import json
import os
import sys

import pytest

try:
    from gpu_paths import cuda_text
except ImportError:  # pragma: no cover - when tests/ is a package
    from tests.gpu_paths import cuda_text

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
    assert r["pallas_kernels"] == []  # no switch on, and the CPU's step has no GPU kernels
    assert "| entropy |" in (tmp_path / "train_speed.md").read_text()
    assert (tmp_path / "train_speed.png").stat().st_size > 0


def test_pallas_kernel_names_are_found_in_a_lowered_program():
    """The names the row records come from the lowered text: the range kernel's three, traced for CUDA."""
    import jax
    import jax.numpy as jnp

    from fastblt.model import range_attention as ra

    q = jnp.ones((1, 64, 1, 64), jnp.bfloat16)
    lo = jnp.zeros((1, 64), jnp.int32)

    def loss(q):
        return jnp.sum(ra.range_attention(q, q, q, lo, lo + 5, interpret=False)[0].astype(jnp.float32))

    text = cuda_text(jax.grad(loss), q)
    names = ["fastblt_range_attention", "fastblt_range_attention_dkv", "fastblt_range_attention_dq"]
    assert train_speed.pallas_kernels(text) == names


def test_the_pool_kernel_is_found_in_a_lowered_program():
    """The encoder's pool kernel, traced for CUDA, is named in the row (run 25's rows lacked it)."""
    import jax
    import jax.numpy as jnp

    from fastblt.model import pool_kernel

    ids = jnp.repeat(jnp.arange(16, dtype=jnp.int32), 4)[None]

    def loss(h):
        return jnp.sum(pool_kernel.patch_max_pool(h, ids, 16, interpret=False).astype(jnp.float32))

    text = cuda_text(jax.grad(loss), jnp.ones((1, 64, 64), jnp.bfloat16))
    assert train_speed.pallas_kernels(text) == ["fastblt_patch_max_pool"]


def test_switches_are_set_cleared_or_left_and_forwarded_to_the_rows(monkeypatch):
    """--x sets a model switch, --no-x clears it, neither leaves the module's default; a row's process
    gets the same flags, and the row records every switch as it ran."""
    import importlib

    for module, switch, _ in train_speed.SWITCHES.values():  # restored after the test
        monkeypatch.setattr(
            importlib.import_module(module), switch, getattr(importlib.import_module(module), switch)
        )
    from fastblt.model import block_rows, blt, cross_attention, layers

    monkeypatch.setattr(cross_attention, "GPU_CROSS_RANGES", True)
    monkeypatch.setattr(layers, "GPU_FUSED_NORM", False)
    monkeypatch.setattr(layers, "GPU_NORM_PARTS", False)
    monkeypatch.setattr(blt, "GPU_POOL_KERNEL", False)
    monkeypatch.setattr(block_rows, "OWN_BLOCK_IN_KERNEL", False)
    args = train_speed.parser().parse_args(
        ["--no-range-kernel", "--fused-norm", "--own-in-kernel", "--rows", "blt"]
    )
    forwarded = train_speed._forward(args)
    assert "--no-range-kernel" in forwarded and "--fused-norm" in forwarded and "--own-in-kernel" in forwarded
    assert not any("cross-ranges" in f or "self-ranges" in f for f in forwarded)  # left to the module
    settings = train_speed.apply_switches(args)
    assert settings == {
        "fused_norm": True,
        "norm_parts": False,
        "pool_kernel": False,
        "range_kernel": False,
        "own_in_kernel": True,
        "cross_ranges": True,
        "self_ranges": False,
    }
    assert not block_rows.GPU_RANGE_KERNEL and layers.GPU_FUSED_NORM and cross_attention.GPU_CROSS_RANGES
    assert block_rows.OWN_BLOCK_IN_KERNEL
    assert train_speed.apply_switches(train_speed.parser().parse_args(forwarded)) == settings


def test_segment_tiers_are_forwarded_set_and_checked(monkeypatch):
    """--segment-tiers reaches a row's process and sets attention.SEGMENT_TIERS there; tiers that do
    not rise are refused with the flag's name."""
    from fastblt.model import attention

    monkeypatch.setattr(attention, "SEGMENT_TIERS", attention.SEGMENT_TIERS)
    default = list(attention.SEGMENT_TIERS)
    assert train_speed.apply_segment_tiers(train_speed.parser().parse_args([])) == default
    args = train_speed.parser().parse_args(["--segment-tiers", "8", "--rows", "blt"])
    forwarded = train_speed._forward(args)
    assert forwarded[forwarded.index("--segment-tiers") + 1] == "8"
    assert train_speed.apply_segment_tiers(args) == [8] and attention.SEGMENT_TIERS == (8,)
    with pytest.raises(SystemExit, match="--segment-tiers"):
        train_speed.apply_segment_tiers(train_speed.parser().parse_args(["--segment-tiers", "8", "4"]))


def test_scan_layers_and_remat_reach_the_rows_config():
    """--scan-layers and --remat set the row's model config in its own process (forwarded)."""
    args = train_speed.parser().parse_args(["--scan-layers", "on", "--remat", "minimal", "--rows", "blt"])
    forwarded = train_speed._forward(args)
    assert forwarded[forwarded.index("--scan-layers") + 1] == "on"
    row = train_speed.parser().parse_args(forwarded)
    cfg = train_speed.experiment("tiny", "blt", None, None, row.remat, row.attention_impl, row.scan_layers)
    assert cfg.model.scan_layers and cfg.model.remat and cfg.model.remat_policy == "minimal"
    cfg = train_speed.experiment("1b", "blt", None, None, scan_layers="off")
    assert not cfg.model.scan_layers and cfg.model.remat  # the 1b shape's remat stays
