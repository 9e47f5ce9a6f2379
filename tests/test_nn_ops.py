"""Hand-written gradients of nn_ops against PyTorch's autograd of its own layers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from flipad_jax.nn_ops import batch_normalize, conv_same, max_pool_2x2

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch


def _nhwc(t):
    return jnp.asarray(t.detach().numpy().transpose(0, 2, 3, 1))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), ties=st.booleans())
def test_max_pool_value_and_gradient_match_torch(seed, ties):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, 6, 8, dtype=torch.float64, generator=gen)
    if ties:  # few distinct values: many windows with tied maxima
        x = torch.round(x)
    x.requires_grad_(True)
    g = torch.randn(3, 4, 3, 4, dtype=torch.float64, generator=gen)
    out = torch.nn.functional.max_pool2d(x, 2, 2)
    (out * g).sum().backward()
    with jax.enable_x64(True):
        ours, vjp = jax.vjp(max_pool_2x2, _nhwc(x))
        np.testing.assert_array_equal(ours, _nhwc(out))
        np.testing.assert_array_equal(vjp(_nhwc(g))[0], _nhwc(x.grad))


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), shape=st.sampled_from([(5, 3, 4, 4), (9, 6)]))
def test_batch_normalize_gradient_matches_torch(seed, shape):
    """Cotangents on y, the mean and the biased variance all flow back as in autograd."""
    gen = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(*shape, dtype=torch.float64, generator=gen) + 1).requires_grad_(True)
    gy, gm, gv = (torch.randn(*s, dtype=torch.float64, generator=gen)
                  for s in (shape, shape[1:2], shape[1:2]))
    axes = [0] + list(range(2, len(shape)))
    mean = x.mean(axes)
    var = x.var(axes, unbiased=False)
    y = torch.nn.functional.batch_norm(x, None, None, training=True, eps=1e-4)
    ((y * gy).sum() + (mean * gm).sum() + (var * gv).sum()).backward()
    last = lambda t: jnp.asarray(np.moveaxis(t.detach().numpy(), 1, -1))
    with jax.enable_x64(True):
        (oy, om, ov), vjp = jax.vjp(lambda a: batch_normalize(a, 1e-4), last(x))
        np.testing.assert_allclose(oy, last(y), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(om, mean.detach().numpy(), rtol=1e-12)
        np.testing.assert_allclose(ov, var.detach().numpy(), rtol=1e-12)
        (gx,) = vjp((last(gy), jnp.asarray(gm.numpy()), jnp.asarray(gv.numpy())))
        np.testing.assert_allclose(gx, last(x.grad), rtol=1e-9, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), kh=st.sampled_from([1, 3, 5]), kw=st.sampled_from([3, 5]),
       h=st.integers(1, 7), w=st.integers(1, 7), c=st.integers(1, 4), o=st.integers(1, 4))
@example(seed=0, kh=3, kw=3, h=2, w=2, c=2, o=3)  # dense product
@example(seed=0, kh=3, kw=3, h=7, w=7, c=2, o=3)  # convolution
@example(seed=1, kh=1, kw=5, h=2, w=3, c=3, o=2)  # dense, non-square kernel
def test_conv_same_value_and_gradients_match_torch(seed, kh, kw, h, w, c, o):
    """Both forms (the dense product for images with at most kh·kw pixels, else the convolution)
    against ``conv2d(padding=k // 2)`` and its autograd, for the input and the kernel."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, c, h, w, dtype=torch.float64, generator=gen).requires_grad_(True)
    weight = torch.randn(o, c, kh, kw, dtype=torch.float64, generator=gen).requires_grad_(True)
    g = torch.randn(2, o, h, w, dtype=torch.float64, generator=gen)
    out = torch.nn.functional.conv2d(x, weight, padding=(kh // 2, kw // 2))
    (out * g).sum().backward()
    hwio = lambda t: jnp.asarray(t.detach().numpy().transpose(2, 3, 1, 0))
    with jax.enable_x64(True):
        ours, vjp = jax.vjp(conv_same, _nhwc(x), hwio(weight))
        np.testing.assert_allclose(ours, _nhwc(out), rtol=1e-12, atol=1e-12)
        gx, gw = vjp(_nhwc(g))
        np.testing.assert_allclose(gx, _nhwc(x.grad), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(gw, hwio(weight.grad), rtol=1e-12, atol=1e-12)


def test_conv_same_refuses_an_even_kernel():
    with pytest.raises(ValueError, match=r"odd spatial sizes"):
        conv_same(jnp.zeros((1, 4, 4, 2)), jnp.zeros((4, 4, 2, 3)))
