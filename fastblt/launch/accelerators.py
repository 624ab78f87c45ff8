"""TPU slice names (``v5p-128``, ``v5litepod-16``, ``v6e-256``) and what follows from them.

Cloud TPU names a slice by generation and a count: TensorCores for v4 and v5p (two per chip, run as
one "megacore" device), chips for v5e and v6e. From the name this module derives the number of chips
(= JAX devices), of hosts (= TPU VM workers = JAX processes), the physical topology that libtpu
uses for ahead-of-time compilation (``v5p:4x4x4``), the per-chip HBM (size, bandwidth), bf16 peak
FLOP/s and the TPU VM runtime version to boot.

Topologies follow Cloud TPU's standard slice shapes: for the 3-D tori of v4/v5p, start from a
2x2x1 host and double the smallest dimension (the last of equals) until the chip count is reached
(8 -> 2x2x2, 16 -> 2x2x4, 64 -> 4x4x4, 128 -> 4x4x8, ...); for the 2-D meshes of v5e/v6e the same
from 2x2 (8 -> 2x4, 16 -> 4x4, 256 -> 16x16). Slices with wraparound links: v4/v5p from a full
4x4x4 cube up (every dimension wraps), v5e/v6e dimensions of 16 chips. A non-standard shape can be
given directly as ``v5p:4x4x12`` (the generation and the chip grid).
"""

from __future__ import annotations

import dataclasses
import math
import re

__all__ = ["TpuSlice", "generation_peak_flops", "parse_tpu"]


@dataclasses.dataclass(frozen=True)
class _Generation:
    name: str  # as in the slice name: v4, v5p, v5e, v6e
    cores_per_chip: int  # what the count in the slice name counts per chip
    dims: int  # 3: torus of v4/v5p; 2: v5e/v6e
    chip_config: str  # libtpu's chip configuration: megacore or default
    hbm_gib: float  # HBM per chip as published by Cloud TPU
    runtime: str  # TPU VM software version for JAX
    chips_per_vm: int  # chips per host (a single-host slice may hold up to 8 for v5e/v6e)
    peak_tflops: float  # bf16 dense peak per chip, as published by Cloud TPU
    hbm_gbps: float  # HBM bandwidth per chip, GB/s (10^9 bytes), as published by Cloud TPU


# Peak compute and HBM bandwidth per chip from Cloud TPU's system-architecture pages (read 2026-12):
# v4  https://cloud.google.com/tpu/docs/v4   "275 teraflops (bf16 or int8)", "32 GiB, 1200 GBps"
# v5p https://cloud.google.com/tpu/docs/v5p  "459 TFLOPs" (bf16), "95GB, 2765 GBps"
# v5e https://cloud.google.com/tpu/docs/v5e  "197 TFLOPs" (bf16), "16 GB, 819 GBps"
# v6e https://cloud.google.com/tpu/docs/v6e  "918 TFLOPs" (bf16), "1638 GBps"
_GENERATIONS = {
    "v4": _Generation("v4", 2, 3, "megacore", 32.0, "tpu-ubuntu2204-base", 4, 275.0, 1200.0),
    "v5p": _Generation("v5p", 2, 3, "megacore", 95.0, "v2-alpha-tpuv5", 4, 459.0, 2765.0),
    "v5e": _Generation("v5e", 1, 2, "default", 16.0, "v2-alpha-tpuv5-lite", 4, 197.0, 819.0),
    "v6e": _Generation("v6e", 1, 2, "default", 32.0, "v2-alpha-tpuv6e", 4, 918.0, 1638.0),
}
# Other spellings of the generations (the Cloud accelerator type of v5e is v5litepod-N).
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v5": "v5p"}


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    """One TPU slice, as derived from its name."""

    name: str  # the Cloud accelerator type, e.g. v5p-128 (what gcloud and xpk take)
    generation: str  # v4, v5p, v5e, v6e
    chips: int  # JAX devices
    shape: tuple[int, ...]  # chip grid, e.g. (4, 4, 4)
    chip_config: str
    hbm_gib: float
    runtime_version: str
    wrap: tuple[bool, bool, bool]

    @property
    def hosts(self) -> int:
        """TPU VM workers, i.e. JAX processes (one per host)."""
        per_vm = _GENERATIONS[self.generation].chips_per_vm
        if _GENERATIONS[self.generation].dims == 2 and self.chips <= 8:
            return 1  # v5e/v6e single-host slices hold up to 8 chips
        return max(1, math.ceil(self.chips / per_vm))

    @property
    def peak_flops(self) -> float:
        """bf16 dense peak FLOP/s of one chip (Cloud TPU's published figure)."""
        return generation_peak_flops(self.generation)

    @property
    def hbm_bandwidth(self) -> float:
        """HBM bandwidth of one chip, bytes/s (Cloud TPU's published figure)."""
        return _GENERATIONS[self.generation].hbm_gbps * 1e9

    @property
    def topology(self) -> str:
        """libtpu's topology name, e.g. ``v5p:4x4x4``."""
        return f"{self.generation}:{'x'.join(str(d) for d in self.shape)}"

    @property
    def chips_per_host_bounds(self) -> tuple[int, int, int]:
        """Chips of one host along each dimension (libtpu's ``chips_per_host_bounds``)."""
        if self.hosts == 1:
            bounds = list(self.shape) + [1] * (3 - len(self.shape))
            return (bounds[0], bounds[1], bounds[2])
        return (2, 2, 1)


