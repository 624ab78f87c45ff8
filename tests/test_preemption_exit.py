"""`fastblt train` on SIGTERM, as a scheduler sees it: a real subprocess saves promptly and exits 75
(unfinished), and the launchers count 75 as a clean stop, not a failure."""

from __future__ import annotations

import json
import os
import re
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


def _train_argv(workdir, *overrides: str) -> list[str]:
    """`python -m fastblt train` of the small static-patching model, with ``--set`` overrides."""
    sets = [a for o in SMALL_MODEL if not o.startswith("model.entropy_model") for a in ("--set", o)]
    argv = [
        sys.executable,
        "-m",
        "fastblt",
        "train",
        "--config",
        "tiny:patching=static",
        "--workdir",
        str(workdir),
    ]
    return argv + sets + [a for o in overrides for a in ("--set", o)]


@pytest.mark.slow
def test_sigterm_saves_the_next_step_and_exits_75(tmp_path):
    argv = _train_argv(tmp_path, "train.steps=500", "checkpoint.save_every=1000")
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


@pytest.mark.slow
def test_kill_9_during_async_saves_then_resume_repeats_the_uninterrupted_losses(tmp_path):
    """A checkpoint is being written after every step (asynchronously), so SIGKILL lands in or between
    saves; the resumed run must restore a complete step and log exactly the uninterrupted losses."""
    from shared_runs import uninterrupted_run

    # The reference: the session's uninterrupted run of the same model (saves every 3 steps, which
    # does not change losses).
    _, full = uninterrupted_run()
    steps = len(full)

    workdir = tmp_path / "killed"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    argv = _train_argv(
        workdir,
        f"train.steps={steps}",
        "checkpoint.save_every=1",
        "checkpoint.async_save=True",
        "checkpoint.keep=2",
    )
    # One kill mid-run, then a run to the end. The kill lands after step 3 has logged, with steps 3
    # and 4 being saved. It was two kills (after steps 2 and 4), 93 s in the full suite: each
    # launch costs ~30 s of startup and compiling (93 s / 3), and a second kill only repeats the first one's
    # path (restore the newest complete checkpoint, drop a half-written one) with another timing.
    proc = subprocess.Popen(
        argv,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = []
    for line in proc.stdout:
        seen.append(line)
        # The first progress line at or past step 3.
        done = re.search(rf"step +(\d+)/{steps} ", line)
        if done and int(done.group(1)) >= 3:
            break
    proc.kill()
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(x) for x in (workdir / "tensorboard" / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    assert [s for s, _ in losses] == list(range(1, steps + 1))  # each step once, in order
    assert dict(losses) == full  # bitwise
