"""Logical axis names and the one place that maps them to mesh axes.

Model code names the axes of every parameter (``nn.with_logical_partitioning``) and main activation
(``nn.with_logical_constraint``) with the short logical table below; nothing else in the model knows
about meshes (a kernel XLA cannot partition asks :func:`activation_spec` where its inputs live).
Activation constraints are Flax's: no-ops unless a mesh and logical rules are in context, which :class:`MeshJit` sets around the train step's tracing, lowering and calls
(MaxText's ``with mesh, nn.logical_axis_rules(...)``), so the same model runs unsharded on one CPU
and in the sampler.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fastblt.config import MESH_AXES, ConfigError

# Logical axes used by the model. Parameters: embed, heads, kv_heads, mlp, vocab, hash_vocab,
# patch_embed, norm. Activations: batch, bytes, patches, embed, heads, vocab.
LOGICAL_AXES = (
    "batch",
    "bytes",
    "patches",
    "embed",
    "heads",
    "kv_heads",
    "mlp",
    "vocab",
    "hash_vocab",
    "patch_embed",
    "norm",
)

# Default rules for a (data, fsdp, tensor) mesh: batch over data+fsdp, parameters fully sharded
# over fsdp on their embed axis and split over tensor on heads/mlp/vocab (Megatron style). A mesh
# axis serves one dimension per array: in a [batch, bytes, embed] activation, embed is not
# sharded, since batch takes fsdp first.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("bytes", None),
    ("patches", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("hash_vocab", "tensor"),
    ("patch_embed", "tensor"),
    ("norm", None),
)


def logical_to_spec(names: Sequence[str | None], rules: Sequence[tuple[str, object]]) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec (Flax's translation: rules in order, a mesh axis
    at most once per spec, names without a free rule unsharded)."""
    return nn.logical_to_mesh_axes(tuple(names), tuple(rules))


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Sequence[tuple[str, object]] = DEFAULT_RULES) -> Iterator[None]:
    """The mesh and logical rules in context, so that ``nn.with_logical_constraint`` in the model
    emits sharding constraints. Enter it outside ``jax.jit`` (around tracing, lowering and every
    call of the jitted function: the context is part of jit's cache key); :class:`MeshJit` does."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(rules)):
        yield


class MeshJit:
    """``jax.jit(fn, **jit_kwargs)`` (shardings, donation) whose tracing, lowering and calls run
    inside :func:`activation_sharding` of one mesh, so the model's activation constraints apply."""

    def __init__(
        self, fn: Callable, mesh: Mesh, rules: Sequence[tuple[str, object]] = DEFAULT_RULES, **jit_kwargs: Any
    ):
        self.jitted = jax.jit(fn, **jit_kwargs)
        self.mesh = mesh
        self.rules = tuple(rules)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with activation_sharding(self.mesh, self.rules):
            return self.jitted(*args, **kwargs)

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        with activation_sharding(self.mesh, self.rules):
            return self.jitted.lower(*args, **kwargs)


# ----------------------------------------------------------------------------- meshes


def make_mesh(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices; one axis may be -1 (takes what is left).

    ``mesh_cfg`` has integer keys ``data``, ``fsdp``, ``tensor`` (the ``mesh`` config section).
    Axes are Auto (``jax.sharding.Mesh``): shardings come from jit's in/out shardings and the
    logical-axis constraints.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = [
        int(mesh_cfg.get(a, 1)) if hasattr(mesh_cfg, "get") else int(getattr(mesh_cfg, a)) for a in MESH_AXES
    ]
    if shape.count(-1) > 1:
        raise ConfigError(
            f"mesh: at most one of {MESH_AXES} may be -1, got {dict(zip(MESH_AXES, shape, strict=True))}"
        )
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if len(devices) % known:
            raise ConfigError(
                f"mesh: {len(devices)} devices are not divisible by {known} (the fixed mesh axes): "
                "change mesh.fsdp / mesh.tensor"
            )
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ConfigError(
            f"mesh {dict(zip(MESH_AXES, shape, strict=True))} needs {int(np.prod(shape))} devices, "
            f"{len(devices)} are present: set mesh.data=-1 or change mesh.fsdp / mesh.tensor"
        )
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES)


