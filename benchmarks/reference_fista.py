"""The reference implementation's lasso solver, transcribed in PyTorch for side-by-side timing.

Written from the specification of the authors' ``ista_conv2d`` (REFERENCE.md §3.1): the shifted
problem ½‖Aδ − o′‖² + α‖δ‖₁ with o′ = o − A z̄ − b, FISTA with a fixed step ``lr`` and
soft-threshold α·lr, no restart, start δ₀ = z̄, and one stop rule for the whole batch: the max
over samples of mean |δ⁺ − δ| ≤ tol. Settings default to the CelebA runs: lr 0.025, α 5e-4,
10000 iterations, tol 1e-5.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def layer_maps(kind: str, weight: torch.Tensor, stride: int, padding: int):
    """(A, Aᵀ) of the layer without bias, as the reference computes them."""
    if kind == "conv_transpose2d":
        return (lambda d: F.conv_transpose2d(d, weight, stride=stride, padding=padding),
                lambda r: F.conv2d(r, weight, stride=stride, padding=padding))
    if kind == "conv2d":
        return (lambda d: F.conv2d(d, weight, stride=stride, padding=padding),
                lambda r: F.conv_transpose2d(r, weight, stride=stride, padding=padding))
    raise ValueError(f"kind={kind!r}: expected 'conv2d' or 'conv_transpose2d'")


@torch.no_grad()
def reference_fista(kind, weight, bias, o, zbar, *, lr=0.025, alpha=5e-4, max_iter=10000,
                    tol=1e-5, stride=1, padding=0):
    """Returns (z, iterations) exactly as the reference loop would (z = δ + z̄)."""
    forward, adjoint = layer_maps(kind, weight, stride, padding)
    shift = forward(zbar[None])
    if bias is not None:
        shift = shift + bias.view(1, -1, 1, 1)
    o_shift = o - shift
    x = zbar.expand_as(torch.empty((o.shape[0],) + tuple(zbar.shape))).clone()
    y, t = x.clone(), 1.0
    iterations = 0
    for _ in range(max_iter):
        iterations += 1
        grad = adjoint(forward(y) - o_shift)
        x_next = F.softshrink(y - lr * grad, alpha * lr)
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        y = x_next + ((t - 1) / t_next) * (x_next - x)
        change = (x - x_next).abs().flatten(1).mean(1).max()
        x, t = x_next, t_next
        if change <= tol:
            break
    return x + zbar, iterations
