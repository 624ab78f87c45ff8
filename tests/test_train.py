"""The train loop: sharded == single-device, kill (preemption) and resume == uninterrupted
(bitwise on CPU, data iterator included), gradient accumulation, and the two-stage run."""

from __future__ import annotations

import os
import re
import shutil
import signal

import jax
import numpy as np
import pytest
from shared_runs import built_once, read_json, two_stage_run, uninterrupted_run, write_json
from train_utils import small_config

from fastblt import sharding
from fastblt.data import make_train_iterator
from fastblt.train.loop import Trainer, train


def _losses(cfg, mesh, batches, frozen=None):
    trainer = Trainer(cfg, mesh, frozen)
    state = trainer.init_state(0)
    out = []
    for b in batches:
        state, m = trainer.train_step(state, trainer.frozen, sharding.global_batch(b, trainer.batch_sharding))
        out.append(float(m["loss"]))
    return np.array(out), state


@pytest.fixture(scope="module")
def single_device_entropy_run():
    """(config, batches, frozen entropy params, losses on one device): the reference of every mesh
    below, computed once in the session (shared_runs.py; each Trainer compiles its own steps)."""
    from fastblt.train.tasks import frozen_template

    cfg = small_config(patching="entropy")
    it = make_train_iterator(cfg.data)
    batches = [next(it) for _ in range(3)]
    # Random (untrained) frozen entropy params: patching runs inside the step on every mesh.
    frozen = jax.tree.map(
        lambda s: np.random.default_rng(0).normal(0, 0.2, s.shape).astype(s.dtype),
        frozen_template(Trainer(cfg, sharding.make_mesh({"data": 1}, jax.devices()[:1])).task),
    )

    def build(path):
        single, _ = _losses(cfg, sharding.make_mesh({"data": 1}, jax.devices()[:1]), batches, frozen)
        write_json(path / "losses.json", single.tolist())

    single = np.array(read_json(built_once("single_device_entropy_run", build) / "losses.json"))
    return cfg, batches, frozen, single


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 4, 2), (8, 1, 1)])
def test_sharded_training_matches_single_device(mesh_shape, single_device_entropy_run):
    cfg, batches, frozen, single = single_device_entropy_run
    mesh = sharding.make_mesh(dict(zip(("data", "fsdp", "tensor"), mesh_shape, strict=True)))
    sharded, state = _losses(cfg, mesh, batches, frozen)
    np.testing.assert_allclose(sharded, single, rtol=2e-5)
    # Parameters really are sharded over fsdp / tensor where the rules say so.
    kernel = state.params["global_transformer"]["layers_0"]["feed_forward"]["w1"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")


def test_scanned_global_layers_train_the_same_on_a_2x2x2_mesh():
    cfg = small_config("model.global_model.n_layers=3")
    it = make_train_iterator(cfg.data)
    batches = [next(it) for _ in range(3)]
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    looped, _ = _losses(cfg, mesh, batches)
    scanned, state = _losses(
        small_config("model.global_model.n_layers=3", "model.scan_layers=True"), mesh, batches
    )
    np.testing.assert_allclose(scanned, looped, rtol=2e-5)
    kernel = state.params["global_transformer"]["layers_2"]["feed_forward"]["w1"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")


def test_gradient_accumulation_matches_one_big_batch():
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    cfg = small_config()
    it = make_train_iterator(cfg.data)
    batches = [next(it) for _ in range(2)]
    one, _ = _losses(cfg, mesh, batches)
    accum, _ = _losses(small_config("train.grad_accum=4"), mesh, batches)
    np.testing.assert_allclose(accum, one, rtol=1e-5)


@pytest.fixture(scope="module")
def uninterrupted():
    """(workdir, {step: loss}) of one uninterrupted run of ``small_config(steps=6)``, shared by the
    session (shared_runs.uninterrupted_run)."""
    return uninterrupted_run()


def _copy_of(workdir, tmp_path):
    """A copy of a shared finished workdir that a test may change."""
    return shutil.copytree(workdir, tmp_path / "run")


def test_preempted_and_resumed_run_equals_uninterrupted_run(tmp_path, uninterrupted):
    cfg = small_config(steps=6)
    full = dict(uninterrupted[1])

    parts: dict[int, float] = {}

    def preempt_at_4(step, metrics):
        parts[step] = metrics["loss"]
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)  # the preemption notice: save now and stop

    workdir = str(tmp_path / "resumed")
    train(cfg, workdir, log=lambda *_: None, on_step=preempt_at_4)
    assert sorted(parts) == [1, 2, 3, 4]
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "4"))  # saved off-schedule on the signal
    train(cfg, workdir, log=lambda *_: None, on_step=lambda s, m: parts.__setitem__(s, m["loss"]))
    assert sorted(parts) == [1, 2, 3, 4, 5, 6]
    assert parts == full  # bitwise: same floats, same batches after the restored iterator


