"""`fastblt train` on SIGTERM, as a scheduler sees it: a real subprocess saves promptly and exits 75
(unfinished), and the launchers count 75 as a clean stop, not a failure."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_utils import SMALL_MODEL

from fastblt.launch.common import PREEMPTED_EXIT, worker_report

REPO = Path(__file__).resolve().parent.parent


def test_worker_report_counts_a_preempted_worker_as_clean():
    exits = {"0": ("h0", 0), "1": ("h1", PREEMPTED_EXIT), "2": ("h2", 1)}
    assert worker_report(exits, 3) == ["worker 2 (h2) exited with status 1"]


@pytest.mark.slow
def test_sigterm_saves_the_next_step_and_exits_75(tmp_path):
    sets = [a for o in SMALL_MODEL if not o.startswith("model.entropy_model") for a in ("--set", o)]
    argv = [
        sys.executable,
        "-m",
        "fastblt",
        "train",
        "--config",
        "tiny:patching=static",
        "--workdir",
        str(tmp_path),
    ]
    argv += [*sets, "--set", "train.steps=500", "--set", "checkpoint.save_every=1000"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    for line in proc.stdout:  # wait for the first logged step: the loop is running
        lines.append(line)
        if "step 3/" in line or "3/500" in line:
            break
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT, "".join(lines) + rest
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] <= 6, saved  # the step in flight, not every step queued ahead
    assert time.time() - t0 < 120
