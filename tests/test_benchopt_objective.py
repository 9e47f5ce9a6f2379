"""The benchopt benchmark's pure functions (benchmarks/benchopt/benchmark_utils), without benchopt.

The objective evaluation and the shifted target must agree with independent solvers: at the
optimum scikit-learn's Lasso (1/(2n) scaling, no anchor, no bias, fed δ = z − z̄ and
r = o − b − A z̄) and our solver reach the same P, and our solver's own objective matches.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import Lasso

import flipad_jax as fj

BENCHOPT = Path(__file__).resolve().parents[1] / "benchmarks" / "benchopt"


@pytest.fixture
def utils(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHOPT))
    for name in [m for m in sys.modules if m.split(".")[0] == "benchmark_utils"]:
        monkeypatch.delitem(sys.modules, name)
    import benchmark_utils.heads
    import benchmark_utils.problem
    return benchmark_utils


def test_dense_objective_at_sklearn_optimum_equals_ours(x64, utils):
    problem = utils.problem
    p = problem.dense_problem(n_out=40, n_in=60, batch=3, seed=1, lam_ratio=0.2)
    a = p["weight"].astype(np.float64)
    o, zbar, bias = (p[k].astype(np.float64) for k in ("o", "zbar", "bias"))
    lam = p["lam"]
    r = problem.shifted_target(a, bias, o, zbar)
    z_sk = np.stack([Lasso(alpha=lam / len(a), fit_intercept=False, tol=1e-14,
                           max_iter=100_000).fit(a, ri).coef_ for ri in r]) + zbar
    ours = fj.solve_lasso(fj.Linear(a, bias), o, lam, anchor=zbar, tol=1e-12, throw=True)
    p_sk = problem.objective(a, bias, o, zbar, lam, z_sk)
    p_ours = problem.objective(a, bias, o, zbar, lam, np.asarray(ours.z))
    np.testing.assert_allclose(p_sk, p_ours, rtol=1e-9)
    np.testing.assert_allclose(p_ours, np.asarray(ours.objective), rtol=1e-12)
    np.testing.assert_allclose(z_sk, np.asarray(ours.z), atol=1e-6)
    assert np.all(p_ours < problem.objective(a, bias, o, zbar, lam, np.broadcast_to(zbar, z_sk.shape)))
    delta = z_sk - zbar
    assert np.all(np.any(np.abs(delta) > 1e-8, axis=1))  # no sample solved by the anchor
    assert np.any(np.abs(delta) < 1e-12)                 # and the solution is sparse


def test_dense_problem_is_seeded_and_lam_below_every_samples_lam_max(utils):
    problem = utils.problem
    p, q = (problem.dense_problem(30, 50, 4, seed=3) for _ in range(2))
    for key in ("weight", "bias", "o", "zbar"):
        np.testing.assert_array_equal(p[key], q[key])
    r = problem.shifted_target(p["weight"].astype(np.float64), p["bias"], p["o"], p["zbar"])
    assert p["lam"] < np.abs(r @ p["weight"]).max(1).min()
    with pytest.raises(ValueError, match="lam_ratio=1.5"):
        problem.dense_problem(30, 50, 4, seed=3, lam_ratio=1.5)


@pytest.mark.parametrize("make, in_shape", [
    (lambda w, b: fj.Conv2d(w, b, stride=1, padding=1, in_size=(5, 6)), (3, 5, 6)),
    (lambda w, b: fj.ConvTranspose2d(w, b, stride=2, padding=1, in_size=(4, 3)), (3, 4, 3)),
])
def test_operator_matrix_applies_the_layer(x64, utils, make, in_shape):
    rng = np.random.default_rng(0)
    wshape = (2, 3, 3, 3) if in_shape == (3, 5, 6) else (3, 2, 4, 4)
    op = make(rng.normal(size=wshape), rng.normal(size=2))
    matrix = utils.heads.operator_matrix(op, chunk=7)
    z = rng.normal(size=(4,) + in_shape)
    assert matrix.shape == (np.prod(op.out_shape), np.prod(in_shape))
    np.testing.assert_allclose(matrix @ z.reshape(4, -1).T, np.asarray(op(z)).reshape(4, -1).T,
                               rtol=1e-12, atol=1e-12)
