"""op.as_lineax(): the operators inside lineax, against torch's layers and numpy's lstsq."""

import jax.numpy as jnp
import numpy as np
import pytest

import flipad_jax as fj

torch = pytest.importorskip("torch")
lx = pytest.importorskip("lineax")
pytestmark = pytest.mark.torch


def _conv_transpose(rng):
    w = rng.normal(size=(3, 2, 4, 4))
    return fj.ConvTranspose2d(w, stride=2, padding=1, in_size=(3, 3)), w


def test_mv_and_transpose_match_torch(x64):
    rng = np.random.default_rng(0)
    op, w = _conv_transpose(rng)
    lin = op.as_lineax()
    z = rng.normal(size=(3, 3, 3))
    y = rng.normal(size=(2, 6, 6))
    expected = torch.nn.functional.conv_transpose2d(torch.tensor(z[None]), torch.tensor(w),
                                                    stride=2, padding=1)[0].numpy()
    np.testing.assert_allclose(np.asarray(lin.mv(jnp.asarray(z))), expected, atol=1e-12)
    # the adjoint of a transposed convolution is the convolution with the same weight
    adjoint = torch.nn.functional.conv2d(torch.tensor(y[None]), torch.tensor(w), stride=2,
                                         padding=1)[0].numpy()
    np.testing.assert_allclose(np.asarray(lin.transpose().mv(jnp.asarray(y))), adjoint,
                               atol=1e-12)
    assert lin.in_structure().shape == (3, 3, 3)


def test_least_squares_through_lineax_matches_numpy(x64):
    rng = np.random.default_rng(1)
    w = rng.normal(size=(12, 5))
    o = rng.normal(size=12)
    sol = lx.linear_solve(fj.Linear(w).as_lineax(), jnp.asarray(o), lx.Normal(lx.Cholesky()))
    np.testing.assert_allclose(np.asarray(sol.value), np.linalg.lstsq(w, o, rcond=None)[0],
                               atol=1e-10)
