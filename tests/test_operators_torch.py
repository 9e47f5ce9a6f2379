"""Operators against PyTorch's own layers (float64, so equality is to rounding)."""

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flipad_jax as fj
from tests._geometry import build, conv_geometry, weight_shape

torch = pytest.importorskip("torch")
F = torch.nn.functional
pytestmark = pytest.mark.torch
# Both maps in one compiled call: a few times faster than eager, where each new shape compiles
# every small op of the polyphase form apart.
BOTH_MAPS = jax.jit(lambda op, z, y: (op(z), op.T(y)))


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


def _polyphase_against_torch(data, dtype, rtol):
    """ConvTranspose2d(method="polyphase"): forward against F.conv_transpose2d and adjoint
    against F.conv2d, the adjoint's definition, on a drawn undilated geometry and layout."""
    g = data.draw(conv_geometry(True, max_dilation=1))
    g["layout"] = data.draw(st.sampled_from(["NHWC", "NCHW"]))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    w = rng.normal(size=weight_shape(g, True)).astype(dtype)
    op = build(fj, g, w, True, method="polyphase")
    z = rng.normal(size=(g["batch"],) + op.in_shape).astype(dtype)
    y = rng.normal(size=(g["batch"],) + op.out_shape).astype(dtype)
    common = dict(stride=g["stride"], padding=g["padding"], groups=g["groups"])
    tz, ty, tw = (torch.from_numpy(a) for a in (z, y, w))
    forward = F.conv_transpose2d(tz, tw, output_padding=g["output_padding"], **common).numpy()
    adjoint = F.conv2d(ty, tw, **common).numpy()
    scale = np.abs(w).sum()  # bounds every output entry per unit input
    out, back = BOTH_MAPS(op, z, y)
    np.testing.assert_allclose(out, forward, rtol=rtol, atol=rtol * scale)
    np.testing.assert_allclose(back, adjoint, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-10), (np.float32, 1e-5)])
@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_polyphase_equals_torch(x64, dtype, rtol, data):
    _polyphase_against_torch(data, dtype, rtol)


@pytest.mark.slow
@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-10), (np.float32, 1e-5)])
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_polyphase_equals_torch_more_geometries(x64, dtype, rtol, data):
    _polyphase_against_torch(data, dtype, rtol)


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
