"""A compiled step's cost (XLA's cost analysis) and the roofline step time it implies on a chip.

XLA's ``compiled.cost_analysis()`` of an SPMD program describes the program of one device: the FLOPs
and the bytes its operations read and write (HBM traffic as XLA models it, before caching effects).
The roofline bound of a step is ``max(FLOPs / peak FLOP/s, bytes / HBM bandwidth)`` per chip: the
step cannot run faster than that, and a real step is slower (collectives, launch gaps, operations far
below peak). From it follow an upper bound on MFU (the project's model FLOPs per step over chips x
peak x step time, fastblt.train.metrics) and on training bytes per second.

What the cost analysis does not see:

* the inside of custom calls. A Pallas kernel (the splash attention of fastblt/model/splash.py) is
  one custom call whose FLOPs XLA does not count unless the kernel declares a cost estimate (jax
  0.10.2's splash kernel declares none), so a step on it reports fewer FLOPs than it runs; the bytes
  of its operands and results are counted;
* loop trip counts. A while loop's body is counted once, however often it runs: the layers of
  ``model.scan_layers=True`` (a lax.scan) count as one layer. The report lists the step's loops and
  their trip counts where XLA records them; compile with ``model.scan_layers=False`` to count every
  layer of the global model (BLT-D's chunked block attention stays a loop).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

__all__ = ["Roofline", "step_cost"]


# A while loop in the compiled HLO text, and the trip count XLA found for it (when it found one).
_WHILE = re.compile(r" while\(.*?(?:\"known_trip_count\":\{\"n\":\"(\d+)\"\}|$)", re.MULTILINE)


def step_cost(compiled: Any) -> tuple[float, float, tuple[int, ...]]:
    """(FLOPs, bytes accessed, trip counts of its while loops (0: unknown)) of one device's program,
    from ``compiled.cost_analysis()`` (a dict in current jax, a list of one dict per program in older
    releases) and its HLO text."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    cost = cost or {}
    loops = tuple(int(n or 0) for n in _WHILE.findall(compiled.as_text() or ""))
    return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0)), loops


@dataclasses.dataclass
class Roofline:
    """A step's cost per chip and the step time, MFU and throughput bounds it implies."""

    flops: float  # per chip and step: XLA's cost analysis of the compiled program
    bytes_accessed: float  # per chip and step, likewise
    chips: int
    model_flops: float | None  # per step on all chips: the project's count (fastblt.train.metrics)
    step_bytes: int  # training bytes per step (batch x row length)
    peak_flops: float | None = None  # per chip, FLOP/s; None: unknown (CPU)
    hbm_bandwidth: float | None = None  # per chip, bytes/s
    avg_patch_len: float | None = None  # the mean patch length model_flops assumes (None: no patches)
    loop_trips: tuple[int, ...] = ()  # trip counts of the program's while loops (0: unknown)

    @property
    def step_seconds(self) -> float | None:
        """The roofline bound: max(FLOPs / peak, bytes / bandwidth); None without a peak."""
        if not self.peak_flops or not self.hbm_bandwidth:
            return None
        return max(self.flops / self.peak_flops, self.bytes_accessed / self.hbm_bandwidth)

    @property
    def bound(self) -> str | None:
        """Which roof sets the step time: "compute" or "memory"."""
        if self.step_seconds is None:
            return None
        return (
            "compute"
            if self.flops / self.peak_flops >= self.bytes_accessed / self.hbm_bandwidth
            else "memory"
        )

    @property
    def mfu(self) -> float | None:
        """Model FLOPs over chips x peak x the roofline step time (an upper bound on a run's MFU)."""
        t = self.step_seconds
        if t is None or not t or self.model_flops is None:
            return None
        return self.model_flops / (self.chips * self.peak_flops * t)

    @property
    def bytes_per_sec(self) -> float | None:
        """Training bytes per second of the whole slice at the roofline step time."""
        t = self.step_seconds
        return None if t is None or not t else self.step_bytes / t

    def as_dict(self) -> dict[str, Any]:
        return dict(
            dataclasses.asdict(self),
            step_seconds=self.step_seconds,
            bound=self.bound,
            mfu=self.mfu,
            bytes_per_sec=self.bytes_per_sec,
        )

    def lines(self) -> list[str]:
        out = [
            "per chip and step (XLA cost analysis; Pallas kernels' own FLOPs not counted):",
            f"  FLOPs          {self.flops:.4g}",
            f"  bytes accessed {self.bytes_accessed:.4g}",
        ]
        if self.loop_trips:
            known = [str(n) for n in self.loop_trips if n]
            unknown = len(self.loop_trips) - len(known)
            trips = (["trip counts " + ", ".join(known)] if known else []) + (
                [f"{unknown} of unknown trip count"] if unknown else []
            )
            out.append(
                f"  (lower bounds: {len(self.loop_trips)} while loop(s), {'; '.join(trips)}, each body "
                "counted once; model.scan_layers=False unrolls the global model's layers)"
            )
        if self.model_flops is not None:
            at = "" if self.avg_patch_len is None else f" at a mean patch of {self.avg_patch_len:g} bytes"
            out.append(f"  model FLOPs    {self.model_flops / self.chips:.4g}  (the project's count{at})")
        t = self.step_seconds
        if t is None:
            out.append(
                "roofline: no published peak FLOP/s and HBM bandwidth for this device; "
                "give both with --peak-flops and --hbm-bandwidth"
            )
            return out
        out.append(
            f"roofline at {self.peak_flops / 1e12:.0f} TFLOP/s and {self.hbm_bandwidth / 1e9:.0f} GB/s per chip "
            f"(a bound, not a measurement):"
        )
        out.append(f"  step time      {t * 1e3:.1f} ms  ({self.bound}-bound)")
        if self.mfu is not None:
            out.append(f"  MFU            {self.mfu:.1%}")
        out.append(
            f"  throughput     {self.bytes_per_sec / 1e3:.1f} kB/s of training bytes on {self.chips} chips"
        )
        return out
