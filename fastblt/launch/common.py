"""What every launcher shares: the ``fastblt train`` command line, the worker wrapper, a runner that
prints (``--dry-run``) or runs commands, and the source tree that workers install.

Every process of a multi-host job runs the same command line, wrapped by ``launch/worker.sh``::

    bash launch/worker.sh LOGDIR -- fastblt train --config C --workdir W [--set k=v ...]

The wrapper finds its worker id (``FASTBLT_WORKER_ID``, ``SLURM_PROCID``, ``TPU_WORKER_ID``, the
TPU VM metadata server or the ``-w-N`` suffix of a TPU VM hostname), logs to
``LOGDIR/worker-<id>.log``, streams only worker 0's log to its stdout, writes its exit code to
``LOGDIR/worker-<id>.rc`` and always ends with one line::

    FASTBLT_WORKER_EXIT worker=<id> host=<hostname> rc=<code>

so that a launcher reading the combined output of all workers (``gcloud ... ssh --worker=all``,
``srun``) can name every worker that failed, and every worker that never reported (lost).
"""

from __future__ import annotations

import collections
import dataclasses
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TextIO

__all__ = [
    "EXIT_MARKER",
    "LaunchError",
    "Runner",
    "TrainJob",
    "missing_workers",
    "parse_worker_exits",
    "pip_args",
    "repo_root",
    "shell_path",
    "source_tarball_command",
    "worker_command",
    "worker_report",
]

EXIT_MARKER = "FASTBLT_WORKER_EXIT"
_EXIT_RE = re.compile(rf"{EXIT_MARKER} worker=(\S+) host=(\S*) rc=(-?\d+)")


class LaunchError(Exception):
    """A launcher could not do what it was asked; the message says what failed and what to do."""


