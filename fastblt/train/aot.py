"""Ahead-of-time compilation of the sharded train step for a device topology, without its hardware.

``fastblt compile --config blt_1b --topology v5p-128`` builds the same :class:`fastblt.train.loop.Trainer`
that ``fastblt train`` builds, over a mesh of *compile-only* TPU devices that libtpu describes from
the topology name (``jax.experimental.topologies.get_topology_desc``, as MaxText's
``train_compile.py``), lowers its jitted train step on abstract arguments (ShapeDtypeStructs that
carry the shardings) and compiles it. XLA's ``memory_analysis()`` of the compiled step then says
what each chip needs: the arguments (parameters, optimizer state, batch and frozen entropy model),
the outputs (the new state, aliased to the donated arguments) and the temporaries. A config that
does not fit fails here, on a CPU, in a minute, instead of on the pod. XLA's cost analysis of the
same program gives its FLOPs and bytes per chip, and with the chip's published peak and HBM
bandwidth the roofline step time, MFU and bytes/s they imply (fastblt/train/roofline.py), so a pod
run's speed is bounded before it is paid for. The step is traced for the topology's platform
(``fastblt.model.attention.target_platform``): on TPU, attention's "auto" and "splash" impls
compile the Pallas splash kernel.

``--topology cpu:N`` compiles for N local CPU devices instead (the code path the CPU tests cover).
TPU topologies need the ``libtpu`` package of the installed jax (``pip install 'jax[tpu]'`` pins it).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import os
import re
import time
from typing import Any

from fastblt.config import ConfigError, experiment_config
from fastblt.train.roofline import Roofline, step_cost

__all__ = ["CompileReport", "compile_train_step", "topology_devices"]

# Mean patch length assumed for the model-FLOPs count of entropy (and space) patching, whose real
# lengths come with the data: ~4.5 bytes is BLT-1B's entropy patching on text (experiments/blt_1b.py).
# Static patching uses its patch_size, byte patching 1; --avg-patch-len overrides.
DEFAULT_PATCH_LEN = 4.5


@dataclasses.dataclass
class CompileReport:
    """What the compiled train step needs on each device (bytes) and how long compiling took."""

    topology: str
    device_kind: str
    num_devices: int
    mesh: dict[str, int]
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    generated_code_bytes: int
    compile_seconds: float
    hbm_bytes: float | None = None  # per chip, for TPU topologies
    roofline: Roofline | None = None  # the step's cost per chip and the speed it implies

    @property
    def total_bytes(self) -> int:
        """Peak per device as XLA counts it: arguments + outputs - donated (aliased) + temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    def lines(self) -> list[str]:
        def gib(n: float) -> str:
            return f"{n / 2**30:9.3f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:9.3f} MiB"

        out = [
            f"compiled the train step for {self.topology}: {self.num_devices} x {self.device_kind}, "
            f"mesh {self.mesh}, in {self.compile_seconds:.1f}s",
            "per device:",
            f"  arguments      {gib(self.argument_bytes)}  (state, frozen params, batch)",
            f"  outputs        {gib(self.output_bytes)}",
            f"  aliased        {gib(self.alias_bytes)}  (donated state reused for the outputs)",
            f"  temporaries    {gib(self.temp_bytes)}",
            f"  code           {gib(self.generated_code_bytes)}",
            f"  total          {gib(self.total_bytes)}  (arguments + outputs - aliased + temporaries)",
        ]
        if self.hbm_bytes:
            share = self.total_bytes / self.hbm_bytes
            verdict = "fits" if share <= 1 else "does NOT fit"
            out.append(f"  HBM per chip   {gib(self.hbm_bytes)}: {verdict} ({share:.0%} used)")
        if self.roofline is not None:
            out += self.roofline.lines()
        return out

    def as_dict(self) -> dict[str, Any]:
        """Every field, ``total_bytes`` and the roofline's derived figures (``fastblt compile --json``)."""
        out = dataclasses.asdict(self)
        out["total_bytes"] = self.total_bytes
        out["roofline"] = None if self.roofline is None else self.roofline.as_dict()
        return out


def _libtpu_requirement() -> str:
    """The libtpu pin of the installed jax's ``tpu`` extra, e.g. ``libtpu==0.0.42.*``."""
    for req in importlib.metadata.requires("jax") or []:
        if req.startswith("libtpu") and 'extra == "tpu"' in req:
            return req.split(";")[0].strip()
    return "libtpu"


def _check_libtpu() -> None:
    if importlib.util.find_spec("libtpu") is None:
        jax_version = importlib.metadata.version("jax")
        raise ConfigError(
            f"compiling for a TPU topology needs the libtpu package that matches jax {jax_version}, "
            f"which is not installed: pip install '{_libtpu_requirement()}' (or 'jax[tpu]=={jax_version}'); "
            f"--topology cpu:N needs nothing"
        )


