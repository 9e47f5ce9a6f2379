"""Channels-last BatchNorm statistics and 2×2 max-pooling with hand-written gradients.

Same values as the plain jnp formulas; the gradients are written out because XLA:CPU compiled the
autodiff of the plain forms badly. On ``(128, 32, 32, 32)`` activations (the first block of
``lenet_cifar10`` at batch 128), normalise → leaky ReLU → pool, forward and backward: 20 ms here
against 60–85 ms for autodiff of the reshape forms and 230–280 ms with ``reduce_window`` pooling
(whose gradient is a select-and-scatter); reductions over ``(B, H, W)`` of a 4-D array were the
other slow part, so every reduction here runs on the ``(B·H·W, C)`` view. Measured in
``benchmarks/README.md``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def batch_normalize(x, eps: float):
    """Normalise ``x`` over all axes but the last with its own batch statistics.

    Args:
      x: ``(..., C)`` floating array; the statistics are over the ``N = x.size / C`` rows.
      eps: added to the variance.

    Returns:
      ``(y, mean, var)``: ``y = (x − mean) / √(var + eps)`` of ``x``'s shape, and the ``(C,)``
      batch mean and biased variance (differentiable too).
    """
    return _normalize(x, eps)[0]


def _normalize(x, eps):
    rows = x.reshape(-1, x.shape[-1])
    mean = jnp.mean(rows, axis=0)
    var = jnp.mean(jnp.square(rows - mean[None]), axis=0)
    rstd = lax.rsqrt(var + eps)
    # residuals: the input itself, not x − mean, which would be one more array of x's size
    return (((rows - mean[None]) * rstd[None]).reshape(x.shape), mean, var), (rows, mean, rstd)


def _normalize_fwd(x, eps):
    return _normalize(x, eps)


def _normalize_bwd(eps, residuals, cotangents):
    rows, mean, rstd = residuals
    gy, gmean, gvar = cotangents
    n = rows.shape[0]
    g = gy.reshape(rows.shape)
    centred = rows - mean[None]
    y = centred * rstd[None]
    # d/dx of y: rstd · (g − mean(g) − y · mean(g·y)); of mean: 1/N; of var: 2 (x − mean) / N.
    gx = (rstd[None] * (g - jnp.mean(g, axis=0, keepdims=True)
                        - y * jnp.mean(g * y, axis=0, keepdims=True))
          + (gmean[None] + 2.0 * gvar[None] * centred) / n)
    return (gx.reshape(gy.shape),)


batch_normalize.defvjp(_normalize_fwd, _normalize_bwd)


@jax.custom_vjp
def max_pool_2x2(x):
    """``(B, H, W, C)`` → ``(B, H/2, W/2, C)``, the max of each 2×2 window (H, W even).

    The gradient goes to the first maximum of each window in row-major order, as in PyTorch's
    ``max_pool2d``, so exact ties give the same gradient as the reference.
    """
    return _pool(x)


def _windows(x):
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c)


def _pool(x):
    a = _windows(x)
    top = jnp.maximum(a[:, :, 0], a[:, :, 1])
    return jnp.maximum(top[:, :, :, 0], top[:, :, :, 1])


def _pool_fwd(x):
    out = _pool(x)
    return out, (x, out)


def _pool_bwd(residuals, g):
    x, out = residuals
    a = _windows(x)
    hit = a == out[:, :, None, :, None, :]
    # the position (0..3) of the first maximum of each window, then a one-hot of it
    first = jnp.where(hit[:, :, 0, :, 0], 0, jnp.where(hit[:, :, 0, :, 1], 1,
                                                       jnp.where(hit[:, :, 1, :, 0], 2, 3)))
    pos = 2 * lax.broadcasted_iota(jnp.int32, (1, 1, 2, 1, 2, 1), 2) + \
        lax.broadcasted_iota(jnp.int32, (1, 1, 2, 1, 2, 1), 4)
    gx = jnp.where(pos == first[:, :, None, :, None, :], g[:, :, None, :, None, :], 0)
    return (gx.astype(g.dtype).reshape(x.shape),)


max_pool_2x2.defvjp(_pool_fwd, _pool_bwd)
