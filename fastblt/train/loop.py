"""The train loop: one pure train step, jitted once with shardings and donation, and a readable
main in stages (setup, state, data, loop). ``run`` chains the two stages of an entropy-patched
BLT: train the entropy model (unless a trained one is given), then BLT patched by it.

    fastblt train --config tiny --workdir /tmp/fastblt-tiny
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fastblt import sharding
from fastblt.config import Experiment, TrainConfig, as_dict, experiment_config
from fastblt.data import make_eval_batches, make_train_iterator
from fastblt.errors import NonFiniteLossError
from fastblt.io import checkpoint as ckpt_lib
from fastblt.io.checkpoint import Checkpointer
from fastblt.io.loading import load_trained_params
from fastblt.io.workdir_lock import workdir_lock
from fastblt.model import attention
from fastblt.model.attention import rows_checked, segment_tier
from fastblt.train import calibration
from fastblt.train.metrics import (
    MetricWriter,
    ProgressBar,
    bits_per_byte,
    entropy_model_flops_per_byte,
    mfu,
    model_flops_per_byte,
)
from fastblt.train.optimizer import learning_rate_schedule, make_optimizer
from fastblt.train.tasks import BLTTask, make_task


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


class Trainer:
    """Builds the sharded state and the jitted steps of one task on one mesh (``cfg``: an
    Experiment or its ConfigDict)."""

    def __init__(self, cfg: Experiment | Any, mesh, frozen: Any = None):
        self.experiment = e = experiment_config(cfg)
        self.mesh = mesh
        self.task = make_task(e)
        self.seq_len = e.data.seq_len
        self.steps = e.train.steps
        self.accum = e.train.grad_accum
        self.skip_nonfinite = e.train.on_nonfinite == "skip"
        self.tx = make_optimizer(e.optimizer, self.steps)
        self.schedule = learning_rate_schedule(e.optimizer, self.steps)
        self.frozen = {} if frozen is None else frozen
        self.noise_seed = e.seed + 1

        def init(rng):
            params = self.task.init_params(rng, self.seq_len)
            return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params))

        self.abstract_state, self.state_shardings = sharding.abstract_sharded(
            jax.eval_shape(init, jax.random.key(0)), mesh
        )
        self._init = jax.jit(lambda rng: nn.meta.unbox(init(rng)), out_shardings=self.state_shardings)
        self.batch_sharding = sharding.batch_sharding(mesh)
        self.frozen_shardings = jax.tree.map(lambda _: sharding.replicated(mesh), self.frozen)
        # Replicated as the steps declare them (restored ones arrive on their parameter shardings;
        # abstract ones, for AOT compilation, stay as they are).
        self.frozen = jax.tree.map(
            lambda x, s: x if isinstance(x, jax.ShapeDtypeStruct) else jax.device_put(x, s),
            self.frozen,
            self.frozen_shardings,
        )
        self.train_step = sharding.MeshJit(
            self._train_step,
            mesh,
            in_shardings=(self.state_shardings, self.frozen_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, sharding.replicated(mesh)),
            donate_argnums=(0,),
        )
        # The same step traced for batches whose rows were checked on the host to fit cuDNN's
        # packed document layout (fastblt.model.attention.rows_checked): no per-layer conditional,
        # one program per segment tier (attention.SEGMENT_TIERS: fewer segments, fewer empty tiles).
        # Each compiles on first use; only a GPU with fused attention runs a different program.
        self.packed_train_steps = {
            m: sharding.MeshJit(
                functools.partial(self._packed_train_step, m),
                mesh,
                in_shardings=(self.state_shardings, self.frozen_shardings, self.batch_sharding),
                out_shardings=(self.state_shardings, sharding.replicated(mesh)),
                donate_argnums=(0,),
            )
            for m in attention.SEGMENT_TIERS
        }
        # Only GPUs run the fused kernels (the entropy model's "auto" included). Multi-process runs
        # keep the per-layer check: agreeing on a host flag every step takes a device collective,
        # which queues behind the running step and leaves one step in flight instead of two.
        self._packed_differs = jax.default_backend() == "gpu" and jax.process_count() == 1
        self.eval_step = sharding.MeshJit(
            self._eval_step,
            mesh,
            in_shardings=(self.state_shardings.params, self.frozen_shardings, self.batch_sharding),
            out_shardings=sharding.replicated(mesh),
        )

    def checkpoint_template(self, frozen: Any = None) -> dict:
        """Abstract tree of what a checkpoint's "state" item holds (frozen params only if any)."""
        frozen = self.frozen if frozen is None else frozen
        out = {"train": self.abstract_state}
        if frozen:
            out["frozen"] = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), frozen)
        return out

    def checkpoint_payload(self, state: TrainState) -> dict:
        return {"train": state, "frozen": self.frozen} if self.frozen else {"train": state}

    def init_state(self, seed: int) -> TrainState:
        return self._init(jax.random.key(seed))

    def _grads(self, params, frozen, batch, rng):
        """Gradients and metrics, averaged over ``train.grad_accum`` micro-batches (each with its
        own noise key, for objectives that draw noise)."""
        grad_fn = jax.value_and_grad(self.task.loss, has_aux=True)
        if self.accum == 1:
            (_, metrics), grads = grad_fn(params, frozen, batch, rng)
            return grads, metrics

        micro = jax.tree.map(lambda x: x.reshape(self.accum, x.shape[0] // self.accum, *x.shape[1:]), batch)
        keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(self.accum))

        def body(acc, xs):
            mb, key = xs
            (_, m), g = grad_fn(params, frozen, mb, key)
            return jax.tree.map(jnp.add, acc, (g, m)), None

        first = jax.tree.map(lambda x: x[0], micro)
        (_, metrics_shape), grads_shape = jax.eval_shape(grad_fn, params, frozen, first, keys[0])
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (grads_shape, metrics_shape))
        (grads, metrics), _ = jax.lax.scan(body, zeros, (micro, keys))
        return jax.tree.map(lambda x: x / self.accum, (grads, metrics))

    def _train_step(self, state: TrainState, frozen, batch):
        # Noise for objectives that draw it (BLT-D): a function of the seed and the step only, so a
        # resumed run draws the same noise.
        rng = jax.random.fold_in(jax.random.key(self.noise_seed), state.step)
        grads, metrics = self._grads(state.params, frozen, batch, rng)
        with jax.named_scope("optimizer"):  # named for fastblt.profiling's component table
            updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            grad_norm = optax.tree.norm(grads)
        metrics = dict(metrics, grad_norm=grad_norm, lr=self.schedule(state.step))
        if self.skip_nonfinite:  # train.on_nonfinite="skip": such a step changes nothing but the step
            ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
            keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
            params = jax.tree.map(keep, params, state.params)
            opt_state = jax.tree.map(keep, opt_state, state.opt_state)
            metrics["skipped"] = 1.0 - ok.astype(jnp.float32)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def _packed_train_step(self, max_segments: int, state: TrainState, frozen, batch):
        with rows_checked(max_segments):
            return self._train_step(state, frozen, batch)

    def step_for(self, inputs: np.ndarray) -> Callable:
        """The jitted train step for a batch whose host-side inputs (int[batch, bytes]) are given:
        on one GPU process, the packed step of the smallest segment tier every row fits
        (:attr:`packed_train_steps`, built from attention.SEGMENT_TIERS when the Trainer was made);
        else (a row of more documents than the largest tier, CPU/TPU, several processes)
        :attr:`train_step`, which checks on the device, layer by layer."""
        tier = segment_tier(inputs, self.packed_train_steps) if self._packed_differs else None
        return self.train_step if tier is None else self.packed_train_steps[tier]

    def _eval_step(self, params, frozen, batch):
        _, metrics = self.task.eval_loss(params, frozen, batch)
        return metrics

    def evaluate(self, params, batches: list[dict]) -> dict[str, float]:
        """Token-weighted held-out loss and bits per byte over fixed batches."""
        total, count, correct, nll, cells = 0.0, 0.0, 0.0, 0.0, 0.0
        for b in batches:
            m = jax.device_get(
                self.eval_step(params, self.frozen, sharding.global_batch(b, self.batch_sharding))
            )
            total += float(m["loss"]) * float(m["tokens"])
            count += float(m["tokens"])
            if "masked_cells" in m:  # BLT-D: masked-cell metrics, weighted by masked cells
                correct += float(m["masked_accuracy"]) * float(m["masked_cells"])
                nll += float(m["masked_nll"]) * float(m["masked_cells"])
                cells += float(m["masked_cells"])
        loss = total / max(count, 1.0)
        out = {"eval_loss": loss, "eval_bits_per_byte": bits_per_byte(loss)}
        if cells:
            out |= {"eval_masked_accuracy": correct / cells, "eval_masked_nll": nll / cells}
        return out


