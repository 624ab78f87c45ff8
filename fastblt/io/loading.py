"""One way to get ``(ModelConfig, params)`` for inference from anything fastblt writes: an export
directory (config.json + params/), a BLT training workdir (its ``checkpoints/``), or the root of a
two-stage run (its ``blt/`` stage). Training checkpoints carry the frozen entropy model, which is put
back under ``params["entropy_model"]`` so that ``BLT(config).apply`` patches by itself."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastblt.config import (
    ConfigError,
    Experiment,
    ModelConfig,
    experiment_config,
    model_config_from_dict,
    upgrade_experiment,
    upgrade_model,
)


def training_dir(path: str | Path) -> Path | None:
    """The directory holding ``checkpoints/`` for ``path`` (itself or its ``blt/`` stage), or None."""
    p = Path(path).expanduser()
    for candidate in (p, p / "blt"):
        if (candidate / "checkpoints").is_dir():
            return candidate
    return None


def _steps(directory: Path) -> list[int]:
    return sorted(int(d.name) for d in (directory / "checkpoints").iterdir() if d.name.isdigit())


def read_meta(directory: Path, step: int | None = None) -> tuple[int, dict[str, Any]]:
    """(step, meta dict) of a training checkpoint, read without building any model."""
    steps = _steps(directory)
    if not steps:
        raise FileNotFoundError(f"{directory / 'checkpoints'} holds no checkpoint")
    step = steps[-1] if step is None else int(step)
    if step not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} in {directory}; saved steps: {steps}")
    meta_file = directory / "checkpoints" / str(step) / "meta" / "metadata"
    try:
        return step, json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{meta_file} is unreadable ({e}): the checkpoint of step {step} is damaged") from e


def trained_block_size(path: str | Path) -> int | None:
    """The diffusion block size a BLT-D training workdir was trained with (None: not BLT-D, or an
    export, which carries the model config only)."""
    directory = training_dir(path)
    if directory is None:
        return None
    try:
        _, meta = read_meta(directory)
    except (FileNotFoundError, ConfigError):
        return None
    objective = meta.get("experiment", {}).get("objective") or {}
    return int(objective["block_size"]) if objective.get("kind") == "blt_d" else None


def load_model(
    path: str | Path, step: int | None = None, dtype: str | None = None
) -> tuple[ModelConfig, Any]:
    """``(config, params)`` of an export or a training workdir (latest step unless ``step``)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such checkpoint, export or workdir")
    if (p / "config.json").is_file():
        from fastblt.io.export import load_export

        if step is not None:
            raise ConfigError(
                f"{p} is an export (one set of parameters): --step applies to training workdirs"
            )
        return load_export(p, dtype=dtype)
    directory = training_dir(p)
    if directory is None:
        raise FileNotFoundError(
            f"{p} is neither an export (no config.json) nor a training workdir (no checkpoints/ or blt/checkpoints/)"
        )
    step, meta = read_meta(directory, step)
    if meta.get("task") not in ("blt", "blt_d"):
        raise ConfigError(
            f"{directory} holds a {meta.get('task', 'unknown')!r} run, not a BLT: point to the BLT workdir"
        )
    import jax

    # Saved configs are read as strictly as any other, once the keys added since are filled in
    # (fastblt/config/saved.py lists them).
    experiment = experiment_config(upgrade_experiment(meta["experiment"]))
    params, frozen = load_trained_params(experiment, str(directory), step)
    config = model_config_from_dict(upgrade_model(meta["model_config"]))
    params = dict(params)
    if frozen:
        params["entropy_model"] = frozen
    if dtype is not None:
        import jax.numpy as jnp

        params = jax.tree.map(
            lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params
        )
    return config, params


def load_trained_params(cfg: Experiment | Any, workdir: str, step: int | None = None) -> tuple[Any, Any]:
    """(params, frozen) of a checkpoint (None: the newest readable one) of a training workdir made
    with the experiment ``cfg`` (an Experiment or its ConfigDict); frozen is None when the run has no
    frozen parameters.

    Only the parameters' values are read (no optimizer is built, its values are not read; the
    checkpoint's metadata is), onto the shardings of ``cfg``'s mesh, with the parameters' logical
    axis rules.
    """
    import jax

    from fastblt import sharding
    from fastblt.io.checkpoint import Checkpointer
    from fastblt.train.tasks import frozen_template, make_task

    cfg = experiment_config(cfg)
    task = make_task(cfg)
    boxed = jax.eval_shape(lambda: task.init_params(jax.random.key(0), cfg.data.seq_len))
    mesh = sharding.make_mesh(cfg.mesh)
    params, _ = sharding.abstract_sharded(boxed, mesh)
    template: dict[str, Any] = {"train": {"params": params}}
    frozen = frozen_template(task)
    if frozen:  # replicated, as the trainer holds it
        template["frozen"] = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.replicated(mesh)), frozen
        )
    # keep is irrelevant when only restoring; a large value guarantees nothing is ever pruned here.
    ckpt = Checkpointer(workdir, save_every=1, keep=1_000_000, async_save=False)
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(
                f"no checkpoint in {workdir}: train one first (fastblt train --workdir {workdir})"
            )
        if step is None:
            # Read-only: an unreadable newest step is skipped, not moved (the trainer owns the workdir).
            _, restored, _ = ckpt.restore_newest_good(template, None, move_aside=False, partial=True)
        else:
            restored, _ = ckpt.restore(step, template, None, partial=True)
    finally:
        ckpt.close()
    return restored["train"]["params"], restored.get("frozen")
