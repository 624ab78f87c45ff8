"""Experiment configs: load an ``experiments/<name>.py`` file, apply ``key=value`` overrides, validate.

An experiment is a Python file with a big_vision-style ``get_config()`` (or ``get_config(arg)``) that
returns an ml-collections ``ConfigDict``. A spec names it by path or by bare name, optionally with an
argument string for ``get_config``::

    load_config("experiments/tiny.py")                  # a path
    load_config("tiny")                                 # experiments/tiny.py, searched for (see below)
    load_config("blt_1b:runlocal")                      # get_config("runlocal")
    load_config("tiny", ["model.encoder.n_heads=2", "optimizer.lr=1e-3"])

The ``model`` section (a BLT) and the ``entropy_model`` section (an entropy model trained on its own) are
validated at load through :func:`fastblt.config.model_config_from_dict`, so an inconsistent config fails
before any compilation, with the dotted key in the message.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import inspect
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from fastblt.config import ConfigError, EntropyModelConfig, ModelConfig, model_config_from_dict

__all__ = [
    "apply_override",
    "available_experiments",
    "entropy_model_config",
    "experiment_dirs",
    "load_config",
    "model_config",
    "parse_arg",
    "resolve_experiment",
]


# ---------------------------------------------------------------------------------------------------------
# Finding experiment files.
# ---------------------------------------------------------------------------------------------------------


def experiment_dirs() -> list[Path]:
    """Directories searched for bare experiment names, in order.

    ``experiments/`` next to the package (a source checkout or an editable install), then ``experiments/``
    under the current directory (a regular install run from a checkout).
    """
    candidates = [Path(__file__).resolve().parent.parent / "experiments", Path.cwd() / "experiments"]
    found: list[Path] = []
    for d in candidates:
        if d.is_dir() and d.resolve() not in found:
            found.append(d.resolve())
    return found


def available_experiments() -> list[str]:
    """Bare names (``tiny``, ``benchmarks/foo``) of the experiment files that define ``get_config``."""
    names: set[str] = set()
    for root in experiment_dirs():
        for path in root.rglob("*.py"):
            if path.name.startswith("_") or "def get_config" not in path.read_text(errors="replace"):
                continue
            names.add(path.relative_to(root).with_suffix("").as_posix())
    return sorted(names)


def resolve_experiment(name_or_path: str) -> Path:
    """The file behind ``tiny`` or ``path/to/exp.py``; raises ConfigError naming what was tried."""
    if name_or_path.endswith(".py"):
        path = Path(name_or_path).expanduser()
        if path.is_file():
            return path.resolve()
        tried = [path]
    else:
        tried = [d / f"{name_or_path}.py" for d in experiment_dirs()]
        for path in tried:
            if path.is_file():
                return path.resolve()
    names = ", ".join(available_experiments()) or "(none found)"
    where = " or ".join(str(p) for p in tried) or f"experiments/{name_or_path}.py (no experiments/ found)"
    raise ConfigError(
        f"no experiment config at {where}; pass a path to a .py file or one of the experiment names: {names}"
    )


def _import_experiment(path: Path) -> types.ModuleType:
    """Imports an experiment file so that ``from experiments import base`` inside it works.

    A file inside a package (``experiments/__init__.py`` exists) is imported under its dotted name with
    the package's parent on ``sys.path``; a lone file is executed under a private module name.
    """
    parts = [path.stem]
    root = path.parent
    while (root / "__init__.py").is_file():
        parts.insert(0, root.name)
        root = root.parent
    if len(parts) == 1:
        spec = importlib.util.spec_from_file_location(f"_fastblt_experiment_{path.stem}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    module = importlib.import_module(".".join(parts))
    # Another package with the same top-level name earlier on sys.path would silently win.
    if Path(module.__file__ or "").resolve() != path:
        raise ConfigError(
            f"importing {path} as {module.__name__!r} found {module.__file__} instead; another "
            f"{parts[0]!r} package shadows it on sys.path: pass the experiment by its full path or "
            f"run from the repository root"
        )
    return module


# ---------------------------------------------------------------------------------------------------------
# Values: experiment arguments and overrides.
# ---------------------------------------------------------------------------------------------------------


def _parse_value(raw: str) -> Any:
    """A Python literal (``4``, ``3e-4``, ``(3, 4)``, ``None``, ``'x'``), ``true``/``false``, else the string."""
    text = raw.strip()
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    closers = {"[": "]", "(": ")", "{": "}", "'": "'", '"': '"'}
    if text[:1] in closers and not text.endswith(closers[text[0]]):
        # A list, tuple, dict or quoted string cut short (shell quoting, a missing bracket).
        raise ConfigError(
            f"value {text!r} opens a Python literal but does not parse; quote the whole override for "
            f'the shell, e.g. --set \'data.paths=["a.txt", "b.txt"]\''
        )
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    return text  # paths, dtype names and other bare words


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses a big_vision-style experiment argument such as ``"runlocal,steps=100"``.

    Every key must be one of ``defaults``; a bare key sets it to True; values are typed by the default.
    Experiment files call this from ``get_config(arg)``.
    """
    result = ml_collections.ConfigDict(defaults)
    for item in filter(None, (s.strip() for s in (arg or "").split(","))):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if key not in defaults:
            valid = ", ".join(sorted(defaults)) or "(this experiment takes none)"
            raise ConfigError(f"unknown experiment argument {key!r} in {arg!r}; valid arguments: {valid}")
        value = _parse_value(raw) if sep else True
        try:
            result[key] = value
        except TypeError:
            raise ConfigError(
                f"experiment argument {key}={raw!r}: expected {type(defaults[key]).__name__} "
                f"like the default {defaults[key]!r}"
            ) from None
    return result


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
    """Applies one ``dotted.key=value`` override in place; ConfigDict checks the value's type."""
    dotted, sep, raw = override.partition("=")
    dotted = dotted.strip()
    if not sep or not dotted:
        raise ConfigError(f"override {override!r} must look like key=value, e.g. optimizer.lr=3e-4")
    parts = dotted.split(".")
    node = config
    for depth, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            level = ".".join(parts[:depth]) or "the top level"
            if isinstance(node, ml_collections.ConfigDict):
                detail = f"valid keys under {level}: {', '.join(sorted(node.keys()))}"
            else:
                detail = f"{level} is {node!r}, not a section"
            raise ConfigError(f"unknown config key {dotted}; {detail}")
        if depth < len(parts) - 1:
            node = node[part]
    leaf = parts[-1]
    value = _parse_value(raw)
    try:
        node[leaf] = value
    except TypeError:
        current = node[leaf]
        if isinstance(current, ml_collections.ConfigDict):
            expected = f"a section with keys {', '.join(sorted(current.keys()))}"
        else:
            expected = f"{type(current).__name__} (current value {current!r})"
        raise ConfigError(
            f"{dotted}={raw.strip()}: expected {expected}, got {type(value).__name__}"
        ) from None