def check_batch(mesh: Mesh, batch_size: int) -> None:
    """Rows of a global batch must split evenly over the mesh's data-parallel axes (data x fsdp)."""
    ways = int(mesh.shape["data"] * mesh.shape["fsdp"])
    if batch_size % ways:
        raise ConfigError(
            f"data.batch_size: {batch_size} rows do not split over the {ways} data-parallel ways of this "
            f"mesh (data {mesh.shape['data']} x fsdp {mesh.shape['fsdp']} on {mesh.size} devices); "
            f"use a multiple of {ways} or set mesh.data / mesh.fsdp"
        )


def _even(spec: PartitionSpec, shape: Sequence[int], mesh_shape: Mapping[str, int]) -> PartitionSpec:
    """``spec`` with every dimension that its mesh axes do not divide evenly left unsharded."""
    out = list(spec)
    for dim, axes in enumerate(out):
        if axes is None:
            continue
        ways = int(np.prod([mesh_shape[a] for a in ((axes,) if isinstance(axes, str) else axes)]))
        if shape[dim] % ways:
            out[dim] = None
    return PartitionSpec(*out)


def activation_spec(names: Sequence[str | None], shape: Sequence[int]) -> tuple[Any, PartitionSpec] | None:
    """(mesh, PartitionSpec) of an activation with logical axes ``names`` and ``shape`` under the mesh
    and rules in context (:func:`activation_sharding`), for code that must place its work itself (a
    ``shard_map`` around a kernel XLA cannot partition); a dimension its mesh axes do not divide is
    left unsharded. None outside such a context (one device, the sampler)."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = nn.get_logical_axis_rules()
    if mesh.empty or not rules:
        return None
    return mesh, _even(logical_to_spec(names, rules), shape, mesh.shape)


def tree_shardings(
    logical_specs: Any,
    mesh: Mesh,
    rules: Sequence[tuple[str, object]] = DEFAULT_RULES,
    shapes: Any = None,
) -> Any:
    """NamedShardings for a tree of logical PartitionSpecs (from ``nn.get_partition_spec``).

    With ``shapes`` (a matching tree of arrays or ShapeDtypeStructs), a dimension that the mesh axes
    do not divide evenly (the 260-byte vocab over 8 ways, a 500002-row hash table over 4) is left
    replicated instead of failing: correct, if less memory-efficient for that one parameter.
    """

    def one(spec: Any, shape: tuple[int, ...] | None) -> NamedSharding:
        names = tuple(spec) if isinstance(spec, PartitionSpec) else ()
        mesh_spec = logical_to_spec(names, rules)
        return NamedSharding(mesh, mesh_spec if shape is None else _even(mesh_spec, shape, mesh.shape))

    is_leaf = lambda x: isinstance(x, PartitionSpec) or x is None  # noqa: E731
    if shapes is None:
        return jax.tree.map(lambda s: one(s, None), logical_specs, is_leaf=is_leaf)
    return jax.tree.map(lambda s, x: one(s, tuple(x.shape)), logical_specs, shapes, is_leaf=is_leaf)


def abstract_sharded(
    boxed: Any, mesh: Mesh, rules: Sequence[tuple[str, object]] = DEFAULT_RULES
) -> tuple[Any, Any]:
    """``(abstract, shardings)`` of a boxed abstract tree (``jax.eval_shape`` of an init with
    logical partitioning): unboxed ShapeDtypeStructs that carry their NamedShardings, and those
    shardings (:func:`tree_shardings` of the tree's logical specs)."""
    shapes = nn.meta.unbox(boxed)
    shardings = tree_shardings(nn.get_partition_spec(boxed), mesh, rules, shapes=shapes)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings
    )
    return abstract, shardings


def replicated(mesh: Mesh) -> NamedSharding:
    """The whole array on every device of ``mesh`` (frozen parameters, metrics)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules: Sequence[tuple[str, object]] = DEFAULT_RULES) -> NamedSharding:
    """Sharding of a [batch, bytes] array: batch over the data-parallel axes."""
    return NamedSharding(mesh, logical_to_spec(("batch", "bytes"), rules))


def global_batch(local: Any, sharding: NamedSharding) -> Any:
    """Assembles per-process numpy batches into global jax Arrays (works for one process too)."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local)