def test_resume_skips_an_unreadable_newest_checkpoint(tmp_path, uninterrupted):
    """The newest checkpoint loses its metadata: the run warns, moves it aside, resumes from the
    one before and repeats the uninterrupted run's losses."""
    cfg = small_config(steps=6)
    full = dict(uninterrupted[1])
    workdir = _copy_of(uninterrupted[0], tmp_path)  # checkpoints 3 and 6 of that run
    (workdir / "checkpoints" / "6" / "_CHECKPOINT_METADATA").unlink()
    for p in (workdir / "checkpoints" / "6").rglob("_METADATA"):
        p.unlink()
    logs: list[str] = []
    losses: dict[int, float] = {}
    train(cfg, str(workdir), log=logs.append, on_step=lambda s, m: losses.__setitem__(s, m["loss"]))
    assert any("step 6" in line and "corrupt-" in line for line in logs), logs
    assert sorted(losses) == [4, 5, 6] and all(losses[s] == full[s] for s in losses)
    assert any(p.name.startswith("6.corrupt-") for p in (workdir / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def two_stage():
    """(workdir, logs, last metrics) of the session's finished two-stage run
    (shared_runs.two_stage_run, also read by tests/test_calibration.py)."""
    return two_stage_run()


def test_two_stage_run_trains_entropy_model_then_blt(two_stage):
    workdir, logs, last = two_stage
    assert os.path.isdir(workdir / "entropy" / "checkpoints" / "3")
    assert os.path.isdir(workdir / "blt" / "checkpoints" / "3")
    assert any("calibrated" in line for line in logs)
    # Stage 2 (BLT, with the frozen entropy model) ends on a greedy sample of the prompt.
    assert any(re.match(r"\[blt\] sample: ['\"]def ", line) for line in logs), logs
    assert np.isfinite(last["eval_bits_per_byte"])
    assert 1.0 < last["avg_patch_len"] < 20.0


def test_trained_workdir_exports_and_converts_to_hf(tmp_path, two_stage):
    """A two-stage run's workdir loads for inference, exports, and converts to a HF model that
    gives the same logits (entropy model included: each side patches by itself)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import contextlib
    import io
    import json

    import jax.numpy as jnp

    from fastblt import cli
    from fastblt.io.export import load_export
    from fastblt.io.loading import load_model
    from fastblt.model import BLT

    shutil.copytree(two_stage[0], tmp_path / "run")  # the shared run stays as it was
    config, params = load_model(tmp_path / "run")
    assert (
        "entropy_model" in params
        and config.patcher.threshold != small_config(patching="entropy").model.patcher.threshold
    )

    assert cli.main(["export", "--workdir", str(tmp_path / "run"), "--dst", str(tmp_path / "export")]) == 0
    config2, params2 = load_export(tmp_path / "export")
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params2, params)

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        for src in ("run", "export"):  # a training workdir and its export give the same greedy text
            argv = ["sample", "--checkpoint", str(tmp_path / src), "--prompt", "def f(", "--max-bytes", "8"]
            assert cli.main([*argv, "--json"]) == 0
    from_workdir, from_export = (json.loads(line) for line in buf.getvalue().splitlines())
    assert from_workdir["counters"]["generated"] <= 8 and len(from_workdir["texts"]) == 1
    assert from_export["texts"] == from_workdir["texts"]

    assert (
        cli.main(["convert", "orbax-to-hf", "--src", str(tmp_path / "run"), "--dst", str(tmp_path / "hf")])
        == 0
    )
    hf = transformers.BltForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    tokens = np.array([[1, *(np.frombuffer(b"def main():\n    return 0\n", np.uint8) + 4)]])
    # One compiled forward: op by op, the entropy model and BLT compiled each primitive on its own.
    ours = jax.jit(BLT(config).apply)({"params": params}, jnp.asarray(tokens, jnp.int32))
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens), use_cache=False).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4)


def test_blt_d_training_step_with_zero_diffusion_weight_equals_plain_blt():
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    plain_cfg = small_config("model.mask_embedding=True", "model.patcher.max_patch_length=8")
    it = make_train_iterator(plain_cfg.data)
    batches = [next(it) for _ in range(2)]
    plain, _ = _losses(plain_cfg, mesh, batches)
    d0 = small_config(
        "model.mask_embedding=True",
        "model.patcher.max_patch_length=8",
        "objective.kind=blt_d",
        "objective.diffusion_weight=0.0",
    )
    zero, _ = _losses(d0, mesh, batches)
    np.testing.assert_array_equal(zero, plain)
    d1 = small_config(
        "model.mask_embedding=True",
        "model.patcher.max_patch_length=8",
        "objective.kind=blt_d",
        "train.grad_accum=2",
    )
    trainer = Trainer(d1, mesh)
    state = trainer.init_state(0)
    state, m = trainer.train_step(
        state, trainer.frozen, sharding.global_batch(batches[0], trainer.batch_sharding)
    )
    assert np.isfinite(float(m["loss"])) and float(m["masked_cells"]) > 0
    assert float(m["loss"]) > float(m["next_byte_loss"])  # the diffusion term is in the trained loss
    ev = trainer.evaluate(state.params, batches[1:])  # evaluation is the plain next-byte loss
    assert np.isfinite(ev["eval_bits_per_byte"])


def test_resume_with_a_changed_model_names_the_changed_key(tmp_path, uninterrupted):
    from fastblt.io.checkpoint import ConfigMismatchError

    workdir = _copy_of(uninterrupted[0], tmp_path)
    changed = small_config("model.decoder.n_layers=2", steps=9)
    with pytest.raises(ConfigMismatchError) as info:
        train(changed, str(workdir), log=lambda *_: None)
    msg = str(info.value)
    assert "model.decoder.n_layers: checkpoint 1, current 2" in msg
    assert "optimizer" not in msg  # no list of missing optimizer-state paths


def test_a_diverging_run_stops_at_the_first_non_finite_step_and_saves_none(tmp_path):
    from fastblt.train.loop import NonFiniteLossError

    cfg = small_config("optimizer.lr=1e30", "optimizer.warmup_steps=0", "checkpoint.save_every=1", steps=6)
    with pytest.raises(NonFiniteLossError) as info:
        train(cfg, str(tmp_path), log=lambda *_: None)
    msg = str(info.value)
    bad = int(msg.split()[1].rstrip(":"))
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert all(s < bad for s in saved)  # nothing at or after the non-finite step
    assert (f"step {saved[-1]}" in msg) if saved else ("No checkpoint" in msg)


def _poison_steps(monkeypatch, *bad_steps: int) -> None:
    """Makes the loss and gradients of the steps ``bad_steps`` (1-based) NaN, and no other step's:
    a step's noise key is a function of the step alone (Trainer._train_step)."""
    import jax
    import jax.numpy as jnp

    from fastblt.train.loop import Trainer

    original = Trainer._grads

    def poisoned(self, params, frozen, batch, rng):
        grads, metrics = original(self, params, frozen, batch, rng)
        key = jax.random.key(self.noise_seed)
        targets = jnp.stack([jax.random.key_data(jax.random.fold_in(key, s - 1)) for s in bad_steps])
        hit = jnp.any(jnp.all(jax.random.key_data(rng)[None] == targets, axis=-1))
        nan = jnp.where(hit, jnp.nan, 1.0)
        return jax.tree.map(lambda g: g * nan.astype(g.dtype), grads), dict(
            metrics, loss=metrics["loss"] * nan
        )

    monkeypatch.setattr(Trainer, "_grads", poisoned)


def test_skip_mode_skips_a_non_finite_step_and_trains_on(tmp_path, monkeypatch):
    import numpy as np

    from fastblt.train.loop import NonFiniteLossError

    _poison_steps(monkeypatch, 3, 5, 6)
    with pytest.raises(NonFiniteLossError, match="step 3: loss nan"):  # the default: stop
        train(small_config(steps=5), str(tmp_path / "stop"), log=lambda *_: None)

    # Skip mode with at most one skip in a row: step 3 is skipped, step 4 trains (and resets the
    # count), step 5 is skipped, step 6 is the second in a row and stops the run. One run checks both
    # the skipping and the limit; they were two runs of this config (the second with
    # max_nonfinite_skips=0), and each train() compiles its own steps: 102 -> 31 s back to back on a
    # loaded 2-core machine (2026-12-05). A save after every step: a skipped step on a save step is
    # counted once (it was counted again by the next step's check, which stopped the run at step 3).
    logs, seen = [], {}
    cfg = small_config(
        "train.on_nonfinite='skip'",
        "optimizer.warmup_steps=9",
        "train.max_nonfinite_skips=1",
        "checkpoint.save_every=1",
        "checkpoint.keep=10",
        steps=7,
    )
    with pytest.raises(
        NonFiniteLossError, match="step 6: .*2 steps in a row, more than train.max_nonfinite_skips"
    ):
        train(cfg, str(tmp_path / "skip"), log=logs.append, on_step=lambda s, m: seen.__setitem__(s, m))
    assert any("warmup is cut to 6 steps" in line for line in logs)  # legal, and said
    assert sorted(seen) == [1, 2, 3, 4, 5, 6]
    assert [seen[s]["skipped"] for s in range(1, 7)] == [0, 0, 1, 0, 1, 1]
    assert all(np.isnan(seen[s]["loss"]) for s in (3, 5, 6))
    assert all(np.isfinite(seen[s]["loss"]) for s in (1, 2, 4))  # trains on after a skip
    skipped_lines = [line.split(":")[0] for line in logs if "update skipped" in line]
    assert skipped_lines == ["step 3", "step 5"], logs  # each once
    # A skipped step is no reason to stop saving (its state is the step before's), and the step past
    # the limit is not saved (step 6's save was due).
    saved = sorted(p.name for p in (tmp_path / "skip" / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == ["1", "2", "3", "4", "5"], saved


def test_console_progress_off_a_terminal_is_the_plain_lines(tmp_path, capsys):
    """log=None (what `fastblt train` passes): off a terminal (a log file, CI, a pipe) process 0
    prints the plain progress lines that log readers parse, and no bar."""
    train(small_config("optimizer.warmup_steps=1", steps=2), str(tmp_path), log=None)
    out = capsys.readouterr().out
    lines = [x for x in out.splitlines() if x.startswith("step ")]
    assert [x.split(" | ")[0] for x in lines] == ["step 1/2 ( 50.0%)", "step 2/2 (100.0%)"], out
    assert all(" | loss " in x and x.split(" | ")[-1].startswith("ETA ") for x in lines)
    assert "\r" not in out and "\x1b" not in out


def test_inference_loading_reads_parameters_only(tmp_path, monkeypatch, uninterrupted):
    """load_trained_params restores the parameters the full train state holds, without building an
    optimizer; a template that differs is named path by path, not by the optimizer's leaves."""
    from fastblt.io import checkpoint as ckpt_lib
    from fastblt.io.loading import load_trained_params
    from fastblt.train import optimizer as optim

    cfg = small_config(steps=6)
    workdir = _copy_of(uninterrupted[0], tmp_path)
    trainer = Trainer(cfg, sharding.make_mesh({"data": 1}, jax.devices()[:1]))
    with ckpt_lib.Checkpointer(str(workdir), save_every=1, keep=100, async_save=False) as ck:
        full, _ = ck.restore(None, trainer.checkpoint_template())

    def no_optimizer(*args, **kwargs):
        raise AssertionError("inference loading built an optimizer")

    monkeypatch.setattr(optim, "make_optimizer", no_optimizer)
    params, frozen = load_trained_params(cfg, str(workdir))
    assert frozen is None
    jax.tree.map(np.testing.assert_array_equal, params, full["train"].params)

    shape = {"scale": jax.ShapeDtypeStruct((3,), np.float32)}  # the decoder's norm has D_d entries
    wrong = {"train": {"params": {"local_decoder": {"norm": shape}, "not_a_layer": shape}}}
    with ckpt_lib.Checkpointer(str(workdir), save_every=1, keep=100, async_save=False) as ck:
        with pytest.raises(ckpt_lib.CheckpointMismatchError) as err:
            ck.restore(None, wrong, partial=True)
    text = str(err.value)
    assert "2 difference(s)" in text and "opt_state" not in text, text
    assert "local_decoder" in text and "not_a_layer" in text


def test_frozen_parameters_on_a_sharded_mesh_are_replicated_for_the_step():
    """Stage 2 gets its frozen entropy model as restored (on the parameters' fsdp/tensor shardings);
    the step declares it replicated, so the trainer places it so (jit refused the mismatch)."""
    from fastblt.train.tasks import frozen_template

    cfg = small_config("mesh.data=1", "mesh.fsdp=2", patching="entropy")
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2}, jax.devices()[:2])
    template = frozen_template(Trainer(cfg, mesh).task)
    specs = jax.tree.map(
        lambda s: jax.sharding.PartitionSpec("fsdp") if s.shape[0] % 2 == 0 else None, template
    )
    frozen = jax.tree.map(
        lambda s, p: jax.device_put(
            np.random.default_rng(0).normal(0, 0.2, s.shape).astype(s.dtype),
            jax.sharding.NamedSharding(mesh, p or jax.sharding.PartitionSpec()),
        ),
        template,
        specs,
    )
    trainer = Trainer(cfg, mesh, frozen)
    state = trainer.init_state(0)
    batch = sharding.global_batch(next(make_train_iterator(cfg.data)), trainer.batch_sharding)
    _, m = trainer.train_step(state, trainer.frozen, batch)
    assert np.isfinite(float(m["loss"]))
