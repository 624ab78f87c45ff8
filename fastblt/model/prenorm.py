"""A layer's pre-norm and the products that read it as one differentiable op, whose backward takes
the products' input gradients unsummed and the residual's gradient into one pass of the norm kernel.

In a pre-norm layer ``x`` feeds both the norm (then q, k and v, or w1 and w3) and the residual
``x + attn(...)``. XLA's backward of that reads x and every summand of the gradient twice (a row
reduction, then the elementwise pass that also adds the residual's gradient): about ten passes over a
tensor of the attention norm where six do (experiments/results/train_speed.md, "Where blt_mid's 22 ms
of elementwise kernels go", lead 1). :func:`norm_products` returns x itself next to the products, so
the caller's residual reads it through the op and its gradient arrives in the op's backward, which
hands both to fastblt.model.norm_kernel.grad_parts.

The forward is fastblt.model.layers.rms_norm's XLA expression (norm_kernel.reference_norm; XLA still
fuses the residual add before it into its row reduction) and the products are those of ``nn.Dense``
(``dot_general`` in the compute dtype): the same values as the layer without the op. The gradients are
autodiff's up to rounding: the kernel sums the products' gradients and the residual's in float32,
where autodiff rounds each sum to the compute dtype (in bf16, up to about one bf16 step apart; the
kernel's is the more accurate). The kernel runs interpreted off a GPU (the tests).
"""

from __future__ import annotations

import functools

import jax

from fastblt.model import norm_kernel


def dense_product(x: jax.Array, w: jax.Array) -> jax.Array:
    """``nn.Dense``'s product: x float[..., D] with w [D, F], contracting x's last axis."""
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def norm_products(
    x: jax.Array, scale: jax.Array, kernels: tuple[jax.Array, ...], eps: float
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """``(x, tuple(rms_norm(x, scale) @ w for w in kernels))``.

    Args:
      x: float[..., D] the layer's input (norm_kernel.supported shapes); scale: float[D] the norm's;
      kernels: the products' weights [D, F_i], already in the compute dtype (x's); eps: the norm's,
      a Python float (static).
    Returns: x (read by the caller's residual) and each product float[..., F_i].
    """
    y, _ = norm_kernel.reference_norm(x, scale, eps)
    return x, tuple(dense_product(y, w) for w in kernels)


def _fwd(x, scale, kernels, eps):
    y, r = norm_kernel.reference_norm(x, scale, eps)
    return (x, tuple(dense_product(y, w) for w in kernels)), (x, scale, r, y, kernels)


def _bwd(eps, res, cotangents):
    x, scale, r, y, kernels = res
    d_residual, d_outs = cotangents
    lead = tuple(range(y.ndim - 1))
    dys = tuple(
        jax.lax.dot_general(d, w, (((d.ndim - 1,), (1,)), ((), ())))
        for d, w in zip(d_outs, kernels, strict=True)
    )
    d_kernels = tuple(jax.lax.dot_general(y, d, ((lead, lead), ((), ()))) for d in d_outs)
    dx, d_scale = norm_kernel.grad_parts(x, scale, r, dys, d_residual.astype(x.dtype))
    return dx, d_scale, d_kernels


norm_products.defvjp(_fwd, _bwd)
