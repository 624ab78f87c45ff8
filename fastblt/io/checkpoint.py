"""Training checkpoints: a thin layer over Orbax's v0 ``CheckpointManager``.

Layout of ``<workdir>/checkpoints/<step>/``, one Orbax item per subdirectory:

    state/   the training state pytree (params, optimizer state, step, rng...), ``StandardSave``
    data/    the grain ``DatasetIterator`` position (one small JSON per process); only when the
             caller passes an iterator
    meta/    a JSON dict: whatever the caller passes, e.g. :func:`config_meta` (the model config
             and its fingerprint)

The manager is created with these named items from the start (an Orbax manager first used with an
unnamed item later rejects ``Composite`` args). Retention: the newest ``keep`` checkpoints plus,
forever, every step divisible by ``keep_every`` (Orbax preservation policies ``LatestN`` +
``EveryNSteps``). Saves are asynchronous by default: ``save`` returns once the arrays are copied
off the devices, so the next (donating) train step may start; ``wait`` blocks until the files are
committed.

Preemption: :meth:`Checkpointer.install_preemption_handler` turns SIGTERM (and optionally SIGINT)
into a flag; the train loop polls :meth:`Checkpointer.preemption_requested`, saves with
``force=True`` and exits. With several JAX processes every process must stop at the same step:

* if ``jax.distributed`` runs JAX's preemption service (the default), JAX itself catches SIGTERM
  and agrees on a step; pass ``step`` to ``preemption_requested(step)`` on every step and it asks
  ``multihost_utils.reached_preemption_sync_point``. Our SIGTERM handler is then not installed,
  because it would replace JAX's.
* otherwise the local flags are OR-ed across processes with ``process_allgather`` (a tiny
  collective on each call; every process must call it at the same steps). With JAX's service
  only SIGTERM is agreed on: a SIGINT on one process then stops nobody (a second one aborts it).

Errors name the step and the remedy: :class:`CheckpointMismatchError` (tree structure or leaf
shapes differ from the abstract state), :class:`CorruptCheckpointError` (files missing or
unreadable; other steps are never touched), :class:`ConfigMismatchError` (the model config differs
from the one the checkpoint was written with).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from fastblt.errors import (  # noqa: F401  (re-exported: callers import them from here)
    CheckpointError,
    CheckpointMismatchError,
    ConfigMismatchError,
    CorruptCheckpointError,
)

log = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"
STATE, DATA, META = "state", "data", "meta"

# Model-config keys that change neither the parameters nor what they compute: the compute dtype,
# the attention kernel and buffer limits. They are left out of the fingerprint so that a run may
# resume in bf16, with cuDNN attention or with longer rows.
RUNTIME_KEYS = frozenset(
    {
        "dtype",
        "attention_impl",
        "remat",
        "remat_policy",
        "scan_layers",
        "scan_decode_layers",
        "entropy_model.dtype",
        "max_bytes",
        "max_global_patches",
    }
)


# --------------------------------------------------------------------------- model-config meta


def _config_dict(config: Any) -> dict[str, Any]:
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise TypeError(f"expected a ModelConfig or a mapping of config keys, got {type(config).__name__}")
    return json.loads(json.dumps(dict(config)))  # JSON-normalised: tuples -> lists, keys -> str


def _architecture(config: Any) -> dict[str, Any]:
    """``{"a.b.c": leaf}`` of the JSON-normalised config, less :data:`RUNTIME_KEYS`; lists are leaves.

    An empty sub-mapping stays, as ``{}``: fingerprints stored in checkpoints were computed so.
    """
    flat = traverse_util.flatten_dict(_config_dict(config), keep_empty_nodes=True, sep=".")
    return {k: {} if v is traverse_util.empty_node else v for k, v in flat.items() if k not in RUNTIME_KEYS}


def config_fingerprint(config: Any) -> str:
    """A short hash of a model config (ModelConfig or dict) without :data:`RUNTIME_KEYS`."""
    blob = json.dumps(_architecture(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def config_meta(config: Any, **extra: Any) -> dict[str, Any]:
    """The "meta" dict to pass to :meth:`Checkpointer.save`: the model config and its fingerprint."""
    return {"model_config": _config_dict(config), "config_fingerprint": config_fingerprint(config), **extra}


def check_config(meta: Mapping[str, Any], config: Any, step: int | None = None) -> None:
    """Raises ConfigMismatchError listing the keys where ``config`` differs from ``meta``'s.

    A meta without ``model_config`` (written by a caller that stored none) is accepted.
    """
    saved = meta.get("model_config")
    if saved is None:
        return
    if meta.get("config_fingerprint") == config_fingerprint(config):
        return
    old, new = _architecture(saved), _architecture(config)
    missing = object()
    diffs = [
        f"model.{k}: checkpoint {old.get(k, missing)!r}, current {new.get(k, missing)!r}".replace(
            repr(missing), "<absent>"
        )
        for k in sorted(set(old) | set(new))
        if old.get(k, missing) != new.get(k, missing)
    ]
    if not diffs:  # the fingerprint scheme changed, the configs did not
        return
    where = f"checkpoint step {step}" if step is not None else "the checkpoint"
    raise ConfigMismatchError(
        f"{where} was written with a different model config ({len(diffs)} key(s) differ):\n  "
        + "\n  ".join(diffs)
        + "\nRestore with the checkpoint's config (its meta item holds it) or train in a fresh workdir."
    )


# --------------------------------------------------------------------------- preemption

_SIGNALLED = threading.Event()  # this process received a signal

# Exit status of `fastblt train` after a preemption save (EX_TEMPFAIL): the run is unfinished and
# resumes from the checkpoint it just wrote. Launchers read it as "requeue", not as a failure.
PREEMPTED_EXIT = 75
_AGREED = threading.Event()  # all processes agreed to stop (latched at the same call everywhere)
_OLD_HANDLERS: dict[int, Any] = {}


def _jax_preemption_service_active() -> bool:
    """True when jax.distributed runs JAX's preemption sync manager (it owns SIGTERM then)."""
    try:
        from jax._src import distributed  # private, but the only way to ask

        return distributed.global_state.preemption_sync_manager is not None
    except Exception:  # any failure means "not available"
        return False


