"""Reverse-mode gradients through solve_lasso (implicit differentiation) against finite
differences of the solution map, in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flipad_jax as fj

SOLVE = dict(tol=1e-13, max_iter=200000)


def _linear(rng):
    m, n = 20, 40
    return dict(weight=rng.normal(size=(m, n)), bias=rng.normal(size=m),
                o=rng.normal(size=(2, m)), anchor=rng.normal(size=n) * 0.1,
                lam=np.array([0.5, 2.0]))


def _conv_transpose(rng):
    return dict(weight=rng.normal(size=(3, 1, 4, 4)) * 0.5, bias=rng.normal(size=1),
                o=rng.normal(size=(2, 1, 8, 8)), anchor=rng.normal(size=(3, 4, 4)) * 0.1,
                lam=np.array([0.3, 1.0]))


def _build(kind, weight, bias):
    if kind == "linear":
        return fj.Linear(weight, bias)
    return fj.ConvTranspose2d(weight, bias, stride=2, padding=1, in_size=(4, 4))


def _central_difference(f, args, k, index, eps=1e-6):
    plus = [np.array(a, float) for a in args]
    minus = [np.array(a, float) for a in args]
    plus[k][index] += eps
    minus[k][index] -= eps
    return (float(f(*plus)) - float(f(*minus))) / (2 * eps)


@pytest.mark.parametrize("kind, make", [("linear", _linear), ("conv_transpose", _conv_transpose)])
def test_gradient_matches_finite_differences(x64, kind, make):
    rng = np.random.default_rng(0)
    p = make(rng)
    weights = rng.normal(size=(2,) + p["anchor"].shape)  # a linear read-out of the solution

    def loss(o, lam, anchor, weight, bias):
        z = fj.solve_lasso(_build(kind, weight, bias), o, lam, anchor=anchor, **SOLVE).z
        return jnp.sum(weights * z)

    args = [p["o"], p["lam"], p["anchor"], p["weight"], p["bias"]]
    z = fj.solve_lasso(_build(kind, p["weight"], p["bias"]), p["o"], p["lam"],
                       anchor=p["anchor"], **SOLVE).z
    support = np.asarray(z) != p["anchor"]
    assert 0 < support.mean() < 1  # a genuine lasso solution, sparse but not empty
    grads = jax.grad(loss, argnums=range(len(args)))(*args)
    for k, (arg, grad) in enumerate(zip(args, grads)):
        grad = np.asarray(grad)
        assert grad.shape == np.shape(arg)
        indices = list(np.ndindex(np.shape(arg)))
        for index in [indices[i] for i in rng.choice(len(indices), min(8, len(indices)),
                                                      replace=False)]:
            expected = _central_difference(loss, args, k, index)
            assert abs(grad[index] - expected) <= 1e-5 * max(1.0, abs(expected)), (k, index)


def test_off_support_coordinates_follow_the_anchor_only(x64):
    # Off the support δ_j = 0 in a neighbourhood (strict dual feasibility), so z_j = z̄_j:
    # ∂z_j/∂o = 0 and ∂z_j/∂z̄_j = 1, which is what the docstring states for the active set.
    rng = np.random.default_rng(1)
    p = _linear(rng)
    op = fj.Linear(p["weight"], p["bias"])
    z = np.asarray(fj.solve_lasso(op, p["o"], p["lam"], anchor=p["anchor"], **SOLVE).z)
    j = int(np.flatnonzero(z[0] == p["anchor"])[0])

    def coordinate(o, anchor):
        return fj.solve_lasso(op, o, p["lam"], anchor=anchor, **SOLVE).z[0, j]

    d_o, d_anchor = jax.grad(coordinate, argnums=(0, 1))(p["o"], p["anchor"])
    assert np.all(np.asarray(d_o) == 0)
    expected = np.zeros_like(p["anchor"])
    expected[j] = 1.0
    np.testing.assert_array_equal(np.asarray(d_anchor), expected)
    assert _central_difference(coordinate, [p["o"], p["anchor"]], 0, (0, 0)) == 0.0


def test_objective_gradient_is_the_envelope_gradient(x64):
    # By the envelope theorem, d P(z*(o), o)/do = ∂P/∂o at fixed z = −(A z* + b − o); the
    # objective is recomputed from the differentiable solution, so its gradient must agree.
    rng = np.random.default_rng(2)
    p = _linear(rng)
    op = fj.Linear(p["weight"], p["bias"])

    def objective(o):
        return jnp.sum(fj.solve_lasso(op, o, p["lam"], anchor=p["anchor"], **SOLVE).objective)

    z = fj.solve_lasso(op, p["o"], p["lam"], anchor=p["anchor"], **SOLVE).z
    envelope = -(np.asarray(z) @ p["weight"].T + p["bias"] - p["o"])
    np.testing.assert_allclose(np.asarray(jax.grad(objective)(p["o"])), envelope, atol=1e-9)


def test_each_sample_gets_its_own_gradient_and_an_unsolvable_one_is_refused(x64):
    # Samples of a batch are independent problems: the batch's gradient is the stack of the
    # single-sample gradients, and a sample whose support exceeds A's rows (a capped, dense
    # solve: A_SᵀA_S singular) makes the gradient an error naming it, not a finite wrong number.
    rng = np.random.default_rng(3)
    p = _linear(rng)
    op = fj.Linear(p["weight"], p["bias"])
    read = rng.normal(size=(2, 40))

    def loss(o, lam, **solve):
        return jnp.sum(read[:len(o)] * fj.solve_lasso(op, o, lam, anchor=p["anchor"],
                                                      **solve).z)

    batch = np.asarray(jax.grad(loss)(p["o"], p["lam"], **SOLVE))
    for i in range(2):
        single = jax.grad(lambda o: jnp.sum(read[i:i + 1] * fj.solve_lasso(
            op, o, p["lam"][i:i + 1], anchor=p["anchor"], **SOLVE).z))(p["o"][i:i + 1])
        np.testing.assert_allclose(batch[i], np.asarray(single)[0], rtol=1e-9, atol=1e-12)
    lam = np.array([50.0, 1e-6])  # sample 0: λ above λ_max, so δ = 0 and nothing to solve
    # capped at 3 iterations at λ itself (on the default λ path the iterate would stay sparse)
    capped = dict(max_iter=3, continuation=None)
    z = np.asarray(fj.solve_lasso(op, p["o"], lam, anchor=p["anchor"], **capped).z)
    assert np.count_nonzero(z[1] != p["anchor"]) > 20  # more nonzeros than the 20 rows
    with pytest.raises(ValueError, match=r"support of sample\(s\) \[1\] could not be solved"):
        jax.grad(loss)(p["o"], lam, **capped)
