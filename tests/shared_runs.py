"""Expensive setups (trained workdirs) built once per pytest session and shared by its processes.

Under xdist's default scheduling the tests of one module run on both workers, so a module fixture
is built once per worker. A setup made with :func:`built_once` is built by the first process that
asks for it, in the session's directory (tests/conftest.py); the others wait for it and read the
same files. A test that changes such a directory copies it first.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

SESSION_ENV = "FASTBLT_TEST_SESSION_DIR"
REPO = Path(__file__).resolve().parent.parent


def built_once(name: str, build: Callable[[Path], None]) -> Path:
    """The directory ``build(path)`` fills, built once per session under ``name``.

    A lock file serialises the builders: the process that gets it first builds, the others then find
    the finished directory. A build that failed (or whose process died) leaves no finished directory,
    so the next process to ask builds again and fails the same way, each test with its own error."""
    root = Path(os.environ[SESSION_ENV]) / "shared"
    root.mkdir(exist_ok=True)
    done = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or its process dies
        if not done.is_dir():
            partial = root / f"{name}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir()
            build(partial)
            partial.rename(done)
    return done


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value))  # floats round-trip exactly (repr), so losses stay bitwise


def read_json(path: Path):
    return json.loads(path.read_text())


def train_subprocess(workdir: Path, spec: str, overrides: list[str]) -> None:
    """``python -m fastblt train`` of ``spec`` with ``--set`` overrides, compiled at XLA's default
    LLVM level: the tests' -O0 (tests/conftest.py) halves compile time but doubles step time, and a
    run of hundreds of steps spends its time in steps. On one CPU device, not the tests' 8: a setup
    that only needs trained weights gains nothing from a mesh of fake devices on 2 cores, and pays
    for it (test_blt_d_trained's run at 150 steps, 2026-12-06, 2 loaded cores: 101 s on one device
    against 118-142 s on 8; the train step compiled in 22.5 s instead of 27.1, the steps ran ~15%
    faster, the losses agreed to the 4th decimal and the test's readings were the same). Checkpoints
    restore onto any mesh (load_model)."""
    flags = os.environ.get("XLA_FLAGS", "").replace("--xla_backend_optimization_level=0", "")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags)
    flags = f"{flags} --xla_force_host_platform_device_count=1".strip()
    argv = [sys.executable, "-m", "fastblt", "train", "--config", spec, "--workdir", str(workdir)]
    argv += [a for o in overrides for a in ("--set", o)]
    done = subprocess.run(
        argv, cwd=REPO, env=dict(os.environ, XLA_FLAGS=flags), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def uninterrupted_run() -> tuple[Path, dict[int, float]]:
    """(workdir, {step: loss}) of one uninterrupted run of ``train_utils.small_config(steps=6)``
    (checkpoints 3 and 6), built once per session: the reference of the resume tests
    (tests/test_train.py) and of the killed runs (tests/test_preemption_exit.py). Losses do not
    depend on when checkpoints are written. A test that changes the workdir copies it first."""
    from train_utils import small_config

    from fastblt.train.loop import train

    def build(path: Path) -> None:
        losses: dict[int, float] = {}
        train(
            small_config(steps=6),
            str(path / "run"),
            log=lambda *_: None,
            on_step=lambda s, m: losses.__setitem__(s, m["loss"]),
        )
        write_json(path / "losses.json", sorted(losses.items()))

    done = built_once("uninterrupted", build)
    losses = {int(s): loss for s, loss in read_json(done / "losses.json")}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    return done / "run", losses


# The two-stage run's settings. Its patch buffer starts at 8 slots, fewer than a row of ~17 patches
# (64 bytes at ~4 bytes a patch) needs, so stage 2 raises it: the run tests/test_calibration.py reads
# for that raise is this one, instead of a two-stage run of its own (51 s in the full suite).
TWO_STAGE_ARGS = (
    "entropy_stage.steps=3",
    "entropy_stage.target_patch_len=4.0",
    "model.patcher.max_patches=8",
)


def two_stage_run() -> tuple[Path, list[str], dict]:
    """(workdir, logs, last metrics) of a finished two-stage run of ``train_utils.small_config(
    *TWO_STAGE_ARGS, steps=3, patching="entropy")``, built once per session: read by
    tests/test_train.py (the stages, export and conversion) and tests/test_calibration.py (the raised
    patch buffer, and resuming with it). Each run compiles both stages' steps. It prints the
    end-of-run greedy sample, which train_utils turns off elsewhere. A test that changes the workdir
    copies it first."""
    from train_utils import small_config

    from fastblt.train.loop import run

    def build(path: Path) -> None:
        cfg = small_config(*TWO_STAGE_ARGS, "train.sample_bytes=8", steps=3, patching="entropy")
        logs: list[str] = []
        last = run(cfg, str(path / "run"), log=logs.append)
        write_json(path / "result.json", {"logs": logs, "last": last})

    done = built_once("two_stage", build)
    result = read_json(done / "result.json")
    return done / "run", result["logs"], result["last"]
