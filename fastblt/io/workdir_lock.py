"""One trainer per workdir: an advisory lock file that a second ``fastblt train`` refuses on.

``WORKDIR/.fastblt-train.lock`` is locked with ``fcntl.flock`` and holds the holder's host, pid and
start time. The kernel releases the lock when its process dies, however it dies, so a lock left by
a killed trainer is free: the next trainer takes it over and says whose it was.

Scope: local filesystems, and network filesystems whose flock is cluster-wide (NFSv4; Lustre
mounted with ``flock``; with ``localflock`` a lock holds within one node only). A filesystem without
locks, and object stores (``gs://``, ``s3://``), get no lock and a note that says so: the launchers
start one job per workdir. In a multi-process run only process 0 takes the lock (every process trains the same run).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator

from fastblt.errors import CheckpointError

LOCK_NAME = ".fastblt-train.lock"
# flock errors of filesystems without locks (NFSv3 without lockd, Lustre mounted noflock).
_NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)


class WorkdirLockedError(CheckpointError):
    """Another live process trains in this workdir."""


def _holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def workdir_lock(workdir: str, log: Callable[[str], None] = print, process_index: int = 0) -> Iterator[None]:
    """Holds the workdir's trainer lock for the duration of the block.

    Raises WorkdirLockedError naming the holder's host and pid when another live process holds it.
    """
    if "://" in workdir:
        log(f"note: no trainer lock on {workdir} (object stores have none): run one trainer per workdir")
        yield
        return
    if process_index != 0:
        yield
        return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            unlockable = None
        except BlockingIOError:
            h = _holder(fd)
            raise WorkdirLockedError(
                f"{workdir} is in use by another trainer (pid {h.get('pid', '?')} on host "
                f"{h.get('host', '?')}, since {h.get('started', '?')}): stop it first, or train in another "
                "--workdir"
            ) from None
        except OSError as e:
            if e.errno not in _NO_LOCKS:
                raise
            unlockable = e.strerror
        if unlockable is not None:
            log(f"note: {workdir}'s filesystem offers no locks ({unlockable}): run one trainer per workdir")
            yield
            return
        previous = _holder(fd)
        if previous.get("pid") and previous.get("pid") != os.getpid():
            log(
                f"warning: taking over {path} from pid {previous['pid']} on host {previous.get('host', '?')} "
                f"(started {previous.get('started', '?')}), which no longer holds it"
            )
        me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(me).encode())
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # a clean exit leaves no holder behind
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
