"""Channels-last building blocks of the DeepSAD networks that XLA:CPU compiles badly in plain form.

BatchNorm statistics and 2×2 max-pooling carry hand-written gradients; ``conv_same`` picks the
form of a "same" convolution by the size of the image.

BatchNorm and pooling give the same values as the plain jnp formulas; their gradients are written
out because XLA:CPU compiled the autodiff of the plain forms badly. On ``(128, 32, 32, 32)`` activations (the first block of
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
import numpy as np
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


def conv_same(x, kernel):
    """Stride-1 convolution with zero padding ``k // 2`` (PyTorch's ``conv2d(x, w, padding=k//2)``).

    Args:
      x: ``(B, H, W, C)`` floating array.
      kernel: ``(kh, kw, C, O)`` with odd ``kh`` and ``kw`` (Flax's HWIO layout).

    Returns:
      ``(B, H, W, O)``.

    When the image has no more pixels than the kernel has taps (``H·W ≤ kh·kw``, the 4×4 maps of
    the last LeNet block), the convolution runs as one matrix product with its dense
    ``(H·W·C, H·W·O)`` matrix, which then needs no more multiply-adds than the direct form.
    XLA:CPU's convolution is slow on such small images: on the 256 → 128 channel 4×4 block at
    batch 128, forward and backward took 760 ms as a convolution and 51 ms as the product (at 8×8
    the convolution wins, 225 ms against 940 ms; ``benchmarks/README.md``).
    """
    kh, kw, c, o = kernel.shape
    if not (kh % 2 and kw % 2):
        raise ValueError(f"kernel has shape {kernel.shape}: expected odd spatial sizes "
                         "(kh, kw, C, O), so that padding k // 2 keeps the image size")
    b, h, w, _ = x.shape
    if h * w > kh * kw:
        return lax.conv_general_dilated(x, kernel, (1, 1), ((kh // 2, kh // 2), (kw // 2, kw // 2)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    # the tap index linking input pixel (i, j) to output pixel (p, q); kh·kw marks "no tap"
    i, j, p, q = np.meshgrid(np.arange(h), np.arange(w), np.arange(h), np.arange(w), indexing="ij")
    di, dj = i - p + kh // 2, j - q + kw // 2
    tap = np.where((di >= 0) & (di < kh) & (dj >= 0) & (dj < kw), di * kw + dj, kh * kw)
    taps = jnp.concatenate([kernel.reshape(kh * kw, c, o), jnp.zeros((1, c, o), kernel.dtype)])
    dense = taps[tap.reshape(h * w, h * w)].transpose(0, 2, 1, 3).reshape(h * w * c, h * w * o)
    return (x.reshape(b, h * w * c) @ dense).reshape(b, h, w, o)