class NonFiniteGuard:
    """What a step with a NaN or infinite loss or gradient norm does (``train.on_nonfinite``).

    "stop" (default): the run stops before saving anything of that step, naming the last good
    checkpoint. "skip": the step's update was not applied (Trainer._train_step); a warning is logged
    and the run goes on, unless ``train.max_nonfinite_skips`` steps in a row were skipped.
    """

    def __init__(self, ckpt: Checkpointer, mode: str = "stop", max_skips: int = 10, log=print):
        self.ckpt, self.mode, self.max_skips, self.log = ckpt, mode, max_skips, log
        self.in_a_row = 0

    def check(self, step: int, loss: jax.Array, grad_norm: jax.Array) -> None:
        loss_v, norm_v = float(loss), float(grad_norm)  # waits for the step
        if np.isfinite(loss_v) and np.isfinite(norm_v):
            self.in_a_row = 0
            return
        if self.mode == "skip":
            self.in_a_row += 1
            if self.in_a_row <= self.max_skips:
                self.log(f"step {step}: loss {loss_v}, gradient norm {norm_v}: update skipped")
                return
        self.ckpt.wait()  # a good step still being written is committed first
        good = self.ckpt.latest_step()
        why = (
            f"{self.in_a_row} steps in a row, more than train.max_nonfinite_skips; "
            if self.mode == "skip"
            else ""
        )
        raise NonFiniteLossError(
            f"step {step}: loss {loss_v}, gradient norm {norm_v}; {why}stopped without saving it. "
            + (
                f"The last good checkpoint is step {good} in {self.ckpt.directory}: resume from it with a lower "
                "optimizer.lr or a smaller optimizer.grad_clip"
                if good is not None
                else "No checkpoint was written yet: lower optimizer.lr or check the data"
            )
        )