def repo_root() -> Path:
    """The source checkout this fastblt runs from (launchers ship it to the workers)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file() or not (root / "launch" / "worker.sh").is_file():
        raise LaunchError(
            f"{root} is not a fastblt source checkout (no pyproject.toml or launch/worker.sh): the "
            f"launchers ship the checkout to the workers, so run them from a clone (pip install -e .)"
        )
    return root


@dataclasses.dataclass(frozen=True)
class TrainJob:
    """One ``fastblt train`` run: an experiment spec, its overrides and its workdir."""

    config: str
    workdir: str
    overrides: tuple[str, ...] = ()

    def validate(self) -> None:
        """Loads the config with its overrides here, so that a typo fails before any machine starts."""
        from fastblt.config import load_config

        load_config(self.config, list(self.overrides))

    def remote_config(self, root: Path) -> str:
        """The ``--config`` spec as seen from the root of the shipped checkout.

        Bare names (``blt_1b``) resolve on the worker as here; a path must lie inside the checkout
        (it is rewritten relative to it), since only the checkout travels.
        """
        name, sep, arg = self.config.partition(":")
        if not name.endswith(".py"):
            return self.config
        path = Path(name).expanduser().resolve()
        try:
            rel = path.relative_to(root)
        except ValueError:
            raise LaunchError(
                f"--config {name} lies outside the checkout {root}, which is all that is shipped to the "
                f"workers: copy it into {root / 'experiments'} and pass its name"
            ) from None
        return rel.as_posix() + sep + arg

    def train_argv(self, root: Path | None = None, fastblt: str = "fastblt") -> list[str]:
        """``fastblt train --config C --workdir W --set k=v ...`` as an argument list."""
        config = self.remote_config(root) if root is not None else self.config
        argv = [fastblt, "train", "--config", config, "--workdir", self.workdir]
        for o in self.overrides:
            argv += ["--set", o]
        return argv


def shell_path(path: str) -> str:
    """``path`` quoted for a remote shell, keeping a leading ``~/`` expandable."""
    if path.startswith("~/"):
        return "~/" + shlex.quote(path[2:])
    return shlex.quote(path)


def worker_command(logdir: str, argv: Sequence[str], env: dict[str, str] | None = None) -> str:
    """The shell command a worker runs: ``launch/worker.sh`` around ``argv`` (from the checkout root).

    ``argv[0]`` may start with ``~/`` (a program in the worker's home); it stays expandable.
    """
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
    program = shell_path(argv[0]) if argv else ""
    cmd = f"bash launch/worker.sh {shell_path(logdir)} -- {' '.join([program, *map(shlex.quote, argv[1:])])}"
    return f"{prefix} {cmd}" if prefix else cmd


def pip_args(packages: Sequence[str]) -> str:
    """Package specs for a remote ``pip install``, double-quoted (``"jax[tpu]"``: no glob)."""
    return " ".join(f'"{p}"' for p in packages)


def parse_worker_exits(lines: Iterable[str]) -> dict[str, tuple[str, int]]:
    """``{worker id: (host, exit code)}`` from the wrapper's ``FASTBLT_WORKER_EXIT`` lines."""
    out: dict[str, tuple[str, int]] = {}
    for line in lines:
        m = _EXIT_RE.search(line)
        if m:
            out[m.group(1)] = (m.group(2), int(m.group(3)))
    return out


def missing_workers(exits: dict[str, tuple[str, int]], n_workers: int) -> list[int]:
    """Worker ids in ``range(n_workers)`` that printed no exit line (lost, killed or preempted)."""
    return [i for i in range(n_workers) if str(i) not in exits]


# `fastblt train`'s status after a preemption save (fastblt.io.checkpoint.PREEMPTED_EXIT, kept here
# as a literal so that launchers do not import JAX): stopped cleanly, unfinished, not a failure.
PREEMPTED_EXIT = 75
STOPPED_CLEANLY = (0, PREEMPTED_EXIT)


def worker_report(exits: dict[str, tuple[str, int]], n_workers: int) -> list[str]:
    """One line per worker that failed or never reported; empty when all exited 0 or were
    preempted after saving (status 75)."""
    lines = [
        f"worker {w} ({host or 'unknown host'}) exited with status {rc}"
        for w, (host, rc) in sorted(exits.items(), key=lambda kv: (not kv[0].isdigit(), kv[0].zfill(8)))
        if rc not in STOPPED_CLEANLY
    ]
    lines += [
        f"worker {w} reported no exit status (its VM was preempted or lost, or the connection dropped)"
        for w in missing_workers(exits, n_workers)
    ]
    return lines


class Runner:
    """Runs commands, or only prints them (``dry_run``): the one place launchers touch the outside.

    Every command is echoed as ``$ <command>`` (shell-quoted, exactly as it runs) before it runs;
    in dry-run mode nothing runs and queries return ``dry_answer``.
    """

    def __init__(self, dry_run: bool, out: TextIO | None = None, dry_answer: str = ""):
        self.dry_run = dry_run
        self.out = out or sys.stdout
        self.dry_answer = dry_answer

    def echo(self, cmd: Sequence[str] | str) -> None:
        text = cmd if isinstance(cmd, str) else shlex.join(cmd)
        print(f"$ {text}", file=self.out, flush=True)

    def note(self, text: str) -> None:
        print(f"# {text}", file=self.out, flush=True)

    def check(self, cmd: Sequence[str], what: str) -> None:
        """Runs ``cmd``; a non-zero exit raises LaunchError naming ``what`` and the status."""
        self.echo(cmd)
        if self.dry_run:
            return
        rc = subprocess.call(list(cmd))
        if rc != 0:
            raise LaunchError(f"{what} failed with exit status {rc}: {shlex.join(cmd)}")

    def query(self, cmd: Sequence[str]) -> tuple[int, str]:
        """Runs ``cmd`` and returns ``(exit status, stdout stripped)``; stderr passes through."""
        self.echo(cmd)
        if self.dry_run:
            return 0, self.dry_answer
        proc = subprocess.run(list(cmd), stdout=subprocess.PIPE, text=True)
        return proc.returncode, proc.stdout.strip()

    def stream(self, cmd: Sequence[str], keep: int = 200) -> tuple[int, list[str]]:
        """Runs ``cmd``, copying its output (stdout and stderr) here line by line.

        Returns the exit status and the lines worth keeping: every worker exit line plus the last
        ``keep`` lines (a long training log is not held in memory).
        """
        self.echo(cmd)
        if self.dry_run:
            return 0, []
        markers: list[str] = []
        tail: collections.deque[str] = collections.deque(maxlen=keep)
        with subprocess.Popen(
            list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        ) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                self.out.write(line)
                self.out.flush()
                line = line.rstrip("\n")
                (markers if EXIT_MARKER in line else tail).append(line)
            rc = proc.wait()
        return rc, [*tail, *markers]

    def sleep(self, seconds: float) -> None:
        if not self.dry_run:
            time.sleep(seconds)


def source_tarball_command(root: Path, dst: str) -> list[str]:
    """``tar`` of the checkout (without VCS data, virtualenvs and caches) for shipping to workers."""
    excludes = [".git", ".venv", "venv", ".jax_cache", "__pycache__", "*.egg-info", ".pytest_cache"]
    return ["tar", "-czf", dst, *(f"--exclude={e}" for e in excludes), "-C", str(root), "."]
