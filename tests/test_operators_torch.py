"""Operators against PyTorch's own layers (float64, so equality is to rounding)."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flipad_jax as fj
from tests._geometry import build, conv_geometry, weight_shape

torch = pytest.importorskip("torch")
F = torch.nn.functional
pytestmark = pytest.mark.torch


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.slow
@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_forward_equals_torch(x64, transposed, data):
    g = data.draw(conv_geometry(transposed))
    g["layout"] = data.draw(st.sampled_from(["NHWC", "NCHW"]))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    w = rng.normal(size=weight_shape(g, transposed))
    b = rng.normal(size=g["cout"])
    op = build(fj, g, w, transposed, bias=b)
    z = rng.normal(size=(g["batch"], g["cin"]) + g["size"])
    common = dict(stride=g["stride"], padding=g["padding"], dilation=g["dilation"],
                  groups=g["groups"])
    tz, tw, tb = (torch.from_numpy(a) for a in (z, w, b))
    if transposed:
        ref = F.conv_transpose2d(tz, tw, tb, output_padding=g["output_padding"], **common)
    else:
        ref = F.conv2d(tz, tw, tb, **common)
    np.testing.assert_allclose(op.affine(z), ref.numpy(), rtol=1e-10, atol=1e-10)


def test_linear_equals_torch(x64):
    rng = np.random.default_rng(0)
    w, b, z = rng.normal(size=(5, 7)), rng.normal(size=5), rng.normal(size=(3, 7))
    ref = F.linear(*(torch.from_numpy(a) for a in (z, w, b))).numpy()
    np.testing.assert_allclose(fj.Linear(w, b).affine(z), ref, rtol=1e-12)


def test_conv_transpose_is_the_adjoint_of_torch_conv2d(x64):
    """PyTorch's conv2d with the stored weight is the adjoint of our ConvTranspose2d."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=(6, 3, 4, 4))
    op = fj.ConvTranspose2d(w, stride=2, padding=1, in_size=(8, 8))
    y = rng.normal(size=(2, 3, 16, 16))
    ref = F.conv2d(torch.from_numpy(y), torch.from_numpy(w), stride=2, padding=1).numpy()
    np.testing.assert_allclose(op.T(y), ref, rtol=1e-10, atol=1e-12)
