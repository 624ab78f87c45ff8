"""Ahead-of-time compilation of the train step: on the 8 local CPU devices (always), and for a TPU
topology through libtpu (when the package is installed)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from train_utils import SMALL_MODEL, small_config

from fastblt import sharding
from fastblt.config import ConfigError, experiment_config
from fastblt.launch.accelerators import parse_tpu
from fastblt.train import aot, metrics
from fastblt.train.loop import Trainer, make_task
from fastblt.train.roofline import Roofline
from fastblt.train.tasks import frozen_template

REPO = Path(__file__).resolve().parent.parent


def _shard_bytes(shape, dtype, named_sharding) -> int:
    return int(np.prod(named_sharding.shard_shape(tuple(shape)))) * np.dtype(dtype).itemsize


def test_cpu8_compile_reports_the_per_device_arguments_exactly():
    # An entropy-patched BLT, fully sharded over 4 of the devices: state, frozen entropy model and batch.
    cfg = small_config("mesh.data=2", "mesh.fsdp=4", patching="entropy")
    report = aot.compile_train_step(cfg, "cpu:8", peak_flops=2e12, hbm_bandwidth=5e10, avg_patch_len=3.0)
    assert (report.num_devices, report.mesh) == (8, {"data": 2, "fsdp": 4, "tensor": 1})
    assert report.topology == "cpu:8" and report.hbm_bytes is None

    # The roofline: XLA's per-device cost of this program, the given peaks, the project's FLOP count.
    roof = report.roofline
    assert roof.flops > 0 and roof.bytes_accessed > 0 and roof.chips == 8
    step_bytes = cfg.data.batch_size * cfg.data.seq_len
    model = experiment_config(cfg).model
    per_byte = metrics.model_flops_per_byte(model, cfg.data.seq_len, 3.0)
    per_byte += metrics.entropy_model_flops_per_byte(model, cfg.data.seq_len)  # the frozen patcher
    assert roof.model_flops == pytest.approx(per_byte * step_bytes)
    assert roof.step_seconds == max(roof.flops / 2e12, roof.bytes_accessed / 5e10)
    assert roof.mfu == pytest.approx(roof.model_flops / (8 * 2e12 * roof.step_seconds))
    assert roof.bytes_per_sec == pytest.approx(step_bytes / roof.step_seconds)
    as_json = json.loads(json.dumps(report.as_dict()))
    assert as_json["roofline"]["step_seconds"] == roof.step_seconds
    assert as_json["total_bytes"] == report.total_bytes

    # Oracle: per-device bytes from the global shapes and the shardings the trainer assigns.
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:8])
    trainer = Trainer(cfg, mesh)
    state = sum(_shard_bytes(x.shape, x.dtype, x.sharding) for x in jax.tree.leaves(trainer.abstract_state))
    frozen = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(frozen_template(make_task(cfg))))
    rows = cfg.data.batch_size // 8  # batch over data x fsdp = 8 devices
    batch = rows * cfg.data.seq_len * (4 + 4 + 4)  # inputs, targets (int32), mask (float32)
    assert report.argument_bytes == state + frozen + batch
    assert report.alias_bytes == state  # the donated state is reused for the new state
    assert report.output_bytes >= state
    assert report.temp_bytes > 0
    assert (
        report.total_bytes
        == report.argument_bytes + report.output_bytes - report.alias_bytes + report.temp_bytes
    )
    text = "\n".join(report.lines())
    assert "mesh {'data': 2, 'fsdp': 4, 'tensor': 1}" in text and "temporaries" in text


def test_roofline_bounds_and_lines():
    compute = Roofline(flops=2e12, bytes_accessed=1e9, chips=4, model_flops=4e12, step_bytes=1000)
    assert compute.step_seconds is None and compute.mfu is None and compute.bytes_per_sec is None
    assert any("no published peak" in line for line in compute.lines())
    compute.peak_flops, compute.hbm_bandwidth = 1e12, 1e9  # 2 s of FLOPs, 1 s of bytes
    assert (compute.step_seconds, compute.bound) == (2.0, "compute")
    assert compute.mfu == 4e12 / (4 * 1e12 * 2.0) and compute.bytes_per_sec == 500.0
    memory = Roofline(1e12, 3e9, 4, 4e12, 1000, peak_flops=1e12, hbm_bandwidth=1e9)
    assert (memory.step_seconds, memory.bound) == (3.0, "memory")
    assert "step time      3000.0 ms  (memory-bound)" in "\n".join(memory.lines())
    memory.loop_trips = (25, 0, 0)
    assert "3 while loop(s), trip counts 25; 2 of unknown trip count" in "\n".join(memory.lines())
    v5p = parse_tpu("v5p-128")  # Cloud TPU's published v5p figures
    assert (v5p.peak_flops, v5p.hbm_bandwidth) == (459e12, 2765e9)
    with pytest.raises(ConfigError, match="both a peak FLOP/s and an HBM bandwidth"):
        aot.compile_train_step(small_config(), "cpu:8", peak_flops=1e12)


def test_compile_rejects_impossible_layouts():
    with pytest.raises(ConfigError, match=r"data.batch_size=12 does not split over the 8 data-parallel"):
        aot.compile_train_step(small_config("data.batch_size=12"), "cpu:8")
    with pytest.raises(ConfigError, match=r"xla_force_host_platform_device_count=64"):
        aot.compile_train_step(small_config(), "cpu:64")
    with pytest.raises(ConfigError, match=r"--topology: .*or cpu:N"):
        aot.compile_train_step(small_config(), "h100-8")


def test_missing_libtpu_is_a_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"pip install 'libtpu==[0-9.*]+'"):
        aot.topology_devices("v5p-8")


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs the libtpu package (jax[tpu])")
@pytest.mark.parametrize("impl", ["xla", "splash"])
def test_compile_for_a_tpu_topology_without_a_tpu(impl):
    # A subprocess: libtpu is loaded into it, not into the test process. "splash": the Pallas kernel
    # compiled by Mosaic for the TPU (not interpreted).
    argv = [sys.executable, "-m", "fastblt.cli", "compile", "--config", "tiny:patching=static"]
    argv += [
        "--topology",
        "v5p-8",
        "--json",
        "--set",
        "train.steps=4",
        "--set",
        f"model.attention_impl={impl}",
    ]
    for o in SMALL_MODEL:
        if not o.startswith("model.entropy_model"):
            argv += ["--set", o]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)
    p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(p.stdout.strip().splitlines()[-1])
    assert report["num_devices"] == 4 and report["device_kind"].startswith("TPU v5")
    assert report["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    assert report["hbm_bytes"] == 95 * 2**30
    # The state is replicated over data parallelism: every chip holds all of it (TPU layouts may pad).
    cfg = small_config()
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    state = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(Trainer(cfg, mesh).abstract_state))
    assert state <= report["alias_bytes"] < 2 * state
    assert report["total_bytes"] < report["hbm_bytes"]
    roof = report["roofline"]
    assert (roof["peak_flops"], roof["hbm_bandwidth"]) == (459e12, 2765e9)
    assert roof["flops"] > 0 and roof["step_seconds"] > 0 and 0 < roof["mfu"] < 1
