"""The per-function convolution library of XLA:CPU (flipad_jax.cpu_convolutions): the option
takes effect where it is used, and values and gradients are still those of torch's conv2d."""

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


def test_eigen_jit_leaves_no_ynnpack_convolution(ynnpack_convolutions):
    x, w = jnp.ones((2, 8, 8, 32)), jnp.ones((5, 5, 32, 32))  # YNNPACK takes it by default
    assert ynnpack_convolutions(eigen_jit(_conv, static_argnums=2), x, w, (2, 2)) == 0
    if jax.default_backend() != "cpu":
        assert eigen_jit_options() == {}
    elif ynnpack_convolutions(jax.jit(_conv, static_argnums=2), x, w, (2, 2)):
        assert eigen_jit_options()  # the option exists, and it is what removed the fusion


def test_deepsad_compiles_with_eigen_convolutions(ynnpack_convolutions):
    """The call sites use it: DeepSAD's scoring and train step on a many-channel LeNet compile
    without a YNNPACK convolution where plain jax.jit would make one (SM-Inv's Adam step:
    tests/test_sminv.py)."""
    from flipad_jax import deepsad
    from flipad_jax.networks import build_network

    net = build_network("lenet_cifar10", in_channels=32, input_size=8, widths=(32,), rep_dim=4)
    x = jnp.ones((4, 32, 8, 8))
    variables = net.init(jax.random.key(0), x[:1])
    model = deepsad.DeepSADModel(variables, jnp.zeros(4))
    step, tx, _ = deepsad._trainer(net, 1.0, 1, 1e-3, (), 0.1, 0.0)
    args = (variables["params"], variables["batch_stats"], tx.init(variables["params"]),
            jnp.zeros(4), x, jnp.ones(4, jnp.int32), jnp.arange(4))
    assert ynnpack_convolutions(step, *args) == 0
    assert ynnpack_convolutions(deepsad._score, net, model, x) == 0
    if jax.default_backend() == "cpu" and eigen_jit_options():  # so the checks are not vacuous
        assert ynnpack_convolutions(jax.jit(step.__wrapped__), *args) > 0


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
