"""Hyperparameter sweeps: an experiment's ``get_sweep()`` fans its config out over override dicts.

An experiment file may define, next to ``get_config``::

    from fastblt.launch.sweep import product, sweep

    def get_sweep():
        return product(sweep("optimizer.lr", [1e-3, 3e-3]), sweep("seed", [0, 1]))

``get_sweep()`` (or ``get_sweep(arg)``, with the spec's ``:arg``) returns a list of dicts of dotted
config keys to values. ``fastblt sweep`` gives each dict a stable run name built from it
(``lr=0.001,seed=0``), validates every run's config, and trains each run in ``ROOT/<name>``:
locally (``fastblt train`` subprocesses, one after another or ``--parallel N`` at a time), on a
TPU slice (one run after another through ``fastblt launch tpu``) or on SLURM (one job per run).
A run whose last checkpoint exists is skipped; an unfinished one resumes from its latest. The
table at the end lists each run's overrides, status and last metrics (from its
``tensorboard/metrics.jsonl``), and is also written to ``ROOT/sweep.json``.
"""

from __future__ import annotations

import builtins
import dataclasses
import inspect
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from fastblt.config import ConfigError
from fastblt.launch.common import PREEMPTED_EXIT

__all__ = [
    "Run",
    "expand",
    "load_sweep",
    "product",
    "read_metrics",
    "run_local",
    "run_name",
    "sweep",
    "table",
    "zip",
]

Overrides = dict[str, Any]

# Metrics shown in the table (those present); all are in sweep.json.
TABLE_METRICS = ("loss", "bits_per_byte", "eval_bits_per_byte")


# ---------------------------------------------------------------------------------------------------------
# Building sweeps.
# ---------------------------------------------------------------------------------------------------------


def sweep(key: str, values: Sequence[Any]) -> list[Overrides]:
    """One axis: ``[{key: v} for v in values]``."""
    if not isinstance(key, str) or not key:
        raise ConfigError(f"sweep key must be a dotted config key such as 'optimizer.lr', got {key!r}")
    if isinstance(values, str | bytes) or not isinstance(values, Sequence) or not values:
        raise ConfigError(f"sweep({key!r}, ...) needs a non-empty list of values, got {values!r}")
    return [{key: v} for v in values]


def _merge(parts: Sequence[Mapping[str, Any]]) -> Overrides:
    out: Overrides = {}
    for part in parts:
        for k, v in part.items():
            if k in out:
                raise ConfigError(f"sweep: key {k!r} is set twice in one run ({out[k]!r} and {v!r})")
            out[k] = v
    return out


def _axes(axes: Sequence[Sequence[Mapping[str, Any]]], helper: str) -> list[list[Mapping[str, Any]]]:
    out = []
    for axis in axes:
        if isinstance(axis, Mapping) or not all(isinstance(d, Mapping) for d in axis):
            raise ConfigError(
                f"{helper}() takes lists of override dicts, e.g. {helper}(sweep('seed', [0, 1]), ...); "
                f"got {axis!r}"
            )
        out.append(list(axis))
    return out


def product(*axes: Sequence[Mapping[str, Any]]) -> list[Overrides]:
    """Every combination of one dict from each axis, merged (the first axis varies slowest)."""
    return [_merge(combo) for combo in itertools.product(*_axes(axes, "product"))]


def zip(*axes: Sequence[Mapping[str, Any]]) -> list[Overrides]:  # noqa: A001 - the sweep vocabulary
    """The i-th dicts of every axis merged; the axes must have the same length."""
    lists = _axes(axes, "zip")
    lengths = {len(a) for a in lists}
    if len(lengths) > 1:
        raise ConfigError(f"zip() needs axes of one length, got lengths {[len(a) for a in lists]}")
    return [_merge(parts) for parts in builtins.zip(*lists, strict=True)]


# ---------------------------------------------------------------------------------------------------------
# Expanding a sweep into runs.
# ---------------------------------------------------------------------------------------------------------


def _format(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)  # shortest round-tripping form: 0.001, 3e-05
    if isinstance(value, list | tuple):
        return "x".join(_format(v) for v in value)
    return str(value)