def _on_signal(signum: int, frame: Any) -> None:
    if signum == signal.SIGINT and _SIGNALLED.is_set():
        raise KeyboardInterrupt  # a second Ctrl-C aborts without waiting for the save
    _SIGNALLED.set()
    log.warning(
        "received %s: saving a checkpoint and stopping at the end of this step", signal.Signals(signum).name
    )


def install_preemption_handler(sigint: bool = False) -> list[str]:
    """Makes SIGTERM (and SIGINT if ``sigint``) set the preemption flag instead of killing.

    Call from the main thread. SIGTERM is left to JAX when its preemption service runs (multi-
    process ``jax.distributed``). Returns the names of the signals now handled;
    :func:`uninstall_preemption_handler` puts the previous handlers back.
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("install_preemption_handler must be called from the main thread (Python signals)")
    wanted = [signal.SIGTERM] + ([signal.SIGINT] if sigint else [])
    if _jax_preemption_service_active():
        wanted.remove(signal.SIGTERM)
        log.info("JAX's preemption service handles SIGTERM; pass step= to preemption_requested")
    for sig in wanted:
        old = signal.signal(sig, _on_signal)
        _OLD_HANDLERS.setdefault(int(sig), old)
    return [s.name for s in wanted]


def uninstall_preemption_handler() -> None:
    """Restores the handlers replaced by :func:`install_preemption_handler` and clears the flag."""
    for sig, old in list(_OLD_HANDLERS.items()):
        signal.signal(sig, old)
        del _OLD_HANDLERS[sig]
    _SIGNALLED.clear()
    _AGREED.clear()


def preemption_requested(step: int | None = None) -> bool:
    """Whether the run should save and stop; agreed by all processes in multi-process runs.

    Single process: whether a handled signal arrived. Several processes (every process must call
    this at the same steps, it may run a collective): JAX's preemption sync point when its service
    runs and ``step`` is given (call it on every step), else the processes' signal flags OR-ed with
    ``process_allgather``. Once True it stays True, on every process from the same call on.
    """
    if _AGREED.is_set():
        return True
    if jax.process_count() == 1:
        if _SIGNALLED.is_set():
            _AGREED.set()
        return _AGREED.is_set()
    from jax.experimental import multihost_utils

    if step is not None and _jax_preemption_service_active():
        stop = multihost_utils.reached_preemption_sync_point(int(step))
    else:
        stop = bool(np.any(multihost_utils.process_allgather(np.asarray(_SIGNALLED.is_set(), np.int32))))
    if stop:
        _AGREED.set()
    return _AGREED.is_set()


# --------------------------------------------------------------------------- tree comparison


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...] | None]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    out = {}
    for path, leaf in leaves:
        shape = getattr(leaf, "shape", None)
        if shape is None and isinstance(leaf, int | float | np.number | bool):
            shape = ()
        out[jax.tree_util.keystr(path, simple=True, separator=".")] = (
            tuple(shape) if shape is not None else None
        )
    return out


def describe_mismatch(stored: Any, wanted: Any, partial: bool = False) -> list[str]:
    """Differences between a stored metadata tree and an abstract state, one line per leaf
    (``partial``: the abstract state is a part of the stored one; leaves it lacks are not listed)."""
    have, want = _leaf_shapes(stored), _leaf_shapes(wanted)
    lines = [
        f"{p}: missing from the checkpoint (abstract state has shape {want[p]})"
        for p in want
        if p not in have
    ]
    lines += [
        f"{p}: in the checkpoint (shape {have[p]}) but not in the abstract state"
        for p in have
        if p not in want and not partial
    ]
    lines += [
        f"{p}: checkpoint shape {have[p]}, abstract state shape {want[p]}"
        for p in want
        if p in have and have[p] is not None and want[p] is not None and have[p] != want[p]
    ]
    return sorted(lines)


# --------------------------------------------------------------------------- the checkpointer


def _restore_part(directory: epath.Path, abstract: Any) -> Any:
    """The leaves of ``abstract`` (nested dicts of ShapeDtypeStructs) from a saved state item,
    read onto their shardings; the item's other leaves are not read."""
    reader = ocp.PyTreeCheckpointer()
    try:
        return reader.restore(
            directory,
            args=ocp.args.PyTreeRestore(
                item=abstract,
                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                partial_restore=True,
            ),
        )
    finally:
        reader.close()


