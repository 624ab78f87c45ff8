"""The inference checkpoint format: a directory holding a model config and its parameters.

    <export>/
      config.json    ModelConfig.to_dict() plus "format_version"
      params/        the parameter pytree (plain arrays, no optimizer state), an Orbax checkpoint

Orbax's StandardCheckpointer stores every array with its shape and dtype, so :func:`load_export` can
restore straight onto any sharding (one device, or a mesh built by fastblt.sharding) and cast to a serving
dtype on the way, without first materialising the whole tree on one host.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax.linen import meta

from fastblt.config import DTYPES, ConfigError, ModelConfig, model_config_from_dict, upgrade_model

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"

__all__ = [
    "FORMAT_VERSION",
    "ExportError",
    "abstract_params",
    "expected_param_shapes",
    "load_export",
    "load_export_config",
    "param_count",
    "save_export",
]


class ExportError(ConfigError):
    """An export directory is malformed or its parameters disagree with its config.json."""


# ---------------------------------------------------------------------------------------------------------
# Shapes.
# ---------------------------------------------------------------------------------------------------------


def _shape_table(tree: Any) -> dict[str, tuple[int, ...]]:
    """``{"local_encoder/layers_0/attention/wq/kernel": shape}`` for every array-like leaf."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): tuple(leaf.shape) for path, leaf in leaves
    }


def abstract_params(config: ModelConfig) -> Any:
    """The parameter pytree ``fastblt.model.BLT(config)`` creates, as ShapeDtypeStructs (nothing allocated)."""
    from fastblt.model import abstract_params as model_abstract_params  # lazy: pulls in Flax

    return model_abstract_params(config)


def expected_param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """``{"local_encoder/layers_0/attention/wq/kernel": shape}`` for every parameter of ``BLT(config)``."""
    return _shape_table(abstract_params(config))


def _check_shapes(config: ModelConfig, found: dict[str, tuple[int, ...]], where: str) -> None:
    """Raises ExportError listing (the first few) missing, unexpected and mis-shaped parameters."""
    expected = expected_param_shapes(config)
    groups = {
        "missing": [f"{p} {expected[p]}" for p in sorted(expected.keys() - found.keys())],
        "unexpected": [f"{p} {found[p]}" for p in sorted(found.keys() - expected.keys())],
        "with other shapes": [
            f"{p} is {found[p]}, the config implies {expected[p]}"
            for p in sorted(expected.keys() & found.keys())
            if found[p] != expected[p]
        ],
    }
    parts = [
        f"{len(items)} {kind}: {', '.join(items[:3])}{', ...' if len(items) > 3 else ''}"
        for kind, items in groups.items()
        if items
    ]
    if parts:
        raise ExportError(
            f"{where} do not match the model config ({'; '.join(parts)}). "
            f"Were they written for another config?"
        )


# ---------------------------------------------------------------------------------------------------------
# Saving.
# ---------------------------------------------------------------------------------------------------------


def _check_dtype(dtype: str | None, argument: str) -> None:
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"{argument}={dtype!r} is not one of {DTYPES}")


def _cast_floats(tree: Any, dtype: str | None) -> Any:
    """Casts floating-point leaves to ``dtype`` (ints and bools are kept)."""
    if dtype is None:
        return tree

    def cast(x: Any) -> Any:
        x = x if hasattr(x, "dtype") else np.asarray(x)
        return x.astype(jnp.dtype(dtype)) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree.map(cast, tree)


