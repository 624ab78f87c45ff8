"""A head range of a decode layer's q|k|v product, read in place by the decode kernel."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class HeadView:
    """Heads ``start .. start + count`` (axis 2) of ``parent`` float[B, T, heads, hd], not cut out.

    A decode layer's q, k and v are heads of its one q|k|v product (k and q after one RoPE). XLA
    fuses cutting them out into the scatters that write the caches, but a Pallas call takes no fused
    producer, so for the kernel each cut is a copy kernel of its own (generate_speed.md, run 11).
    fastblt.model.decode_attention.decode_attention_write reads views in place where its
    ``reads_in_place`` allows it.
    ``start`` and ``count`` are Python ints (a view is built and used inside one traced program; it
    is not a pytree)."""

    parent: jax.Array
    start: int
    count: int

    def __post_init__(self):
        if self.parent.ndim != 4 or not 0 <= self.start < self.start + self.count <= self.parent.shape[2]:
            raise ValueError(
                f"a HeadView takes heads start .. start + count of a [B, T, heads, hd] array, got heads "
                f"{self.start} .. {self.start + self.count} of {self.parent.shape}"
            )

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.parent.shape[:2], self.count, self.parent.shape[3])

    @property
    def dtype(self) -> jnp.dtype:
        return self.parent.dtype

    def value(self) -> jax.Array:
        """The heads as their own array (a slice)."""
        return self.parent[:, :, self.start : self.start + self.count]


def cut_out(x: jax.Array | HeadView) -> jax.Array:
    """x itself, or a :class:`HeadView`'s heads as their own array."""
    return x.value() if isinstance(x, HeadView) else x