def topology_devices(topology: str) -> tuple[list[Any], str, Any]:
    """(devices, canonical topology name, the TPU slice (fastblt.launch.accelerators.TpuSlice) or
    None for CPU devices) for ``v5p-128`` or ``cpu:8``."""
    import jax

    cpu = re.fullmatch(r"cpu:(\d+)", topology.strip().lower())
    if cpu:
        n = int(cpu.group(1))
        devices = jax.devices("cpu")
        if n < 1 or n > len(devices):
            raise ConfigError(
                f"--topology {topology}: {len(devices)} CPU device(s) exist; start with "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={max(n, 1)} for {max(n, 1)}"
            )
        return devices[:n], f"cpu:{n}", None
    from fastblt.launch.accelerators import parse_tpu

    try:
        tpu = parse_tpu(topology)
    except ValueError as e:
        raise ConfigError(f"--topology: {e}; or cpu:N for local CPU devices") from None
    _check_libtpu()
    # No TPU is opened here, so several compiles may share the machine: without this, libtpu's
    # single-process lockfile makes a second concurrent `fastblt compile` fail.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(
            topology_name=tpu.topology,
            platform="tpu",
            chip_config_name=tpu.chip_config,
            chips_per_host_bounds=tpu.chips_per_host_bounds,
            num_slices=1,
            wrap=tpu.wrap,
        )
    except Exception as e:  # libtpu's errors are RuntimeErrors of many kinds
        raise ConfigError(
            f"libtpu could not describe the topology {tpu.topology} ({tpu.name}): {e}"
        ) from None
    return list(desc.devices), f"{tpu.name} ({tpu.topology})", tpu


def _abstract_batch(cfg: Any, sharding: Any) -> dict[str, Any]:
    """ShapeDtypeStructs of one global training batch, with the keys and dtypes the pipeline makes."""
    import jax

    from fastblt.data.pipeline import MakeBatch

    one_row = MakeBatch(1, cfg.data.seq_len, cfg.data.entropies)([])
    batch = cfg.data.batch_size
    return {
        k: jax.ShapeDtypeStruct((batch, *v.shape[1:]), v.dtype, sharding=sharding) for k, v in one_row.items()
    }


def _patch_len(cfg: Any, given: float | None) -> float | None:
    """The mean patch length the model-FLOPs count assumes (None for an entropy-model experiment)."""
    if cfg.model is None:  # an entropy-model experiment: no patches
        return None
    if given is not None:
        return float(given)
    patcher = cfg.model.patcher
    return {"static": float(patcher.patch_size), "byte": 1.0}.get(patcher.mode, DEFAULT_PATCH_LEN)


def compile_train_step(
    cfg: Any,
    topology: str,
    peak_flops: float | None = None,
    hbm_bandwidth: float | None = None,
    avg_patch_len: float | None = None,
) -> CompileReport:
    """Compiles ``fastblt.train.loop.Trainer``'s train step for ``topology``; raises ConfigError if it can't.

    ``peak_flops`` (FLOP/s) and ``hbm_bandwidth`` (bytes/s) per chip replace the TPU generation's
    published figures (or supply them for CPU devices, which have none) in the roofline;
    ``avg_patch_len`` replaces the mean patch length the model-FLOPs count assumes.
    """
    import jax
    import numpy as np

    from fastblt import sharding
    from fastblt.model.attention import target_platform
    from fastblt.train.loop import Trainer, flops_per_byte, make_task
    from fastblt.train.tasks import frozen_template

    if (peak_flops is None) != (hbm_bandwidth is None):
        raise ConfigError(
            "give both a peak FLOP/s and an HBM bandwidth per chip for the roofline, or neither"
        )
    cfg = experiment_config(cfg)
    devices, name, tpu = topology_devices(topology)
    if peak_flops is None and tpu is not None:
        peak_flops, hbm_bandwidth = tpu.peak_flops, tpu.hbm_bandwidth
    try:
        mesh = sharding.make_mesh(cfg.mesh, devices)
    except ValueError as e:
        raise ConfigError(f"{e} (the topology has {len(devices)} devices)") from None
    data_ways = int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))
    if cfg.data.batch_size % data_ways:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} does not split over the {data_ways} data-parallel "
            f"devices (mesh.data x mesh.fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']}): set "
            f"data.batch_size to a multiple of {data_ways}"
        )
    # The frozen entropy model of an entropy-patched BLT is an argument too (replicated, as in training).
    task = make_task(cfg)
    frozen = frozen_template(task)
    abstract_frozen = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.replicated(mesh)), frozen
    )
    with target_platform(devices[0].platform):
        trainer = Trainer(cfg, mesh, abstract_frozen)
        batch = _abstract_batch(cfg, trainer.batch_sharding)
        start = time.perf_counter()
        lowered = trainer.train_step.lower(trainer.abstract_state, abstract_frozen, batch)
    try:
        compiled = lowered.compile()
    except Exception as e:  # XLA reports an over-full device as RESOURCE_EXHAUSTED at compile time
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "RESOURCE_EXHAUSTED" in message:
            raise ConfigError(
                f"the train step does not fit on {name}: {message}. Lower data.batch_size or data.seq_len, "
                f"shard more (mesh.fsdp, mesh.tensor), bound model.patcher.max_patches or set model.remat=True "
                "(with model.remat_policy=full)"
            ) from None
        raise
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    flops, bytes_accessed, loops = step_cost(compiled)
    patch_len = _patch_len(cfg, avg_patch_len)
    step_bytes = cfg.data.batch_size * cfg.data.seq_len
    roofline = Roofline(
        flops=flops,
        bytes_accessed=bytes_accessed,
        chips=len(devices),
        model_flops=flops_per_byte(task, cfg.data.seq_len, patch_len or 1.0) * step_bytes,
        step_bytes=step_bytes,
        peak_flops=peak_flops,
        hbm_bandwidth=hbm_bandwidth,
        avg_patch_len=patch_len,
        loop_trips=loops,
    )
    return CompileReport(
        topology=name,
        device_kind=devices[0].device_kind,
        num_devices=len(devices),
        mesh={a: int(s) for a, s in mesh.shape.items()},
        argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes),
        generated_code_bytes=int(mem.generated_code_size_in_bytes),
        compile_seconds=seconds,
        hbm_bytes=None if tpu is None else tpu.hbm_gib * 2**30,
        roofline=roofline,
    )
