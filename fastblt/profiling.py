"""Where a jitted step spends its time: a ``jax.profiler`` trace reduced to a table per component.

A trace names each device kernel by its HLO instruction (``args.hlo_op``); the compiled module's
text gives every instruction its ``op_name``, the JAX name stack (``jit(_train_step)/transpose(jvp(
BLT))/local_decoder/layers_0/...``), which carries the Flax module path and our named scopes
(``patcher``, ``loss``, ``optimizer``). Rules map op names to components; the first match wins.

    table = profile_components(step_fn, args, rules=TRAIN_RULES, steps=3)
    print(format_table(table))

On GPU, XLA replays most kernels through CUDA graphs (command buffers), whose kernels carry no
``hlo_op``: :func:`profile_components` is meant to run with
``--xla_gpu_enable_command_buffer=`` in ``XLA_FLAGS`` (experiments/benchmarks/train_speed.py sets
it for the profiled row only), so its times are those of plain launches.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax

# (component, substring of the op name). Order matters: the first substring found wins.
TRAIN_RULES: tuple[tuple[str, str], ...] = (
    ("optimizer", "/optimizer"),
    ("entropy model", "EntropyModel"),
    ("entropy model", "entropy_model"),
    ("patcher", "/patcher"),
    ("loss", "/loss"),
    ("hash embeddings", "/hash_embed"),
    ("encoder cross-attention", "local_encoder/cross_attn"),
    ("encoder pooling", "local_encoder/pool"),
    ("encoder", "local_encoder"),
    ("global model", "global_transformer"),
    ("decoder block rows (BLT-D)", "/blt_d_blocks"),
    ("decoder cross-attention", "local_decoder/cross_attn"),
    ("decoder", "local_decoder"),
)

# A generation (fastblt/sampler): the sampler's named stages (fastblt.sampler.cached.SCOPES).
DECODE_RULES: tuple[tuple[str, str], ...] = (
    ("entropy model", "sampler_entropy"),
    ("patcher", "sampler_patcher"),
    ("encoder pooling + cross-attention", "sampler_pool_cross"),
    ("global model", "sampler_global"),
    ("encoder", "sampler_encoder"),
    ("decoder", "sampler_decoder"),
)

# (kind, substring of an instruction's HLO line): what sort of kernel it is, first match wins.
KIND_RULES: tuple[tuple[str, str], ...] = (
    ("attention", "__cudnn$fmha"),
    ("matmul", "__cublas"),
    ("matmul", "triton_gemm"),
    ("matmul", "__triton_gemm"),
    ("matmul", " dot("),
    ("matmul", " convolution("),
    ("scatter", " scatter("),
    ("collective", "all-reduce"),
    ("collective", "all-gather"),
    ("collective", "reduce-scatter"),
    ("copy", " copy("),
)

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


def _instructions(hlo_text: str) -> Iterator[tuple[str | None, str, str]]:
    """(computation, instruction name, line) for every instruction of a module's text."""
    computation = None
    for line in hlo_text.splitlines():
        head = _COMPUTATION.match(line)
        if head and "=" not in line.split("{")[0]:
            computation = head.group(1)
            continue
        m = _INSTR.match(line)
        if m:
            yield computation, m.group(1), line


def _through_calls(own: dict[str, str], calls: dict[str, str], inner: dict[str, str]) -> dict[str, str]:
    """``own`` completed for instructions without a value of their own (a fusion, usually) by the
    value of the computation they call (``inner``: computation -> value)."""
    for name, comp in calls.items():
        if name not in own and comp in inner:
            own[name] = inner[comp]
    return own


def op_names(hlo_text: str) -> dict[str, str]:
    """Instruction name -> op name, from a compiled module's text (``compiled.as_text()``).

    An instruction without metadata (a fusion, usually) takes the op name of its called
    computation's root.
    """
    names: dict[str, str] = {}
    calls: dict[str, str] = {}
    roots: dict[str, str] = {}
    for computation, name, line in _instructions(hlo_text):
        op = _OP_NAME.search(line)
        if op:
            names[name] = op.group(1)
            if line.lstrip().startswith("ROOT") and computation is not None:
                roots[computation] = op.group(1)
        c = _CALLS.search(line)
        if c:
            calls[name] = c.group(1)
    return _through_calls(names, calls, roots)


def op_kinds(hlo_text: str) -> dict[str, str]:
    """Instruction name -> kernel kind (:data:`KIND_RULES`: matmul, attention, scatter, ...).

    A fusion is classified by its own line (a Triton GEMM fusion names its backend there) and
    otherwise by the first kind found among its called computation's lines.
    """
    kinds: dict[str, str] = {}
    calls: dict[str, str] = {}
    inner: dict[str, str] = {}
    for computation, name, line in _instructions(hlo_text):
        kind = classify(line, KIND_RULES)
        if kind != "other":
            kinds[name] = kind
            if computation is not None and computation not in inner:
                inner[computation] = kind
        c = _CALLS.search(line)
        if c:
            calls[name] = c.group(1)
    return _through_calls(kinds, calls, inner)


def classify(op_name: str, rules: Sequence[tuple[str, str]]) -> str:
    for component, needle in rules:
        if needle in op_name:
            return component
    return "other"


def kernel_times(trace_dir: str) -> dict[str, float]:
    """Total device time (microseconds) per ``hlo_op`` over every trace file under ``trace_dir``.

    Only events that name an HLO op and run on a device are counted (on CPU, the thunk events of
    the executing thread).
    """
    return kernel_stats(trace_dir)[0]


