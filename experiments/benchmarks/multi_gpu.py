"""Training on two GPUs of one host: the same losses as one GPU, and how fast.

    bash experiments/benchmarks/multi_gpu.sh $OUT                         # 2 GPUs, blt_mid
    python experiments/benchmarks/multi_gpu.py --cpu --shape tiny --steps 4 --out /tmp/mg   # 2 CPU devices

Layouts, each in its own process(es), all fed the same global batches (each of two data shards,
concatenated where one process feeds both):

* ``one``: one device, mesh data=1 (the reference losses);
* ``data2``: one process, both devices, mesh data=2;  ``fsdp2``: the same, mesh fsdp=2;
* ``proc2``: two processes with one device each, started as ``fastblt launch slurm`` starts them
  (``FASTBLT_COORDINATOR`` / ``FASTBLT_NUM_PROCESSES`` / ``FASTBLT_PROCESS_ID``, a localhost
  coordinator; NCCL between the GPUs), mesh data=2, each process reading its own data shard. It
  saves a checkpoint after the last timed step, then runs one more step;
* ``restore1``: one device restores that checkpoint (written by two processes, resharded onto one)
  and runs the same next step: its loss must equal proc2's.

Per layout: the losses of every step, the median step time after ``--warmup`` steps, bytes/s and
the scaling efficiency against ``one`` (bytes/s over 2x one's). Results: JSON lines and a markdown
table under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time

LAYOUTS = ("one", "data2", "fsdp2", "proc2", "restore1")
MESHES = {
    "one": {"data": 1},
    "data2": {"data": 2},
    "fsdp2": {"fsdp": 2},
    "proc2": {"data": 2},
    "restore1": {"data": 1},
}


def _config(args):
    sys.path.insert(0, os.path.dirname(__file__))
    from train_speed import experiment  # the train_speed benchmark's "blt" row: static 4-byte patches

    cfg = experiment(args.shape, "blt", args.batch_size_global, args.seq_len)
    cfg.train.steps = args.steps + 1
    return cfg


def _global_batches(cfg, count: int, shards: list[int]):
    """``count`` batches of the given data shards (of 2: each half the global batch), concatenated
    row-wise per step: the global batch where one process feeds both shards."""
    import numpy as np

    from fastblt.data import make_train_iterator

    its = [make_train_iterator(cfg.data, i, 2) for i in shards]
    out = []
    for _ in range(count):
        parts = [next(it) for it in its]
        out.append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
    return out


def run_layout(args) -> dict:
    """One layout in this process (one of proc2's two processes included)."""
    from fastblt import distributed

    distributed.initialize()  # proc2: joins from the FASTBLT_* variables; else nothing happens
    import jax

    from fastblt import sharding
    from fastblt.io.checkpoint import Checkpointer
    from fastblt.train.loop import Trainer

    layout, steps = args.layout, args.steps
    cfg = _config(args)
    devices = jax.devices()[: 1 if layout in ("one", "restore1") else 2]
    mesh = sharding.make_mesh(MESHES[layout], devices)
    trainer = Trainer(cfg, mesh)
    shards = [jax.process_index()] if layout == "proc2" else [0, 1]
    batches = _global_batches(cfg, steps + 1, shards)
    ckpt_dir = os.path.join(args.out, "proc2_checkpoint")
    losses, times = [], []
    if layout == "restore1":
        with Checkpointer(ckpt_dir, save_every=1, keep=10, async_save=False) as ck:
            state, _ = ck.restore(steps, trainer.checkpoint_template())
        state = state["train"]
        todo = [steps]
    else:
        state = trainer.init_state(0)
        todo = list(range(steps + 1))
    for i in todo:
        batch = sharding.global_batch(batches[i], trainer.batch_sharding)
        if layout == "proc2" and i == steps:
            with Checkpointer(ckpt_dir, save_every=1, keep=10, async_save=False) as ck:
                if not ck.save(steps, trainer.checkpoint_payload(state), force=True):
                    raise SystemExit(f"step {steps} is already saved in {ckpt_dir}: use a fresh --out")
        t = time.perf_counter()
        state, m = trainer.train_step(state, trainer.frozen, batch)
        loss = float(m["loss"])  # waits for the step
        times.append(time.perf_counter() - t)
        losses.append(loss)
    # restore1 runs one step, its compile included: no timing.
    step_s = statistics.median(times[args.warmup : steps]) if layout != "restore1" else None
    return {
        "layout": layout,
        "device": jax.devices()[0].device_kind,
        "processes": jax.process_count(),
        "devices": len(devices) if layout != "proc2" else jax.device_count(),
        "mesh": MESHES[layout],
        "batch": args.batch_size_global,
        "seq_len": int(cfg.data.seq_len),
        "losses": losses[:steps] if layout != "restore1" else [],
        "next_loss": losses[-1],
        "step_ms": None if step_s is None else 1e3 * step_s,
        "bytes_per_sec": None if step_s is None else args.batch_size_global * int(cfg.data.seq_len) / step_s,
    }


def _spawn(args, layout: str, env_extra: dict, name: str) -> subprocess.Popen:
    """A layout's process; its output goes to a log file (two processes of one job each write
    freely: a pipe read one after the other could fill and stall a collective)."""
    argv = [sys.executable, __file__, "--layout", layout, *_passthrough(args)]
    env = dict(os.environ, **env_extra)
    log = open(os.path.join(args.out, f"{name}.log"), "w")  # noqa: SIM115 (closed in _result)
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log_path = log.name
    proc.log_file = log
    return proc


def _passthrough(args) -> list[str]:
    out = ["--shape", args.shape, "--steps", str(args.steps), "--warmup", str(args.warmup), "--out", args.out]
    out += ["--batch", str(args.batch_size_global)] + (["--cpu"] if args.cpu else [])
    if args.seq_len:
        out += ["--seq-len", str(args.seq_len)]
    return out


def _device_env(args, devices: list[int]) -> dict:
    if args.cpu:
        return {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={len(devices)}"}
    # Indices into the GPUs this process may use (the machine's own CUDA_VISIBLE_DEVICES, if set).
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(max(devices) + 1)]
    return {"CUDA_VISIBLE_DEVICES": ",".join(ids[i] for i in devices)}


def _result(procs: list[subprocess.Popen], name: str, timeout: int) -> list[dict]:
    """The last JSON line of each process of a layout; all are killed if one fails or hangs."""
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.log_file.close()
    out = []
    for i, proc in enumerate(procs):
        text = open(proc.log_path).read()
        rows = [line for line in text.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not rows:
            raise SystemExit(f"layout {name} (process {i}) failed (exit {proc.returncode}):\n{text[-4000:]}")
        out.append(json.loads(rows[-1]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="mid", choices=("tiny", "mid", "1b"))
    p.add_argument("--steps", type=int, default=20, help="steps whose losses are compared")
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing")
    p.add_argument("--batch", dest="batch_size_global", type=int, default=16, help="global batch (even)")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--cpu", action="store_true", help="two CPU devices instead of two GPUs")
    p.add_argument("--out", required=True)
    p.add_argument("--layout", choices=LAYOUTS, default=None, help=argparse.SUPPRESS)  # internal
    p.add_argument("--timeout", type=int, default=900, help="seconds per layout")
    args = p.parse_args()
    if args.batch_size_global % 2:
        raise SystemExit(f"--batch {args.batch_size_global}: the global batch must split over 2 devices")
    if not 0 <= args.warmup < args.steps:
        raise SystemExit(f"--warmup {args.warmup} must leave some of the --steps {args.steps} to time")
    os.makedirs(args.out, exist_ok=True)
    if args.layout:
        print(json.dumps(run_layout(args)), flush=True)
        return

    shutil.rmtree(os.path.join(args.out, "proc2_checkpoint"), ignore_errors=True)  # never a stale one
    rows = {}
    for layout in ("one", "data2", "fsdp2"):
        devices = [0] if layout == "one" else [0, 1]
        (rows[layout],) = _result(
            [_spawn(args, layout, _device_env(args, devices), layout)], layout, args.timeout
        )
        print(json.dumps(rows[layout]), flush=True)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [
        _spawn(
            args,
            "proc2",
            dict(
                _device_env(args, [i] if not args.cpu else [0]),
                FASTBLT_COORDINATOR=f"localhost:{port}",
                FASTBLT_NUM_PROCESSES="2",
                FASTBLT_PROCESS_ID=str(i),
            ),
            f"proc2_{i}",
        )
        for i in range(2)
    ]
    both = _result(procs, "proc2", args.timeout)
    if both[0]["losses"] != both[1]["losses"]:
        raise SystemExit(f"the two processes disagree on the global losses: {both}")
    rows["proc2"] = both[0]
    print(json.dumps(rows["proc2"]), flush=True)
    (rows["restore1"],) = _result(
        [_spawn(args, "restore1", _device_env(args, [0]), "restore1")], "restore1", args.timeout
    )
    print(json.dumps(rows["restore1"]), flush=True)
    _report(args, rows)


def _report(args, rows: dict) -> None:
    ref = rows["one"]
    lines = [
        f"device: {ref['device']}; shape {args.shape}, global batch {args.batch_size_global} x {ref['seq_len']}; "
        f"date {time.strftime('%Y-%m-%d')}",
        "",
        "| layout | processes x devices | mesh | step ms | bytes/s | scaling efficiency | max rel. loss diff vs one |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for name in ("one", "data2", "fsdp2", "proc2"):
        r = rows[name]
        diff = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], ref["losses"], strict=True))
        eff = r["bytes_per_sec"] / (ref["bytes_per_sec"] * (1 if name == "one" else 2))
        lines.append(
            f"| {name} | {r['processes']} x {r['devices'] // r['processes']} | {r['mesh']} | {r['step_ms']:.1f} | "
            f"{r['bytes_per_sec'] / 1e3:.1f} k | {eff:.2f} | {diff:.1e} |"
        )
    nxt, restored = rows["proc2"]["next_loss"], rows["restore1"]["next_loss"]
    lines += [
        "",
        f"step {args.steps + 1} after the 2-process checkpoint: proc2 {nxt:.6f}, restored on 1 device "
        f"{restored:.6f} (rel. diff {abs(nxt - restored) / abs(nxt):.1e})",
        "",
        "losses per step (one / data2 / fsdp2 / proc2):",
    ]
    for i in range(args.steps):
        lines.append(
            f"  {i + 1:3d}  "
            + "  ".join(f"{rows[n]['losses'][i]:.6f}" for n in ("one", "data2", "fsdp2", "proc2"))
        )
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(args.out, "multi_gpu.md"), "w") as f:
        f.write(f"command: `{' '.join(sys.argv)}`\n\n{text}\n")
    with open(os.path.join(args.out, "multi_gpu.jsonl"), "w") as f:
        for r in rows.values():
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