def _standard_shape(chips: int, dims: int) -> tuple[int, ...]:
    if chips == 1:
        return (1,) * dims
    if chips < 4 or chips & (chips - 1):
        raise ValueError(
            f"{chips} chips is not a standard slice (a power of two >= 4); name the chip grid "
            f"instead, e.g. v5p:4x4x12"
        )
    shape = [2, 2] + [1] * (dims - 2)
    while math.prod(shape) < chips:
        smallest = min(shape)
        i = max(j for j, d in enumerate(shape) if d == smallest)
        shape[i] *= 2
    return tuple(shape)


def _wrap(generation: _Generation, shape: tuple[int, ...]) -> tuple[bool, bool, bool]:
    if generation.dims == 3:
        full = all(d >= 4 for d in shape)
        return (full, full, full)
    w = [d == 16 for d in shape] + [False]
    return (w[0], w[1], w[2])


def _generation(raw: str, spec: str) -> _Generation:
    key = _ALIASES.get(raw, raw)
    if key not in _GENERATIONS:
        known = ", ".join(sorted([*_GENERATIONS, *_ALIASES]))
        raise ValueError(f"unknown TPU generation {raw!r} in {spec!r}; known: {known}")
    return _GENERATIONS[key]


def generation_peak_flops(generation: str) -> float:
    """bf16 dense peak FLOP/s of one chip of a TPU generation (v4, v5p, v5e, v6e)."""
    return _GENERATIONS[generation].peak_tflops * 1e12


def parse_tpu(spec: str) -> TpuSlice:
    """A slice from ``v5p-128`` (Cloud name: cores for v4/v5p, chips for v5e/v6e) or ``v5p:4x4x8``."""
    text = spec.strip().lower()
    grid = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)+)", text)
    named = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
    if grid:
        gen = _generation(grid.group(1), spec)
        shape = tuple(int(d) for d in grid.group(2).split("x"))
        if len(shape) != gen.dims or min(shape) < 1:
            raise ValueError(
                f"{spec!r}: a {gen.name} chip grid has {gen.dims} dimensions, e.g. {gen.name}:"
                + ("4x4x4" if gen.dims == 3 else "4x4")
            )
        chips = math.prod(shape)
    elif named:
        gen = _generation(named.group(1), spec)
        count = int(named.group(2))
        if count % gen.cores_per_chip:
            raise ValueError(
                f"{spec!r}: {gen.name} slices are named by TensorCores ({gen.cores_per_chip} per chip); "
                f"use an even count such as {gen.name}-8"
            )
        chips = count // gen.cores_per_chip
        shape = _standard_shape(chips, gen.dims)
    else:
        raise ValueError(
            f"TPU accelerator {spec!r} is not of the form GENERATION-COUNT (v5p-128, v4-32, "
            f"v5litepod-16, v6e-256) or GENERATION:GRID (v5p:4x4x8)"
        )
    cloud_prefix = "v5litepod" if gen.name == "v5e" else gen.name
    return TpuSlice(
        name=f"{cloud_prefix}-{chips * gen.cores_per_chip}",
        generation=gen.name,
        chips=chips,
        shape=shape,
        chip_config=gen.chip_config,
        hbm_gib=gen.hbm_gib,
        runtime_version=gen.runtime,
        wrap=_wrap(gen, shape),
    )