def kernel_stats(trace_dir: str) -> tuple[dict[str, float], dict[str, int]]:
    """(device microseconds, launches) per ``hlo_op`` over the trace files under ``trace_dir``."""
    totals: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.defaultdict(int)
    files = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not files:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
    for path in files:
        with gzip.open(path) as f:
            data = json.load(f)
        events = data["traceEvents"] if isinstance(data, dict) else data
        for e in events:
            args = e.get("args") or {}
            op = args.get("hlo_op")
            if e.get("ph") == "X" and op and "dur" in e:
                totals[op] += float(e["dur"])
                counts[op] += 1
    return dict(totals), dict(counts)


def profile_components(
    fn: Callable[..., Any],
    args: Sequence[Any],
    rules: Sequence[tuple[str, str]] = TRAIN_RULES,
    steps: int = 3,
    trace_dir: str | None = None,
    carry: Callable[[Any, Sequence[Any]], Sequence[Any]] | None = None,
    top: int = 25,
) -> dict[str, Any]:
    """Traces ``steps`` calls of the jitted ``fn(*args)`` and sums device time per component.

    Args:
      fn: a ``jax.jit``-ed function (compiled here) or a ``Compiled`` one.
      args: its arguments; ``carry(out, args) -> args`` gives the next call's (a train step feeds
        its new state back; donated buffers cannot be reused).
      rules: (component, op-name substring) pairs, see :data:`TRAIN_RULES`.

    Returns: ``{"ms_per_step": {component: ms}, "fwd_bwd": {component: (fwd_ms, bwd_ms)},
    "top_ops": [(ms, hlo_op, op_name)], "distinct_ops": n, "launches_per_step": {component: n},
    "kinds": {component: {kind: ms}} (kind from :data:`KIND_RULES`, else "other"),
    "total_ms": device kernel ms per call, "wall_ms": wall-clock ms per call}``.
    """
    compiled = fn.lower(*args).compile() if hasattr(fn, "lower") else fn
    text = compiled.as_text()
    names = op_names(text)
    kind_of = op_kinds(text)
    fn = compiled
    out = fn(*args)  # warm: the trace holds steady-state steps only
    jax.block_until_ready(out)
    if carry is not None:
        args = carry(out, args)
    own = trace_dir is None
    trace_dir = trace_dir or tempfile.mkdtemp(prefix="fastblt-trace-")
    wall = 0.0
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(steps):
            start = time.perf_counter()
            out = fn(*args)
            jax.block_until_ready(out)
            wall += time.perf_counter() - start
            if carry is not None:
                args = carry(out, args)
    times, counts = kernel_stats(trace_dir)
    launches: dict[str, float] = collections.defaultdict(float)
    per: dict[str, float] = collections.defaultdict(float)
    split: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    kinds: dict[str, dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
    ops = []
    kernels = 0
    for op, us in times.items():
        name = names.get(op, names.get(op.replace("_", "."), ""))
        component = classify(name, rules)
        ms = us / 1e3 / steps
        per[component] += ms
        launches[component] += counts[op] / steps
        split[component][1 if "transpose(" in name else 0] += ms
        kinds[component][kind_of.get(op, kind_of.get(op.replace("_", "."), "other"))] += ms
        ops.append((ms, op, name, counts[op] / steps))
        kernels += 1
    ops.sort(reverse=True)
    if own:
        import shutil

        shutil.rmtree(trace_dir, ignore_errors=True)
    return {
        "ms_per_step": dict(sorted(per.items(), key=lambda kv: -kv[1])),
        "fwd_bwd": {k: tuple(v) for k, v in split.items()},
        "kinds": {k: dict(v) for k, v in kinds.items()},
        "top_ops": [o[:3] for o in ops[:top]],
        "op_launches": {o[1]: o[3] for o in ops[:top]},
        "distinct_ops": kernels,
        "launches_per_step": dict(launches),
        "total_ms": sum(per.values()),
        "wall_ms": 1e3 * wall / steps,
    }


def format_table(profile: dict[str, Any], title: str = "") -> str:
    """Markdown table of a :func:`profile_components` result (ms per step, share, fwd / bwd, and
    the ms of each kernel kind: matmul, attention, scatter, other)."""
    total = profile["total_ms"] or 1.0
    kinds = profile.get("kinds", {})
    cols = sorted({k for v in kinds.values() for k in v}, key=lambda k: (k == "other", k))
    lines = [f"### {title}" if title else "", ""]
    lines.append("| component | ms/step | share | fwd ms | bwd ms |" + "".join(f" {c} ms |" for c in cols))
    lines.append("|---|---:|---:|---:|---:|" + "---:|" * len(cols))
    for comp, ms in profile["ms_per_step"].items():
        fwd, bwd = profile["fwd_bwd"].get(comp, (0.0, 0.0))
        by_kind = "".join(f" {kinds.get(comp, {}).get(c, 0.0):.2f} |" for c in cols)
        lines.append(f"| {comp} | {ms:.2f} | {100 * ms / total:.1f}% | {fwd:.2f} | {bwd:.2f} |" + by_kind)
    sums = "".join(f" {sum(v.get(c, 0.0) for v in kinds.values()):.2f} |" for c in cols)
    lines.append(f"| **total (device kernels)** | **{profile['total_ms']:.2f}** | | | |" + sums)
    return "\n".join(lines)
