"""Experiment files: load an ``experiments/<name>.py``, apply ``key=value`` overrides, validate.

An experiment is a Python file with a big_vision-style ``get_config()`` (or ``get_config(arg)``) that
returns an ml-collections ``ConfigDict``. A spec names it by path or by bare name, optionally with an
argument string for ``get_config``::

    load_config("experiments/tiny.py")                  # a path
    load_config("tiny")                                 # experiments/tiny.py, searched for (see below)
    load_config("blt_1b:runlocal")                      # get_config("runlocal")
    load_config("tiny", ["model.encoder.n_heads=2", "optimizer.lr=1e-3"])

The whole config is validated at load by :func:`fastblt.config.experiment_config` (every section, every
key: unknown, missing, mistyped or inconsistent keys fail before any compilation, with the dotted key in
the message); the ConfigDict returned is that validated form, locked.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import sys
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from fastblt.config.experiment import Experiment, config_dict, experiment_config
from fastblt.config.schema import ConfigError

__all__ = [
    "apply_override",
    "available_experiments",
    "experiment_dirs",
    "import_experiment",
    "load_config",
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
    candidates = [Path(__file__).resolve().parents[2] / "experiments", Path.cwd() / "experiments"]
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


def import_experiment(path: Path) -> types.ModuleType:
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
    """Applies one ``dotted.key=value`` override in place.

    The key must exist and a section may only be replaced by a mapping (or None); the value's type is
    left to :func:`fastblt.config.experiment_config`, the one place that checks types.
    """
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
    current = node[leaf]
    if isinstance(current, ml_collections.ConfigDict) and not (value is None or isinstance(value, Mapping)):
        raise ConfigError(
            f"{dotted}={raw.strip()}: expected a section with keys {', '.join(sorted(current.keys()))}, "
            f"got {type(value).__name__}"
        )
    with node.ignore_type():  # a type-safe ConfigDict of a hand-written experiment file
        node[leaf] = value


def _check_paths(experiment: Experiment) -> None:
    """Paths the run will read that must exist on this machine (not checked when a saved config is
    read back: the run that wrote it may have moved its inputs since)."""
    stage = experiment.entropy_stage
    if stage is not None and stage.checkpoint and "://" not in stage.checkpoint:
        if not Path(stage.checkpoint).expanduser().is_dir():
            raise ConfigError(
                f"entropy_stage.checkpoint: {stage.checkpoint} is not a directory: name a trained entropy "
                "model's workdir, or leave it empty to train one in stage 1"
            )


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
      The validated config as a ConfigDict (values normalised: floats where floats are expected), locked
      (reading or setting an unknown key raises). :func:`fastblt.config.experiment_config` turns it
      into the frozen Experiment the package reads.

    Raises:
      ConfigError: a missing file (listing the available names), an unknown or missing key (listing the
        valid keys at that level), a value of the wrong type, or an inconsistent config (naming the
        dotted key).
    """
    name, sep, arg = spec.partition(":")
    path = resolve_experiment(name)
    module = import_experiment(path)
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
    experiment = experiment_config(config)
    _check_paths(experiment)
    validated = config_dict(experiment)
    validated.lock()
    return validated