# ---------------------------------------------------------------------------------------------------------
# Validation.
# ---------------------------------------------------------------------------------------------------------


def _check_value(hint: Any, value: Any, key: str) -> None:
    """Raises ConfigError if ``value`` does not fit the dataclass annotation ``hint``."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None and len(options) < len(typing.get_args(hint)):
            return
        hint = options[0]
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping | ml_collections.ConfigDict):  # a ConfigDict is no Mapping
            raise ConfigError(f"{key} must be a section of keys, got {value!r}")
        _check_types(hint, value, f"{key}.")
        return
    if typing.get_origin(hint) is tuple:
        ok = isinstance(value, list | tuple) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        )
        expected = "a list of ints"
    elif hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        expected = "a number"
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        expected = "an int"
    else:
        ok = isinstance(value, hint)
        expected = hint.__name__
    if not ok:
        raise ConfigError(f"{key} must be {expected}, got {value!r}")


def _check_types(cls: type, values: Mapping[str, Any], prefix: str) -> None:
    """Type-checks a model section against the dataclass annotations.

    ConfigDict only type-checks fields whose default is not None; this also covers the optional ones
    (``n_kv_heads``, ``window``, ``max_patches``...), which would otherwise fail later without a key.
    Unknown keys are left to :func:`model_config_from_dict`, which names them.
    """
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key in hints:
            _check_value(hints[key], value, f"{prefix}{key}")


def _validate(config: ml_collections.ConfigDict) -> None:
    if "model" not in config and "entropy_model" not in config:
        raise ConfigError(
            "the config has neither a `model` section (a BLT) nor an `entropy_model` section (an entropy "
            "model trained alone); start from experiments/base.py"
        )
    if "model" in config:
        model_config(config)
        if "objective" in config:
            objective_config(config)
    if "entropy_model" in config:
        entropy_model_config(config)
    _validate_training(config)
    if "model" in config and "data" in config and "seq_len" in config.data:
        seq_len, max_bytes = config.data.seq_len, config.model.max_bytes
        if seq_len > max_bytes:
            raise ConfigError(
                f"data.seq_len: {seq_len} bytes exceed model.max_bytes ({max_bytes}); "
                f"lower data.seq_len or raise model.max_bytes"
            )


def _validate_training(config: ml_collections.ConfigDict) -> None:
    """Values of the training sections that cannot work (checked at load, so `fastblt config` shows them)."""

    def get(section: str, key: str) -> Any:
        return config[section][key] if section in config and key in config[section] else None

    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{key}: {msg}")

    lr = get("optimizer", "lr")
    if lr is not None:
        need(lr > 0, "optimizer.lr", f"must be > 0 (a negative rate ascends the loss), got {lr}")
    for section, key in (
        ("train", "steps"),
        ("train", "log_every"),
        ("train", "eval_every"),
        ("train", "grad_accum"),
        ("checkpoint", "save_every"),
        ("checkpoint", "keep"),
        ("data", "batch_size"),
    ):
        value = get(section, key)
        if value is not None:
            need(value >= 1, f"{section}.{key}", f"must be >= 1, got {value}")
    mode = get("train", "on_nonfinite")
    if mode is not None:
        need(mode in ("stop", "skip"), "train.on_nonfinite", f"must be 'stop' or 'skip', got {mode!r}")
    skips = get("train", "max_nonfinite_skips")
    if skips is not None:
        need(skips >= 0, "train.max_nonfinite_skips", f"must be >= 0, got {skips}")
    warmup = get("optimizer", "warmup_steps")
    if warmup is not None:
        need(warmup >= 0, "optimizer.warmup_steps", f"must be >= 0, got {warmup}")
    batch, accum = get("data", "batch_size"), get("train", "grad_accum")
    if batch is not None and accum is not None:
        need(
            batch % accum == 0,
            "train.grad_accum",
            f"{accum} micro-batches do not divide data.batch_size={batch}",
        )
    _validate_mesh(config, batch)
    entropy_ckpt = get("entropy_stage", "checkpoint")
    if entropy_ckpt and "://" not in str(entropy_ckpt):
        need(
            Path(entropy_ckpt).expanduser().is_dir(),
            "entropy_stage.checkpoint",
            f"{entropy_ckpt} is not a directory: name a trained entropy model's workdir, or leave it empty "
            "to train one in stage 1",
        )


def _validate_mesh(config: ml_collections.ConfigDict, batch: int | None) -> None:
    """The mesh section's shape (the device count is checked where the mesh is built: a config may
    be written for other machines), and the batch over its data-parallel axes when they are fixed."""
    if "mesh" not in config:
        return
    sizes = {}
    for axis in ("data", "fsdp", "tensor"):
        v = config.mesh.get(axis, 1)
        if not isinstance(v, int) or isinstance(v, bool) or not (v >= 1 or v == -1):
            raise ConfigError(f"mesh.{axis}: must be a positive int or -1 (all remaining devices), got {v!r}")
        sizes[axis] = v
    if list(sizes.values()).count(-1) > 1:
        raise ConfigError(f"mesh: at most one axis may be -1, got {sizes}")
    ways = sizes["data"] * sizes["fsdp"]
    if batch is not None and ways > 0 and batch % ways:
        raise ConfigError(
            f"data.batch_size: {batch} rows do not split over the mesh's {ways} data-parallel ways "
            f"(mesh.data x mesh.fsdp = {sizes['data']} x {sizes['fsdp']}); use a multiple of {ways}"
        )


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """The validated, frozen ModelConfig of an experiment's ``model`` section."""
    if "model" not in config:
        raise ConfigError(f"the config has no `model` section; its sections: {', '.join(sorted(config))}")
    _check_value(ModelConfig, config.model, "model")
    values = config.model.to_dict() if hasattr(config.model, "to_dict") else config.model
    return model_config_from_dict(values, prefix="model.")