def _sync(name: str) -> None:
    """A barrier across JAX processes (a no-op on one host)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def save_export(
    dst: str | Path,
    config: ModelConfig,
    params: Any,
    dtype: str | None = None,
    *,
    overwrite: bool = False,
    check_shapes: bool = True,
) -> Path:
    """Writes ``config`` and ``params`` as an export directory at ``dst``; returns its absolute path.

    Args:
      dst: the export directory. An existing non-empty ``dst`` is only replaced with ``overwrite=True``.
      config: the model config the parameters belong to.
      params: the parameter pytree (``variables["params"]``; Flax partitioning boxes are removed).
      dtype: cast floating-point parameters to this dtype (e.g. ``"bfloat16"``); None keeps them.
      overwrite: replace an existing export at ``dst``.
      check_shapes: refuse parameters whose shapes differ from what ``BLT(config)`` creates.

    The export is written to a hidden sibling directory and renamed into place at the end, so a crash
    never leaves a half-written export at ``dst``. Every JAX process must call this (Orbax writes each
    process's shards); process 0 writes config.json and does the renames.
    """
    _check_dtype(dtype, "dtype")
    dst = Path(dst).expanduser().absolute()
    if (dst.is_dir() and any(dst.iterdir())) or (dst.exists() and not dst.is_dir()):
        if not overwrite:
            raise FileExistsError(
                f"{dst} already exists and is not empty; choose another destination or pass "
                f"overwrite=True (--overwrite on the command line) to replace it"
            )
    params = _cast_floats(meta.unbox(params), dtype)
    if check_shapes:
        _check_shapes(config, _shape_table(params), "the parameters to export")

    # Names are deterministic so that every process of a multi-host job agrees on them.
    tmp = dst.with_name(f".{dst.name}.partial")
    old = dst.with_name(f".{dst.name}.old")
    primary = jax.process_index() == 0
    if primary:
        _remove(tmp)  # left over from a crashed export
        tmp.mkdir(parents=True)
        text = json.dumps({"format_version": FORMAT_VERSION, **config.to_dict()}, indent=2)
        (tmp / CONFIG_FILE).write_text(text + "\n")
    _sync("fastblt_export_begin")
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(tmp / PARAMS_DIR, params)
        # Leaving the context waits for the asynchronous write to finish.
        _sync("fastblt_export_written")
        if primary:
            if dst.exists() or dst.is_symlink():
                _remove(old)
                dst.rename(old)
            tmp.rename(dst)
            _remove(old)
    except BaseException:
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _sync("fastblt_export_done")
    return dst


# ---------------------------------------------------------------------------------------------------------
# Loading.
# ---------------------------------------------------------------------------------------------------------


def load_export_config(src: str | Path) -> ModelConfig:
    """Reads and validates ``src/config.json``; raises naming the file and the bad key."""
    src = Path(src).expanduser()
    if not src.is_dir():
        raise FileNotFoundError(
            f"no export directory at {src}; write one with save_export() or "
            f"`fastblt convert hf-to-orbax --src HF_DIR --dst {src}`"
        )
    path = src / CONFIG_FILE
    if not path.is_file():
        raise ExportError(
            f"{path} is missing: {src} is not a fastblt export (expected {CONFIG_FILE} + params/)"
        )
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(values, Mapping):
        raise ExportError(f"{path} must hold a JSON object, got {type(values).__name__}")
    values = dict(values)
    version = values.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise ExportError(
            f"{path}: format_version is {version!r}; this fastblt reads version {FORMAT_VERSION}. "
            f"Re-export the model with this version of fastblt"
        )
    try:  # an export of an older fastblt lacks the keys added since (fastblt/config/saved.py)
        return model_config_from_dict(upgrade_model(values), prefix="")
    except ConfigError as e:
        raise ExportError(f"{path}: {e}") from None


def _restore_target(metadata: Any, shardings: Any, dtype: str | None, where: Path) -> Any:
    """Abstract arrays (shape, dtype, sharding) telling Orbax what to restore and where."""
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, metadata)
    try:
        return jax.tree.map(
            lambda m, s: jax.ShapeDtypeStruct(
                m.shape,
                jnp.dtype(dtype) if dtype and jnp.issubdtype(m.dtype, jnp.floating) else m.dtype,
                sharding=s,
            ),
            metadata,
            shardings,
        )
    except ValueError as e:
        raise ValueError(
            f"shardings must be one jax.sharding.Sharding or a pytree of them shaped like the "
            f"parameters at {where}: {e}"
        ) from None


def load_export(
    src: str | Path,
    shardings: Any = None,
    dtype: str | None = None,
    *,
    check_shapes: bool = True,
) -> tuple[ModelConfig, Any]:
    """Reads an export directory written by :func:`save_export`.

    Args:
      src: the export directory.
      shardings: where to place the parameters: None (the first local device), one Sharding for every
        array, or a pytree of Shardings shaped like the parameters (e.g. FSDP shardings of a mesh).
      dtype: cast floating-point parameters to this dtype while restoring; None keeps the stored dtype.
      check_shapes: compare the stored shapes with what ``BLT(config)`` creates before reading any data.

    Returns:
      ``(config, params)``; ``params`` is the plain parameter pytree for ``BLT(config).apply``.

    Raises:
      FileNotFoundError: ``src`` does not exist.
      ExportError: config.json or params/ is missing or invalid, or the shapes disagree with the config.
    """
    _check_dtype(dtype, "dtype")
    src = Path(src).expanduser().absolute()
    config = load_export_config(src)
    params_dir = src / PARAMS_DIR
    if not params_dir.is_dir():
        raise ExportError(f"{params_dir} is missing: the export at {src} has a config but no parameters")
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            metadata = checkpointer.metadata(params_dir).item_metadata
        except (OSError, ValueError, KeyError) as e:
            raise ExportError(f"cannot read the Orbax checkpoint at {params_dir}: {e}") from None
        metadata = getattr(metadata, "tree", metadata)
        if check_shapes:
            _check_shapes(config, _shape_table(metadata), f"the parameters at {params_dir}")
        target = _restore_target(metadata, shardings, dtype, params_dir)
        params = checkpointer.restore(params_dir, target)
    return config, params


def param_count(params: Any) -> int:
    """Number of scalars in a parameter pytree."""
    return sum(math.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(params))
