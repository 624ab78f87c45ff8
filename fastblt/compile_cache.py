"""JAX's persistent compilation cache, on by default for generation.

A sampler program at BLT-1B shapes takes tens of seconds to compile; with the cache on, a second
``fastblt sample`` (or a new process calling ``fastblt.sampler.generate``) with the same method,
config and shapes loads it from disk instead. Where the cache lives, first match wins:

1. a directory passed explicitly (``generate(..., compilation_cache="/path")``,
   ``fastblt sample --compilation-cache /path``);
2. a directory JAX was already given (``JAX_COMPILATION_CACHE_DIR`` or
   ``jax.config.update("jax_compilation_cache_dir", ...)``): the default never replaces it;
3. ``$FASTBLT_COMPILATION_CACHE`` (``0``/``off`` turns the default off);
4. ``$XDG_CACHE_HOME/fastblt/jax``, else ``~/.cache/fastblt/jax``.

``compilation_cache=False`` (``--no-compilation-cache``) leaves JAX's setting as it is. An empty JAX
directory (``JAX_COMPILATION_CACHE_DIR=``) is off, as JAX means it (:func:`empty_jax_dir_is_off`). On the CPU
backend the default (3. and 4.) is not applied: with jaxlib 0.10.2, serializing and loading CPU
executables through the cache crashed processes (segfaults, tests/conftest.py); CPU programs compile
in seconds anyway. An explicit directory or JAX's own setting still applies there.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

ENV = "FASTBLT_COMPILATION_CACHE"
JAX_ENV = "JAX_COMPILATION_CACHE_DIR"
_OFF = ("0", "off", "false", "no", "")


def empty_jax_dir_is_off() -> None:
    """Before JAX is imported: an empty ``JAX_COMPILATION_CACHE_DIR`` becomes ``FASTBLT_COMPILATION_CACHE=0``.

    JAX reads an empty directory as no cache of its own, but still points XLA's autotuning cache at a
    directory relative to the working directory, which quietly made later "cold" compiles there warm
    (experiments/results/generate_speed.md, run 12). Unset, it is off for JAX, XLA and processes
    started from here; fastblt's default is turned off too, so "off" stays off. ``fastblt``'s commands
    call this first; :func:`use_compilation_cache` handles JAX's setting already read as "".
    """
    if os.environ.get(JAX_ENV) == "":
        del os.environ[JAX_ENV]
        os.environ.setdefault(ENV, "0")


def default_dir() -> Path:
    """``$XDG_CACHE_HOME/fastblt/jax`` (``~/.cache/fastblt/jax`` when XDG_CACHE_HOME is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastblt" / "jax"


def use_compilation_cache(where: bool | str | os.PathLike = True, platform: str | None = None) -> str | None:
    """Turns the persistent compilation cache on for this process (see the module docstring).

    Args: where: True (the default place), a directory, or False (leave JAX's setting alone);
      platform: the backend the programs are for (None: ``jax.default_backend()``).
    Returns: the cache directory in use, or None when there is none. A directory that cannot be
    created is a warning, not an error: generation works without the cache, only slower to start.
    """
    import jax

    current = jax.config.jax_compilation_cache_dir
    if current == "":  # off, as empty_jax_dir_is_off says: None, and no default over the user's "off"
        jax.config.update("jax_compilation_cache_dir", None)
        if where is True or where is False:
            return None
        current = None
    if where is False:
        return current or None
    if where is True:
        if current:
            return current
        if (platform or jax.default_backend()) == "cpu":
            return None
        env = os.environ.get(ENV)
        if env is not None and env.strip().lower() in _OFF:
            return None
        path = Path(env).expanduser() if env else default_dir()
    else:
        path = Path(where).expanduser()
    path = path.absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(13, "not writable")
    except OSError as e:
        keep = f"keeping {current}" if current else "compiling without a cache"
        warnings.warn(
            f"compilation cache {path} cannot be used ({e.strerror or e}); {keep} "
            f"(set {ENV} to a writable directory, or 0 to turn it off)",
            stacklevel=2,
        )
        return current or None
    path_s = str(path)
    if path_s != current:
        jax.config.update("jax_compilation_cache_dir", path_s)
        from jax.experimental.compilation_cache import compilation_cache

        compilation_cache.reset_cache()  # a cache opened on another directory is re-opened here
    return path_s