def _preservation_policy(keep: int, keep_every: int | None) -> Any:
    cm = ocp.checkpoint_managers
    latest = cm.LatestN(n=keep)
    if keep_every is None:
        return latest
    return cm.AnyPreservationPolicy(policies=[latest, cm.EveryNSteps(interval_steps=keep_every)])


def _item_handlers() -> dict[str, Any]:
    handlers = {STATE: ocp.StandardCheckpointHandler(), META: ocp.JsonCheckpointHandler()}
    try:
        import grain  # optional: only needed to checkpoint data iterators

        handlers[DATA] = grain.checkpoint.CheckpointHandler()
    except ImportError:
        pass
    return handlers


def _grain_args(kind: str, data_iter: Any) -> Any:
    try:
        import grain
    except ImportError:
        raise CheckpointError(
            "checkpointing a data iterator needs grain: pip install grain (or pass data_iter=None)"
        ) from None
    return getattr(grain.checkpoint, kind)(data_iter)


class Checkpointer:
    """Saves and restores training checkpoints under ``<workdir>/checkpoints``.

    Args:
      workdir: the run directory (created if missing).
      save_every: ``save`` writes when ``step % save_every == 0`` (or when forced or preempted).
      keep: how many of the newest checkpoints to keep.
      keep_every: additionally keep every step divisible by this forever (a multiple of save_every).
      async_save: write in a background thread (``wait`` blocks until done).
    """

    def __init__(
        self,
        workdir: str | os.PathLike | epath.Path,
        save_every: int,
        keep: int,
        keep_every: int | None = None,
        async_save: bool = True,
    ) -> None:
        for name, value in (("save_every", save_every), ("keep", keep)):
            if not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"checkpoint.{name} must be an int >= 1, got {value!r}")
        if keep_every is not None:
            if not isinstance(keep_every, int | np.integer) or keep_every < 1:
                raise ValueError(f"checkpoint.keep_every must be an int >= 1 or None, got {keep_every!r}")
            if keep_every % save_every:
                lcm = math.lcm(keep_every, save_every)
                raise ValueError(
                    f"checkpoint.keep_every={keep_every} is not a multiple of checkpoint.save_every="
                    f"{save_every}: only every {lcm}th step would be kept; set keep_every to a multiple "
                    f"of save_every"
                )
        self.workdir = epath.Path(workdir)
        self.directory = self.workdir / CHECKPOINT_SUBDIR
        self.save_every, self.keep, self.keep_every = int(save_every), int(keep), keep_every
        if jax.process_index() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
        options = ocp.CheckpointManagerOptions(
            preservation_policy=_preservation_policy(self.keep, keep_every),
            enable_async_checkpointing=async_save,
            create=True,
        )
        handlers = _item_handlers()
        self._manager = ocp.CheckpointManager(
            self.directory, item_names=tuple(handlers), item_handlers=handlers, options=options
        )
        self._writing: int | None = None  # the newest step handed to the manager

    # -- listing
    def steps(self) -> list[int]:
        """The saved steps, oldest first (asynchronous saves in flight included)."""
        return sorted(int(s) for s in self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest saved step, or None if there is none."""
        return self._manager.latest_step()

    def step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    # -- preemption (module-level state: signals are per process)
    install_preemption_handler = staticmethod(install_preemption_handler)
    uninstall_preemption_handler = staticmethod(uninstall_preemption_handler)
    preemption_requested = staticmethod(preemption_requested)

    # -- save
    def should_save(self, step: int) -> bool:
        return step % self.save_every == 0 or preemption_requested(step)

    def save(
        self,
        step: int,
        state: Any,
        data_iter: Any = None,
        meta: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Saves ``state`` (and the iterator position and ``meta``) if due; returns whether it did.

        Due: ``step % save_every == 0``, ``force``, or a preemption was signalled. A step that is
        already saved is never overwritten (logged, returns False).
        """
        step = int(step)
        if not (force or self.should_save(step)):
            return False
        if step in self._manager.all_steps():
            log.warning("checkpoint step %d already exists in %s: not overwriting it", step, self.directory)
            return False
        items: dict[str, Any] = {
            STATE: ocp.args.StandardSave(state),
            META: ocp.args.JsonSave(dict(meta or {})),
        }
        if data_iter is not None:
            items[DATA] = _grain_args("CheckpointSave", data_iter)
        try:
            saved = bool(self._manager.save(step, args=ocp.args.Composite(**items), force=True))
        except Exception as e:
            raise self._save_failed(step, e) from e
        self._writing = step
        return saved

    def _save_failed(self, step: int | None, e: BaseException) -> CheckpointError:
        return CheckpointError(
            f"saving checkpoint step {step} in {self.directory} failed: {e}; the steps saved before it "
            "are intact (a later run resumes from the newest of them)"
        )

    def wait(self) -> None:
        """Blocks until every asynchronous save is committed to disk (a failed one raises
        CheckpointError naming its step)."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise self._save_failed(self._writing, e) from e

    def close(self) -> None:
        """Waits for pending saves and releases the manager's threads."""
        try:
            self.wait()
        finally:
            self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- restore
    def _corrupt(self, step: int, e: BaseException) -> CorruptCheckpointError:
        others = [s for s in self.steps() if s != step]
        hint = (
            f"`fastblt train` moves it aside and resumes from the newest readable step (saved steps: {others})"
            if others
            else f"move {self.step_dir(step)} away to start afresh"
        )
        msg = (str(e).splitlines() or [""])[0].split(" [tensorstore_spec")[0][:300]
        return CorruptCheckpointError(
            f"checkpoint step {step} in {self.directory} cannot be read; it may be corrupt or incomplete "
            f"({type(e).__name__}: {msg}). Nothing was deleted: {hint}."
        )

    def _mismatch(
        self, step: int, abstract_state: Any, partial: bool = False, cause: BaseException | None = None
    ) -> CheckpointError | None:
        """A mismatch error naming the leaves where the stored tree and ``abstract_state`` differ
        (None if they agree); a corrupt-checkpoint error (reporting ``cause`` if given) if the
        stored tree cannot be read."""
        try:
            stored = self._manager.item_metadata(step)[STATE]
        except Exception as e:  # unreadable metadata: the checkpoint is damaged
            return self._corrupt(step, cause or e)
        if stored is None:
            return self._corrupt(step, cause or ValueError("the state item has no metadata"))
        lines = describe_mismatch(getattr(stored, "tree", stored), abstract_state, partial)
        if not lines:
            return None
        shown = "\n  ".join(lines[:20]) + (f"\n  ... and {len(lines) - 20} more" if len(lines) > 20 else "")
        return CheckpointMismatchError(
            f"checkpoint step {step} in {self.directory} does not match the model/optimizer state "
            f"({len(lines)} difference(s)):\n  {shown}\n"
            "The run's config changed since this checkpoint was written: restore with the same model and "
            "optimizer config, or train in a fresh workdir."
        )

    def _explain_failure(
        self, step: int, abstract_state: Any, e: BaseException, partial: bool = False
    ) -> CheckpointError:
        """Turns an Orbax restore error into a mismatch error if the stored tree differs."""
        return self._mismatch(step, abstract_state, partial, e) or self._corrupt(step, e)

    def restore(
        self,
        step: int | None,
        abstract_state: Any,
        data_iter: Any = None,
        model_config: Any = None,
        partial: bool = False,
    ) -> tuple[Any, dict[str, Any]]:
        """Restores ``(state, meta)`` of ``step`` (None: the latest).

        Args:
          step: the step to restore, or None for the newest one.
          abstract_state: the state's pytree of ``jax.ShapeDtypeStruct`` (with ``.sharding``: arrays
            are read directly onto it, whatever sharding they were saved with) or of arrays.
          data_iter: a grain ``DatasetIterator`` to move to the saved position (in place), or None.
          model_config: if given, checked against the config stored in meta (ConfigMismatchError).
          partial: ``abstract_state`` is a part of the saved state, as nested dicts (e.g.
            ``{"train": {"params": ...}}`` for inference: the optimizer's values are never read;
            the stored metadata of every leaf is, to check the part against it).
        """
        if partial and data_iter is not None:
            raise CheckpointError("a partial restore reads part of the model state only: pass data_iter=None")
        available = self.steps()
        if step is None:
            if not available:
                raise CheckpointError(f"no checkpoint in {self.directory}: nothing to restore")
            step = available[-1]
        step = int(step)
        if step not in available:
            raise CheckpointError(
                f"no checkpoint for step {step} in {self.directory}; saved steps: {available}"
            )
        self._manager.wait_until_finished()
        step_dir = self.step_dir(step)
        items: dict[str, Any] = {} if partial else {STATE: ocp.args.StandardRestore(abstract_state)}
        has_meta = (step_dir / META).is_dir()
        if has_meta:
            items[META] = ocp.args.JsonRestore()
            if model_config is not None:
                # The stored config first: a changed key is named as such, not as the dozens of
                # parameter paths it moves.
                try:
                    meta = self._manager.restore(
                        step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()})
                    )
                except Exception as e:
                    raise self._corrupt(step, e) from e
                check_config(dict(meta[META] or {}), model_config, step)
        if data_iter is not None:
            self._check_data_item(step, step_dir / DATA)
            items[DATA] = _grain_args("CheckpointRestore", data_iter)
        try:
            restored = dict(self._manager.restore(step, args=ocp.args.Composite(**items))) if items else {}
            if partial:
                # Orbax's partial restore passes over a leaf the checkpoint lacks: check first.
                mismatch = self._mismatch(step, abstract_state, partial=True)
                if mismatch is not None:
                    raise mismatch
                restored[STATE] = _restore_part(step_dir / STATE, abstract_state)
        except CheckpointError:
            raise
        except Exception as e:
            raise self._explain_failure(step, abstract_state, e, partial) from e
        meta = dict(restored[META] or {}) if has_meta else {}
        if model_config is not None:
            check_config(meta, model_config, step)
        return restored[STATE], meta

    def restore_newest_good(
        self,
        abstract_state: Any,
        data_iter: Any = None,
        model_config: Any = None,
        log_fn: Any = None,
        move_aside: bool = True,
        partial: bool = False,
    ) -> tuple[int, Any, dict[str, Any]]:
        """Restores the newest step, or the one before it if the newest cannot be read.

        A newest step that cannot be read (:class:`CorruptCheckpointError`: truncated files,
        missing or broken metadata, an interrupted save) is reported through ``log_fn`` (default:
        the logger's warning) and, with ``move_aside`` (the trainer, which holds the workdir's
        lock), moved to ``checkpoints/<step>.corrupt-<UTC time>`` (never deleted); then the step
        before it is restored. Only one step is skipped: when that one fails too, the cause is
        likely not the files (a changed data config, a full device, a flaky filesystem) and the
        error is raised with nothing else moved. A mismatched config or state is not corruption
        and is raised as it is.
        """
        warn = log_fn or log.warning
        steps = self.steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}: nothing to restore")
        newest = steps[-1]
        try:
            state, meta = self.restore(newest, abstract_state, data_iter, model_config, partial)
            return newest, state, meta
        except CorruptCheckpointError as e:
            if len(steps) < 2:
                raise
            where = self._move_aside(newest) if move_aside else "left in place"
            warn(
                f"WARNING: checkpoint step {newest} cannot be restored ({e}); {where}; restoring step {steps[-2]}"
            )
        state, meta = self.restore(steps[-2], abstract_state, data_iter, model_config, partial)
        return steps[-2], state, meta

    def _move_aside(self, step: int) -> str:
        """Renames an unreadable step out of the manager's sight (process 0; all processes wait)."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = self.directory / f"{step}.corrupt-{stamp}"
        multi = jax.process_count() > 1
        if multi:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"fastblt-move-aside-{step}-before")
        if jax.process_index() == 0:
            self.step_dir(step).rename(aside)
        if multi:
            multihost_utils.sync_global_devices(f"fastblt-move-aside-{step}-after")
        self._manager.reload()  # the manager forgets the moved step
        return f"moved to {aside.name}" if not multi else f"moved to {step}.corrupt-* by process 0"

    def _check_data_item(self, step: int, data_dir: epath.Path) -> None:
        if not data_dir.is_dir():
            raise CheckpointError(
                f"checkpoint step {step} holds no data-iterator state ({data_dir} is missing): "
                "pass data_iter=None to restore the model state only (the data restarts from the beginning)"
            )
        n = jax.process_count()
        mine = data_dir / f"process_{jax.process_index()}-of-{n}.json"
        if not mine.exists():
            found = sorted(p.name for p in data_dir.glob("process_*.json"))
            raise CheckpointError(
                f"checkpoint step {step}: no data-iterator state for process {jax.process_index()} of {n} "
                f"(found {found}); the checkpoint was written by another number of processes: resume "
                "with that many, or pass data_iter=None to restart the data"
            )