def _peak_memory_gb() -> float | None:
    """Peak device memory of the first local device, GB (None where the backend keeps no stats)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 1e9


def flops_per_byte(task, seq_len: int, avg_patch_len: float) -> float:
    """Model FLOPs per byte of one training step of ``task`` (fastblt.train.metrics' count): the
    trained model's forward and backward, and a BLT's frozen entropy model's forward when it patches."""
    if isinstance(task, BLTTask):
        total = model_flops_per_byte(
            task.config, seq_len, avg_patch_len, objective=getattr(task, "objective", None)
        )
        if task.config.patcher.mode == "entropy":
            total += entropy_model_flops_per_byte(task.config, seq_len)
        return total
    return entropy_model_flops_per_byte(task.config, seq_len, training=True)


def train(
    cfg: Experiment | Any,
    workdir: str,
    frozen: Any = None,
    log: Callable[[str], Any] | None = None,
    on_step: Callable[[int, dict], None] | None = None,
) -> dict[str, float]:
    """:func:`_train` holding the workdir's trainer lock (fastblt/io/workdir_lock.py): a second
    trainer on the same workdir is refused, naming the first one's host and pid.

    ``log``: takes every message and progress line; None (default): the console, where process 0
    shows a tqdm bar when stdout is a terminal and prints plain progress lines otherwise."""
    with workdir_lock(workdir, log or print, jax.process_index()):
        return _train(cfg, workdir, frozen, log, on_step)


def _train(
    cfg: Experiment | Any,
    workdir: str,
    frozen: Any = None,
    log: Callable[[str], Any] | None = None,
    on_step: Callable[[int, dict], None] | None = None,
) -> dict[str, float]:
    """Trains one task from ``cfg`` (an Experiment or its ConfigDict) in ``workdir`` (resuming from
    its latest checkpoint).

    ``on_step(step, metrics)`` is called after every logged step (metrics as floats).
    Returns the last logged and evaluated metrics; after a preemption save they hold
    ``preempted_at_step`` (the run is unfinished).
    """
    # ---------------------------------------------------------------- setup
    console, log = log is None, log or print
    cfg = experiment_config(cfg)
    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_batch(mesh, cfg.data.batch_size)
    trainer = Trainer(cfg, mesh, frozen)
    task = trainer.task
    chief = jax.process_index() == 0
    ck = cfg.checkpoint
    ckpt = Checkpointer(
        workdir,
        save_every=ck.save_every,
        keep=ck.keep,
        keep_every=ck.keep_every or None,
        async_save=ck.async_save,
    )
    ckpt_lib.install_preemption_handler()
    model_config = task.config
    meta = ckpt_lib.config_meta(as_dict(model_config), task=task.name, experiment=as_dict(cfg))

    # ---------------------------------------------------------------- data
    data_iter = make_train_iterator(cfg.data, jax.process_index(), jax.process_count())
    eval_batches = make_eval_batches(cfg.data, jax.process_index(), jax.process_count())

    # ---------------------------------------------------------------- state
    saved = trainer.checkpoint_template()
    if ckpt.latest_step() is not None:
        _, restored, _ = ckpt.restore_newest_good(saved, data_iter, as_dict(model_config), log_fn=log)
        state = restored["train"]
        log(f"resumed {task.name} from step {int(state.step)} in {workdir}")
    else:
        state = trainer.init_state(cfg.seed)
    start = int(state.step)

    # ---------------------------------------------------------------- loop
    writer = MetricWriter(os.path.join(workdir, "tensorboard"), enabled=chief, resume_step=start)
    progress = ProgressBar(
        trainer.steps, start_step=start, write=None if console else log, bar=None if chief else False
    )
    log = progress.write  # on a terminal, messages go above the bar instead of through it
    log_every = cfg.train.log_every
    eval_every = cfg.train.eval_every
    bytes_per_step = cfg.data.batch_size * trainer.seq_len
    last: dict[str, float] = {}
    t0, t_step = time.time(), start
    in_flight = None
    warmup = cfg.optimizer.warmup_steps
    if chief and warmup >= trainer.steps > 1:  # legal (short smoke runs), but say what it means
        log(
            f"optimizer.warmup_steps={warmup} >= train.steps={trainer.steps}: the warmup is cut to {trainer.steps - 1} steps"
        )
    guard = NonFiniteGuard(
        ckpt, cfg.train.on_nonfinite, cfg.train.max_nonfinite_skips, log if chief else (lambda *_: None)
    )
    try:
        for step in range(start, trainer.steps):
            host_batch = next(data_iter)
            step_fn = trainer.step_for(host_batch["inputs"])
            batch = sharding.global_batch(host_batch, trainer.batch_sharding)
            state, metrics = step_fn(state, trainer.frozen, batch)
            # At most two steps in flight: the device stays busy, and a SIGTERM's save starts after the
            # step that was running, not after every step the host had queued ahead.
            if in_flight is not None:
                guard.check(*in_flight)
            in_flight = (step + 1, metrics["loss"], metrics["grad_norm"])
            done = step + 1
            if chief:
                progress.advance(done)  # a bar only; no wait for the device
            if done % log_every == 0 or done == trainer.steps:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                elapsed = max(time.time() - t0, 1e-9)
                m["bits_per_byte"] = bits_per_byte(m.get("next_byte_loss", m["loss"]))
                peak = _peak_memory_gb()
                if peak is not None:
                    m["peak_memory_gb"] = peak
                m["bytes_per_sec"] = bytes_per_step * (done - t_step) / elapsed
                fpb = flops_per_byte(task, trainer.seq_len, m.get("avg_patch_len", 1.0))
                util = (
                    mfu(fpb, m["bytes_per_sec"], jax.device_count(), jax.devices()[0].device_kind)
                    if fpb
                    else None
                )
                if util is not None:
                    m["mfu"] = util
                writer.write_scalars(done, m)
                if on_step is not None:
                    on_step(done, m)
                if chief:
                    progress.update(done, m)
                    if m.get("patch_overflow", 0.0) > 0:
                        log(_overflow_warning(done, m, task))
                last.update(m)
                t0, t_step = time.time(), done
            if eval_batches and (done % eval_every == 0 or done == trainer.steps):
                ev = trainer.evaluate(state.params, eval_batches)
                writer.write_scalars(done, ev)
                if chief:
                    log(
                        f"[{task.name}] step {done}: held-out loss {ev['eval_loss']:.4f}, "
                        f"bits/byte {ev['eval_bits_per_byte']:.4f}"
                        + (
                            f", masked accuracy {ev['eval_masked_accuracy']:.3f}"
                            if "eval_masked_accuracy" in ev
                            else ""
                        )
                    )
                last.update(ev)
                if chief and isinstance(task, BLTTask) and cfg.train.sample_bytes > 0:
                    log(
                        f"[{task.name}] sample: {_sample_text(task, state.params, trainer.frozen, cfg.train)!r}"
                    )
                t0 = time.time()
            payload = trainer.checkpoint_payload(state)
            preempted = ckpt_lib.preemption_requested(done)
            due = preempted or done == trainer.steps or done % ckpt.save_every == 0
            if due:
                guard.check(*in_flight)  # never save a state a non-finite step produced
                in_flight = None  # checked: the next step must not count a skipped step twice
                ckpt.save(done, payload, data_iter, meta, force=True)
            if preempted:
                log(
                    f"preemption signal: saved step {done}, exiting (unfinished: status {ckpt_lib.PREEMPTED_EXIT})"
                )
                last["preempted_at_step"] = float(done)
                break
    finally:  # also when a step fails or diverges: pending saves commit, handlers are restored
        ckpt.wait()
        ckpt.close()
        writer.close()
        progress.close()
        ckpt_lib.uninstall_preemption_handler()
    return last


def _overflow_warning(step: int, m: dict[str, float], task: Any) -> str:
    slots = task.config.patcher.max_patches
    return (
        f"WARNING step {step}: {100 * m['patch_overflow']:.1f}% of rows had more patches than the "
        f"{slots} slots of model.patcher.max_patches (up to {m.get('patches_needed_max', 0):.0f}); their "
        "surplus patches were merged into the last slot, a patch generation never makes. Raise "
        "model.patcher.max_patches."
    )


def _sample_text(task: BLTTask, params: Any, frozen: Any, train_cfg: TrainConfig) -> str:
    """Greedy continuation of ``train.sample_prompt`` by the current model (cached sampler)."""
    from fastblt.sampler import generate

    full = dict(params, entropy_model=frozen) if frozen else dict(params)
    prompt = train_cfg.sample_prompt
    # The training process keeps JAX's cache setting as it is (the sampler's default would turn the
    # on-disk cache on for every later training compile).
    out = generate(full, task.config, [prompt], max_bytes=train_cfg.sample_bytes, compilation_cache=False)
    return prompt + out.texts[0].decode("utf-8", errors="replace")


# ------------------------------------------------------------------------- two stages


def entropy_stage_config(cfg: Experiment | Any) -> Experiment:
    """The stage-1 experiment of an entropy-patched BLT experiment: its entropy model, same data,
    the ``entropy_stage`` section's steps and learning rate."""
    e = experiment_config(cfg)
    assert e.model is not None and e.model.entropy_model is not None and e.entropy_stage is not None
    stage = e.entropy_stage
    return Experiment.of_entropy_model(
        e.model.entropy_model,
        seed=e.seed,
        data=e.data,
        optimizer=dataclasses.replace(e.optimizer, lr=stage.lr, warmup_steps=stage.warmup_steps),
        train=dataclasses.replace(e.train, steps=stage.steps, eval_every=stage.steps),
        checkpoint=e.checkpoint,
        mesh=e.mesh,
    )


def run(cfg: Experiment | Any, workdir: str, log: Callable[[str], Any] | None = None) -> dict[str, float]:
    """``fastblt train``: one task, or both stages of an entropy-patched BLT (``log``: see :func:`train`)."""
    os.makedirs(workdir, exist_ok=True)
    cfg = experiment_config(cfg)
    if cfg.model is None or cfg.model.patcher.mode != "entropy":
        return train(cfg, workdir, log=log)
    train_log, log = log, log or print  # train's None keeps its console bar
    assert cfg.entropy_stage is not None
    entropy_dir = cfg.entropy_stage.checkpoint or os.path.join(workdir, "entropy")
    stage_cfg = entropy_stage_config(cfg)
    if not cfg.entropy_stage.checkpoint:
        log(f"== stage 1: entropy model -> {entropy_dir}")
        first = train(stage_cfg, entropy_dir, log=train_log)
        if "preempted_at_step" in first:  # stage 2 needs the finished entropy model
            return first
    entropy_params, _ = load_trained_params(stage_cfg, entropy_dir)
    blt_dir = os.path.join(workdir, "blt")
    cfg = _stage2_patching(cfg, stage_cfg, entropy_params, log, saved=_saved_patcher(blt_dir))
    log(f"== stage 2: BLT -> {workdir}")
    return train(cfg, blt_dir, frozen=entropy_params, log=train_log)


def _stage2_patching(
    cfg: Experiment,
    stage_cfg: Experiment,
    entropy_params: Any,
    log,
    saved: dict | None = None,
) -> Experiment:
    """Stage 2's patching from the frozen entropy model on 4 training batches (fastblt/train/calibration.py):
    the threshold for ``entropy_stage.target_patch_len`` where set, then ``model.patcher.max_patches``
    raised where a row needs more slots (said loudly; the run's saved config keeps the new value).

    Every process decides the same (process 0's figures): the threshold and the buffer are baked into
    the compiled step. ``saved``: the patcher config of a stage 2 that resumes, whose buffer it keeps
    (its checkpoints were written with it)."""
    assert cfg.model is not None and cfg.entropy_stage is not None and stage_cfg.entropy_model is not None
    rows = make_train_iterator(cfg.data, jax.process_index(), jax.process_count())
    batches = [next(rows) for _ in range(4)]
    values = calibration.entropies(stage_cfg.entropy_model, entropy_params, batches, cfg.model.attention_impl)
    stage = cfg.entropy_stage
    patcher = cfg.model.patcher
    if stage.target_patch_len:
        threshold = _same_on_every_process(calibration.threshold_for(values, batches, stage.target_patch_len))
        patcher = dataclasses.replace(patcher, threshold=threshold)
        log(
            f"patch threshold calibrated to {threshold:.4f} nats for ~{stage.target_patch_len} bytes per patch"
        )
    if saved is not None:
        patcher = dataclasses.replace(patcher, max_patches=saved.get("max_patches", patcher.max_patches))
        return _with_patcher(cfg, patcher)
    needed = calibration.patches_needed(values, batches, patcher)
    old = patcher.max_patches
    new = calibration.sized_buffer(needed, old, cfg.data.seq_len)
    if new is not None:
        new = int(_same_on_every_process(float(new)))
    if new != old:
        patcher = dataclasses.replace(patcher, max_patches=new)
        log(
            f"WARNING: model.patcher.max_patches raised from {old} to {new}: rows of the first batches need "
            f"up to {int(needed.max())} patches (mean {needed.mean():.0f}); with {old} slots a row's surplus "
            "patches would merge into its last slot. Set model.patcher.max_patches to choose the buffer."
        )
    return _with_patcher(cfg, patcher)


def _with_patcher(cfg: Experiment, patcher: Any) -> Experiment:
    """``cfg`` with ``model.patcher`` replaced, validated again (a calibrated threshold is a number)."""
    values = as_dict(cfg)
    values["model"]["patcher"] = as_dict(patcher)
    return experiment_config(values)


def _saved_patcher(blt_dir: str) -> dict | None:
    """The patcher config of the newest checkpoint in a stage-2 workdir; None where there is none
    readable (a fresh run; an unreadable newest step is the trainer's to handle)."""
    from pathlib import Path

    from fastblt.io.loading import read_meta

    if not os.path.isdir(os.path.join(blt_dir, "checkpoints")):
        return None
    try:
        _, meta = read_meta(Path(blt_dir))
    except (FileNotFoundError, ValueError):  # ValueError: fastblt.config.ConfigError (damaged meta)
        return None
    return (meta.get("model_config") or {}).get("patcher")


def _same_on_every_process(value: float) -> float:
    """Process 0's value on every process (one process: the value itself)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return float(multihost_utils.broadcast_one_to_all(np.float64(value)))


def entropy_function(cfg: Experiment | Any, workdir: str, bucket: int = 1024):
    """``fn(ids: int[n]) -> float32[n]`` next-byte entropies from the entropy model trained in
    ``workdir`` (a stage-1 workdir of ``cfg``, or an entropy-model experiment's). Rows are padded
    to a multiple of ``bucket`` so that few shapes compile."""
    from fastblt.model import EntropyModel
    from fastblt.model.patcher import entropy

    cfg = experiment_config(cfg)
    stage_cfg = entropy_stage_config(cfg) if cfg.model is not None else cfg
    params, _ = load_trained_params(stage_cfg, workdir)
    assert stage_cfg.entropy_model is not None
    model = EntropyModel(stage_cfg.entropy_model)
    fn = jax.jit(lambda p, t: entropy(model.apply({"params": p}, t)))

    def entropies(ids: np.ndarray) -> np.ndarray:
        n = len(ids)
        padded = np.zeros((1, -(-n // bucket) * bucket), np.int32)
        padded[0, :n] = ids
        return np.asarray(fn(params, padded))[0, :n]

    return entropies