def run_name(overrides: Mapping[str, Any], keys: Sequence[str] | None = None) -> str:
    """A stable directory name for one run: ``lr=0.001,seed=0``.

    Keys are shortened to their last part unless two swept keys share it (then the full dotted key
    is kept); characters outside ``[A-Za-z0-9._=,+-]`` become ``_``. Names longer than 120
    characters keep a prefix and a hash of the whole, so they stay unique and stable.
    """
    keys = list(keys if keys is not None else overrides)
    last = [k.rsplit(".", 1)[-1] for k in keys]
    short = {k: (s if last.count(s) == 1 else k) for k, s in builtins.zip(keys, last, strict=True)}
    parts = [f"{short.get(k, k)}={_format(v)}" for k, v in overrides.items()]
    name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(parts)) or "base"
    if len(name) > 120:
        import hashlib

        digest = hashlib.sha1(json.dumps(overrides, sort_keys=True, default=str).encode()).hexdigest()[:10]
        name = f"{name[:100]}-{digest}"
    return name


@dataclasses.dataclass
class Run:
    """One run of a sweep."""

    name: str
    overrides: Overrides
    workdir: str
    status: str = "pending"  # pending, skipped, done, failed, submitted, dry-run
    detail: str = ""
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)

    def override_args(self) -> list[str]:
        """``key=value`` strings for ``--set`` (values as Python literals, read back exactly)."""
        return [f"{k}={v!r}" for k, v in self.overrides.items()]


def load_sweep(spec: str) -> list[Overrides]:
    """The list of override dicts of an experiment's ``get_sweep`` (``spec`` as for load_config)."""
    from fastblt.config import import_experiment, resolve_experiment

    name, sep, arg = spec.partition(":")
    path = resolve_experiment(name)
    module = import_experiment(path)
    get_sweep = getattr(module, "get_sweep", None)
    if not callable(get_sweep):
        raise ConfigError(
            f"{path} defines no get_sweep(); a sweep experiment returns a list of override dicts, e.g. "
            f"product(sweep('optimizer.lr', [1e-3, 3e-3]), sweep('seed', [0, 1])) from fastblt.launch.sweep"
        )
    takes_arg = bool(inspect.signature(get_sweep).parameters)
    result = get_sweep(arg if sep else None) if takes_arg else get_sweep()
    if not isinstance(result, list) or not result or not all(isinstance(d, Mapping) for d in result):
        raise ConfigError(f"{path}: get_sweep() must return a non-empty list of dicts, got {result!r}")
    return [dict(d) for d in result]


def expand(spec: str, root: str, base_overrides: Sequence[str] = ()) -> list[Run]:
    """The runs of ``spec``'s sweep under ``root``, each config loaded and validated here."""
    from fastblt.config import load_config

    grid = load_sweep(spec)
    keys = list(dict.fromkeys(k for d in grid for k in d))
    runs = [Run(run_name(d, keys), d, os.path.join(root, run_name(d, keys))) for d in grid]
    seen: dict[str, Run] = {}
    for run in runs:
        if run.name in seen:
            raise ConfigError(
                f"two runs of the sweep are both named {run.name!r}: {seen[run.name].overrides} "
                f"and {run.overrides}; make the override dicts differ"
            )
        seen[run.name] = run
        try:
            load_config(spec, [*base_overrides, *run.override_args()])
        except ConfigError as e:
            raise ConfigError(f"sweep run {run.name}: {e}") from None
    return runs


# ---------------------------------------------------------------------------------------------------------
# Results.
# ---------------------------------------------------------------------------------------------------------


def read_metrics(path: str | os.PathLike) -> dict[str, float]:
    """The last value of every scalar in a ``metrics.jsonl`` (``step``: the last step written)."""
    out: dict[str, float] = {}
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if isinstance(record, dict):
            out.update({k: v for k, v in record.items() if isinstance(v, int | float)})
    return out


def run_metrics(cfg: Any, workdir: str) -> dict[str, float]:
    """Final metrics of a run: its last stage's ``tensorboard/metrics.jsonl``."""
    from fastblt.launch.status import final_dir

    return read_metrics(os.path.join(final_dir(cfg, workdir), "tensorboard", "metrics.jsonl"))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) and abs(value) >= 1e-3 else f"{value:.3g}"
    return str(value)


