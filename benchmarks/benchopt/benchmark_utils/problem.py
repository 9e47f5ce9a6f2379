"""The benchmark's problem in plain NumPy/SciPy: objective, shifted target, dense instances.

Per sample i of a batch (A the layer's linear map as an ``(n_out, n_in)`` matrix, b its bias,
z̄ the anchor):

    Pᵢ(z) = ½‖A z + b − oᵢ‖² + λ‖z − z̄‖₁

The benchmark's objective value is the batch mean of Pᵢ, so that values do not grow with the
batch size; the problems are independent, so the mean is minimised by minimising each Pᵢ.
Substituting δ = z − z̄ and rᵢ = oᵢ − b − A z̄ gives the plain lasso ½‖Aδ − rᵢ‖² + λ‖δ‖₁, which
is what the scikit-learn style solvers get (their data term is scaled by 1/n_out: alpha = λ/n_out).
"""

from __future__ import annotations

import numpy as np


def objective(matrix, bias, o, zbar, lam, z):
    """Per-sample Pᵢ(z) in float64.

    Args:
      matrix: ``(n_out, n_in)`` NumPy array or SciPy sparse matrix, A.
      bias: ``(n_out,)`` or None. o: ``(B, n_out)`` targets. zbar: ``(n_in,)`` anchor.
      lam: λ ≥ 0. z: ``(B, n_in)`` points.

    Returns:
      ``(B,)`` float64.
    """
    z = np.asarray(z, np.float64).reshape(len(o), -1)
    residual = np.asarray(matrix @ z.T).T - np.asarray(o, np.float64).reshape(len(o), -1)
    if bias is not None:
        residual = residual + np.asarray(bias, np.float64)
    l1 = np.abs(z - np.asarray(zbar, np.float64).reshape(1, -1)).sum(1)
    return 0.5 * (residual ** 2).sum(1) + lam * l1


def shifted_target(matrix, bias, o, zbar):
    """``(B, n_out)`` float64 rᵢ = oᵢ − b − A z̄: the target of the plain lasso in δ = z − z̄."""
    r = np.asarray(o, np.float64).reshape(len(o), -1) - matrix @ np.asarray(zbar, np.float64).ravel()
    return r if bias is None else r - np.asarray(bias, np.float64)


def dense_problem(n_out: int, n_in: int, batch: int, seed: int, lam_ratio: float = 0.1) -> dict:
    """A seeded dense instance: Gaussian A (columns of expected norm 1), sparse true codes
    around a random anchor, 1% noise, λ = ``lam_ratio`` · min over samples of ‖Aᵀrᵢ‖∞ (the λ
    above which z = z̄ solves sample i), so that no sample's solution is the anchor.

    Returns:
      dict(weight ``(n_out, n_in)``, bias ``(n_out,)``, o ``(B, n_out)``, zbar ``(n_in,)``,
      all float32, and lam, a float).
    """
    if not 0 < lam_ratio < 1:
        raise ValueError(f"lam_ratio={lam_ratio}: expected a value in (0, 1)")
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(n_out, n_in)) / np.sqrt(n_out)
    bias = rng.normal(size=n_out) * 0.1
    zbar = rng.normal(size=n_in) * 0.1
    codes = rng.normal(size=(batch, n_in)) * (rng.random((batch, n_in)) < 0.1)
    clean = (zbar + codes) @ weight.T + bias
    o = clean + 0.01 * rng.normal(size=clean.shape) * np.abs(clean).mean()
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    weight, bias, o, zbar = map(f32, (weight, bias, o, zbar))
    lam_max = np.abs(shifted_target(weight.astype(np.float64), bias, o, zbar) @ weight).max(1)
    return dict(weight=weight, bias=bias, o=o, zbar=zbar, lam=float(lam_ratio * lam_max.min()))