def objective_config(config: ml_collections.ConfigDict) -> Any:
    """The validated training objective (``objective`` section; absent: next-byte)."""
    from fastblt.train.blt_d import objective_config as build  # lazy: imports jax

    return build(config.get("objective"), model_config(config))


def entropy_model_config(config: ml_collections.ConfigDict) -> EntropyModelConfig:
    """The validated EntropyModelConfig of an entropy-model experiment (``entropy_model`` section)."""
    if "entropy_model" not in config:
        raise ConfigError(
            f"the config has no `entropy_model` section; its sections: {', '.join(sorted(config))}"
        )
    section = config.entropy_model
    _check_value(EntropyModelConfig, section, "entropy_model")
    values = section.to_dict() if hasattr(section, "to_dict") else dict(section)
    # The section is validated as the entropy model of a BLT (prefix "" keeps its keys as the user
    # wrote them: entropy_model.n_heads); the rest of that BLT is the valid default.
    built = model_config_from_dict({"entropy_model": values}, prefix="")
    assert built.entropy_model is not None
    return built.entropy_model


# ---------------------------------------------------------------------------------------------------------
# Loading.
# ---------------------------------------------------------------------------------------------------------


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads an experiment config, applies ``key=value`` overrides, validates it and locks it.

    Args:
      spec: ``path/to/exp.py`` or a bare name (``tiny``), optionally followed by ``:arg`` which is passed
        to ``get_config(arg)``.
      overrides: ``dotted.key=value`` strings; values are Python literals (strings may be bare).

    Returns:
      The ConfigDict, locked (reading or setting an unknown key raises; ``with cfg.unlocked():`` to add).

    Raises:
      ConfigError: a missing file (listing the available names), an unknown key (listing the valid keys at
        that level), a value of the wrong type, or an invalid model (naming the dotted key).
    """
    name, sep, arg = spec.partition(":")
    path = resolve_experiment(name)
    module = _import_experiment(path)
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigError(f"{path} defines no get_config(); an experiment file must return its ConfigDict")
    takes_arg = bool(inspect.signature(get_config).parameters)
    if sep and not takes_arg:
        raise ConfigError(f"{path}: get_config() takes no argument, but the spec {spec!r} passes {arg!r}")
    config = get_config(arg if sep else None) if takes_arg else get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config() returned {type(config).__name__}, not a ConfigDict")
    for override in overrides:
        apply_override(config, override)
    _validate(config)
    config.lock()
    return config
