"""One trainer per workdir: a live holder is refused with its pid and host; a dead one's lock is
taken over with a warning. The holder is a real second process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastblt.io.workdir_lock import LOCK_NAME, WorkdirLockedError, workdir_lock

REPO = Path(__file__).resolve().parent.parent
HOLD = "import sys, time; from fastblt.io.workdir_lock import workdir_lock\nwith workdir_lock(sys.argv[1], print):\n    print('held', flush=True); time.sleep(60)\n"


def _holder(workdir: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(workdir)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_trainer_is_refused_then_a_dead_holder_is_taken_over(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(WorkdirLockedError) as info:
            with workdir_lock(str(tmp_path), print):
                pass
        assert f"pid {proc.pid}" in str(info.value) and socket.gethostname() in str(info.value)
    finally:
        proc.kill()  # dies holding the lock: the kernel releases it, the holder record stays
        proc.wait()
    logs: list[str] = []
    with workdir_lock(str(tmp_path), logs.append):
        assert (tmp_path / LOCK_NAME).read_text().count(str(os.getpid())) == 1
    assert len(logs) == 1 and f"pid {proc.pid}" in logs[0] and "taking over" in logs[0]
    assert (tmp_path / LOCK_NAME).read_text() == ""  # released cleanly: no holder left


def test_object_store_workdirs_are_not_locked():
    logs: list[str] = []
    t0 = time.time()
    with workdir_lock("gs://bucket/run", logs.append):
        pass
    assert "no trainer lock" in logs[0] and time.time() - t0 < 1
