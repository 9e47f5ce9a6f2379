"""The per-function convolution library of XLA:CPU (flipad_jax.cpu_convolutions): the option
takes effect, and values and gradients are still those of torch's conv2d."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax import lax

from flipad_jax.cpu_convolutions import eigen_jit, eigen_jit_options


def _conv(x, w, padding):
    """``(B, H, W, C)`` * ``(kh, kw, C, O)`` (Flax's layout), stride 1, ``padding`` (rows,
    columns) each side."""
    return lax.conv_general_dilated(x, w, (1, 1), tuple((p, p) for p in padding),
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


@eigen_jit(static_argnames="padding")
def _conv_and_vjp(x, w, g, *, padding):
    y, vjp = jax.vjp(lambda x, w: _conv(x, w, padding), x, w)
    return (y,) + vjp(g)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU option")
def test_eigen_jit_leaves_no_ynnpack_fusion():
    x, w = jnp.ones((2, 8, 8, 32)), jnp.ones((5, 5, 32, 32))  # YNNPACK takes it by default
    default = jax.jit(_conv, static_argnums=2).lower(x, w, (2, 2)).compile().as_text()
    if "ynn_fusion" not in default:
        pytest.skip("this XLA:CPU does not run convolutions through YNNPACK by default")
    assert eigen_jit_options(), "an XLA:CPU with YNNPACK fusions should accept the option"
    routed = eigen_jit(_conv, static_argnums=2).lower(x, w, (2, 2)).compile().as_text()
    assert "ynn_fusion" not in routed and "convolution(" in routed


@pytest.mark.parametrize("padding", [(2, 1), (0, 0)])
def test_eigen_jit_matches_torch_conv2d_and_its_gradients(padding):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 4, 9, 7)).astype(np.float32)
    w = rng.normal(size=(6, 4, 5, 3)).astype(np.float32)
    xt, wt = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    yt = torch.nn.functional.conv2d(xt, wt, padding=padding)
    g = rng.normal(size=tuple(yt.shape)).astype(np.float32)
    yt.backward(torch.tensor(g))
    nhwc = (0, 2, 3, 1)
    y, gx, gw = (np.asarray(a) for a in _conv_and_vjp(
        x.transpose(nhwc), w.transpose(2, 3, 1, 0), g.transpose(nhwc), padding=padding))
    np.testing.assert_allclose(y, yt.detach().numpy().transpose(nhwc), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gx, xt.grad.numpy().transpose(nhwc), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gw, wt.grad.numpy().transpose(2, 3, 1, 0), rtol=1e-4, atol=1e-4)
