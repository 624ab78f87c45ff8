"""experiments/benchmarks/speed_gpu.sh's driver logic (DEADLINE, done markers, the kernel check's gate)
with a stand-in python3 that only sleeps or succeeds: no benchmark runs here."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks" / "speed_gpu.sh"


def _python3(bin_dir: Path, script: str) -> Path:
    """A directory holding an executable ``python3`` that runs the bash ``script``."""
    bin_dir.mkdir()
    exe = bin_dir / "python3"
    exe.write_text("#!/usr/bin/env bash\n" + script + "\n")
    exe.chmod(0o755)
    return bin_dir


@pytest.fixture
def fake_python(tmp_path):
    """A python3 on PATH that sleeps FAKE_SLEEP seconds, then exits 0."""
    return _python3(tmp_path / "bin", 'sleep "${FAKE_SLEEP:-0}"')


def run(fake_python, out: Path, phases: str, **env) -> str:
    environ = {**os.environ, "PATH": f"{fake_python}:{os.environ['PATH']}", "PHASES": phases, **env}
    subprocess.run(
        ["bash", str(SCRIPT), str(out)], cwd=SCRIPT.parents[2], env=environ, check=True, capture_output=True
    )
    return (out / "log.txt").read_text()


def test_deadline_stops_a_phase_and_starts_none_too_late(fake_python, tmp_path):
    out = tmp_path / "out"
    t0 = time.monotonic()
    log = run(fake_python, out, "22 8", DEADLINE=str(int(time.time()) + 3), MIN_PHASE_S="1", FAKE_SLEEP="30")
    assert time.monotonic() - t0 < 25  # the sleeping phase was stopped at the deadline
    assert "[decode_check] exit 124" in log and "[gen_ref] not started" in log
    assert not (out / "decode_check" / "done").exists()
    log = run(fake_python, out, "22", DEADLINE=str(int(time.time()) + 60))  # under MIN_PHASE_S (120)
    assert log.count("[decode_check] not started") == 1


def test_done_phases_are_skipped_and_the_kernel_check_gates_its_speed_phases(fake_python, tmp_path):
    out = tmp_path / "out"
    log = run(fake_python, out, "14")
    assert "[14] skipped" in log and not (out / "gen_direct").exists()
    log = run(fake_python, out, "22 14")
    assert (out / "decode_check" / "done").exists() and (out / "gen_direct" / "done").exists()
    log = run(fake_python, out, "22")
    assert log.count("[decode_check] start") == 1  # done: not run again


@pytest.fixture
def failing_range_check(tmp_path):
    """A python3 on PATH that exits 1 for range_check.py and 0 for anything else."""
    return _python3(tmp_path / "failing", 'case "$*" in *range_check*) exit 1 ;; esac')


def test_the_range_kernel_check_gates_its_train_rows(fake_python, failing_range_check, tmp_path):
    """Phase 30 runs its train rows only once range_check passed on the machine (a failing check:
    a python3 that exits 1 for it)."""
    out = tmp_path / "out"
    log = run(failing_range_check, out, "30")
    assert "[range_check] exit 1" in log and "[train_range] skipped" in log
    assert not (out / "train_range_tiles").exists()
    log = run(fake_python, out, "30")
    for name in ("train_range_tiles", "train_range_kernel", "train_range_cross", "train_range_all"):
        assert (out / name / "done").exists(), name


def test_the_own_block_check_gates_phase_39s_train_rows(fake_python, failing_range_check, tmp_path):
    """Phase 39 runs its train rows (plain BLT, then BLT-D with and without OWN_BLOCK_IN_KERNEL, twice)
    only once range_check's block rows passed on the machine."""
    out = tmp_path / "out"
    log = run(failing_range_check, out, "39")
    assert "[own_check] exit 1" in log and "[39] train rows skipped" in log
    assert not (out / "own_plain").exists()
    log = run(fake_python, out, "39")
    for name in ("own_check", "own_plain", "own_kernel_1", "own_merge_1", "own_kernel_2", "own_merge_2"):
        assert (out / name / "done").exists(), name
