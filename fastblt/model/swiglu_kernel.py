"""SwiGLU's gradient as one Pallas (Triton) kernel with two outputs, for training-sized calls on a GPU.

The gradient of ``silu(gate) * up`` needs gate, up and the cotangent g once, and writes d_gate and
d_up: five passes over the [rows, hidden] tensors. XLA splits it into two fusions, one per output,
that each read g and gate again: seven passes, 156 us against 116 at the copy rate per global layer
of a blt_mid step on one H200 and 336 against 252 per decoder layer (experiments/results/
train_speed.md, "Where blt_mid's 22 ms of elementwise kernels go"). Here one program reads a block of
the three inputs and writes both outputs.

The arithmetic is fastblt.model.layers.swiglu's backward in float32, the sigmoid written as
``1 / (1 + exp(-a))`` (what Pallas lowers ``logistic`` to for Triton; XLA's may differ by float32
rounding).
The tensors are viewed flat (a bitcast of row-major arrays), so any hidden width qualifies whose
element count divides into blocks of at least MIN_BLOCK: :func:`supported`.

The Pallas call is compiled for the GPU whenever JAX's backend is one and interpreted otherwise
(``interpret``), as fastblt.model.norm_kernel does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Elements per program: 8 warps x 32 threads x 16 values of each of the five tensors.
BLOCK = 4096
MIN_BLOCK = 512
NUM_WARPS = 8


def block_size(n: int) -> int:
    """Elements per program for ``n`` elements: the largest power of two up to BLOCK dividing n."""
    b = BLOCK
    while b > 1 and n % b:
        b //= 2
    return b


def supported(x: jax.Array) -> bool:
    """Whether the kernel takes x: float[...] (bf16, f16 or f32) whose size has a power-of-two
    divisor of at least MIN_BLOCK."""
    return (
        x.dtype in (jnp.bfloat16, jnp.float16, jnp.float32) and x.size > 0 and block_size(x.size) >= MIN_BLOCK
    )


def swiglu_grad(
    gate: jax.Array, up: jax.Array, g: jax.Array, interpret: bool | None = None
) -> tuple[jax.Array, jax.Array]:
    """The gradients (d_gate, d_up) of ``silu(gate) * up`` for the cotangent g, each float[...] of
    gate's shape and in gate's and up's dtypes (:func:`supported` shapes).

    interpret: Pallas interpret mode (None: unless JAX's backend is a GPU).
    """
    if not (gate.shape == up.shape == g.shape and supported(gate)):
        raise ValueError(
            f"swiglu_kernel.swiglu_grad takes three tensors of one shape whose size divides into blocks of "
            f"{MIN_BLOCK} or more; got gate {gate.dtype}{list(gate.shape)}, up {list(up.shape)}, "
            f"g {list(g.shape)}: use fastblt.model.layers.swiglu, which falls back to XLA"
        )
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    n = gate.size
    block = block_size(n)
    spec = pl.BlockSpec((block,), lambda i: (i,))
    params = {} if interpret else {"compiler_params": plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1)}
    d_gate, d_up = pl.pallas_call(
        _bwd_kernel,
        grid=(n // block,),
        in_specs=[spec, spec, spec],
        out_specs=[spec, spec],
        out_shape=[jax.ShapeDtypeStruct((n,), gate.dtype), jax.ShapeDtypeStruct((n,), up.dtype)],
        interpret=bool(interpret),
        name="fastblt_swiglu_bwd",
        **params,
    )(gate.reshape(n), up.reshape(n), g.reshape(n))
    return d_gate.reshape(gate.shape), d_up.reshape(up.shape)


def _bwd_kernel(gate_ref, up_ref, g_ref, d_gate_ref, d_up_ref):
    a = gate_ref[...].astype(jnp.float32)
    b = up_ref[...].astype(jnp.float32)
    g = g_ref[...].astype(jnp.float32)
    s = 1.0 / (1.0 + jnp.exp(-a))
    d_gate_ref[...] = (g * b * (s * (1.0 + a * (1.0 - s)))).astype(
        d_gate_ref.dtype
    )  # silu'(a) = s + a s (1 - s)
    d_up_ref[...] = (g * (a * s)).astype(d_up_ref.dtype)