def table(runs: Sequence[Run]) -> str:
    """A plain-text table: run, each swept key, status, step and the last metrics."""
    keys = list(dict.fromkeys(k for r in runs for k in r.overrides))
    metric_cols = [m for m in TABLE_METRICS if any(m in r.metrics for r in runs)]
    header = ["run", *keys, "status", "step", *metric_cols]
    rows = [
        [
            r.name,
            *(_format(r.overrides[k]) if k in r.overrides else "" for k in keys),
            r.status,
            _cell(int(r.metrics["step"])) if "step" in r.metrics else "-",
            *(_cell(r.metrics[m]) if m in r.metrics else "-" for m in metric_cols),
        ]
        for r in runs
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    fmt = lambda row: "  ".join(str(c).ljust(w) for c, w in builtins.zip(row, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def write_summary(root: str, runs: Sequence[Run]) -> str:
    """``ROOT/sweep.json``: every run's name, overrides, workdir, status and metrics."""
    path = os.path.join(root, "sweep.json")
    os.makedirs(root, exist_ok=True)
    with open(path, "w") as f:
        json.dump([dataclasses.asdict(r) for r in runs], f, indent=1, default=str)
    return path


# ---------------------------------------------------------------------------------------------------------
# Running locally.
# ---------------------------------------------------------------------------------------------------------


def train_command(spec: str, run: Run, base_overrides: Sequence[str]) -> list[str]:
    """``python -m fastblt.cli train ...`` for one run, with this interpreter."""
    argv = [sys.executable, "-m", "fastblt.cli", "train", "--config", spec, "--workdir", run.workdir]
    for o in [*base_overrides, *run.override_args()]:
        argv += ["--set", o]
    return argv


def _subprocess_env() -> dict[str, str]:
    # The child imports this fastblt (and the experiments/ next to it) even when it is not installed.
    package_root = str(Path(__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, path])))


def _tail(path: str, n: int = 15) -> str:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in lines[-n:])


def run_local(
    spec: str,
    runs: Sequence[Run],
    base_overrides: Sequence[str] = (),
    parallel: int = 1,
    dry_run: bool = False,
    out: TextIO | None = None,
    poll_seconds: float = 0.5,
    is_finished: Callable[[Run], bool] | None = None,
) -> None:
    """Trains every unfinished run as a ``fastblt train`` subprocess, ``parallel`` at a time.

    Each run logs to ``WORKDIR/train.log`` (appended); statuses and metrics are filled into ``runs``.
    """
    import shlex

    from fastblt.config import load_config
    from fastblt.launch.status import is_finished as finished

    out = out or sys.stdout
    if parallel < 1:
        raise ConfigError(f"--parallel must be >= 1, got {parallel}")
    cfgs = {r.name: load_config(spec, [*base_overrides, *r.override_args()]) for r in runs}
    check = is_finished or (lambda r: finished(cfgs[r.name], r.workdir))
    todo: list[Run] = []
    for run in runs:
        if check(run):
            run.status, run.detail = "skipped", "finished before"
            print(f"[sweep] {run.name}: finished before, skipping", file=out, flush=True)
        else:
            todo.append(run)
    env = _subprocess_env()
    running: list[tuple[Run, subprocess.Popen, Any]] = []
    queue = list(todo)
    while queue or running:
        while queue and len(running) < parallel:
            run = queue.pop(0)
            cmd = train_command(spec, run, base_overrides)
            if dry_run:
                print(f"$ {shlex.join(cmd)} >> {shlex.quote(run.workdir)}/train.log 2>&1", file=out)
                run.status = "dry-run"
                continue
            os.makedirs(run.workdir, exist_ok=True)
            log = open(os.path.join(run.workdir, "train.log"), "ab")  # closed when the run ends
            print(f"[sweep] {run.name}: training in {run.workdir}", file=out, flush=True)
            running.append((run, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
        for item in list(running):
            run, proc, log = item
            rc = proc.poll()
            if rc is None:
                continue
            log.close()
            running.remove(item)
            logfile = os.path.join(run.workdir, "train.log")
            if rc == 0 and check(run):
                run.status = "done"
                print(f"[sweep] {run.name}: done", file=out, flush=True)
            elif rc in (0, PREEMPTED_EXIT):
                run.status, run.detail = "stopped", f"exited {rc} before the last step (preempted)"
                print(
                    f"[sweep] {run.name}: stopped before the last step; re-run the sweep to resume",
                    file=out,
                    flush=True,
                )
            else:
                run.status, run.detail = "failed", f"exit status {rc}; log {logfile}"
                print(
                    f"[sweep] {run.name}: FAILED with exit status {rc}; last lines of {logfile}:\n"
                    f"{_tail(logfile)}",
                    file=out,
                    flush=True,
                )
        if running:
            time.sleep(poll_seconds)
    for run in runs:
        run.metrics = run_metrics(cfgs[run.name], run.workdir)
