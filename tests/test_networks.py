"""DeepSAD networks: no bias anywhere, shapes, channel selection, PyTorch parity of the layers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flipad_jax.networks import ARCHITECTURES, build_network, default_network

SHAPES = {"lenet_cifar10": (3, 32, 32), "lenet_64channels": (64, 32, 32),
          "lenet_64channels_64x64": (64, 64, 64), "lenet_128x128": (1, 128, 128),
          "biglenet_128x128": (3, 128, 128), "mlp": (100,)}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_architectures_have_no_bias_and_no_affine_bn(name):
    net = build_network(name)
    x = jnp.zeros((2,) + SHAPES[name])
    variables = jax.eval_shape(net.init, jax.random.key(0), x)
    paths = [jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_leaves_with_path(variables["params"])]
    assert paths and all(p.endswith("['kernel']") for p in paths), paths
    stats = {p[-1].key for p, _ in
             jax.tree_util.tree_leaves_with_path(variables["batch_stats"])}
    assert stats == {"mean", "var"}  # BatchNorm holds running statistics, no scale or shift
    rep = 32 if name == "mlp" else 128
    assert jax.eval_shape(lambda v: net.apply(v, x), variables).shape == (2, rep)


def test_channel_selection_uses_only_the_chosen_channels():
    net = build_network("lenet_cifar10", in_channels=5, input_size=16, widths=(4, 4),
                        channels=(3, 1))
    x = jax.random.normal(jax.random.key(1), (4, 5, 16, 16))
    v = jax.jit(net.init)(jax.random.key(0), x)
    assert v["params"]["conv0"]["kernel"].shape == (5, 5, 2, 4)
    apply = jax.jit(net.apply)
    x2 = x.at[:, (0, 2, 4)].set(123.0)  # unselected channels do not matter
    np.testing.assert_array_equal(apply(v, x), apply(v, x2))


def test_bad_input_and_config_errors():
    net = build_network("lenet_cifar10")
    v = net.init(jax.random.key(0), jnp.zeros((1, 3, 32, 32)))
    with pytest.raises(ValueError, match=r"expected \(B, 3, 32, 32\)"):
        net.apply(v, jnp.zeros((1, 4, 32, 32)))
    with pytest.raises(ValueError, match="network='nope'"):
        build_network("nope")
    with pytest.raises(ValueError, match="network_kwargs"):
        build_network("mlp", widths=(3,))
    with pytest.raises(ValueError, match="channels"):
        build_network("lenet_cifar10", channels=(0, 3))
    with pytest.raises(ValueError, match="input_size=30"):
        build_network("lenet_cifar10", input_size=30).init(jax.random.key(0),
                                                            jnp.zeros((1, 3, 30, 30)))


def test_default_network_follows_the_reference():
    assert default_network((3, 32, 32)) == ("lenet_cifar10", dict(in_channels=3, input_size=32))
    assert default_network((64, 32, 32))[0] == "lenet_64channels"
    assert default_network((64, 64, 64))[0] == "lenet_64channels_64x64"
    assert default_network((1, 128, 128))[0] == "lenet_128x128"
    assert default_network((3, 128, 128))[0] == "biglenet_128x128"
    assert default_network((11,)) == ("mlp", dict(in_features=11))


def _torch_lenet(torch, widths, in_ch, stem):
    nn, F = torch.nn, torch.nn.functional

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(in_ch, in_ch, 4, 2, 1, bias=False) if stem else None
            chans = (in_ch,) + tuple(widths)
            self.convs = nn.ModuleList(nn.Conv2d(a, b, 5, padding=2, bias=False)
                                       for a, b in zip(chans[:-1], chans[1:]))
            self.bns = nn.ModuleList(nn.BatchNorm2d(b, eps=1e-4, affine=False) for b in widths)
            self.fc = nn.LazyLinear(16, bias=False)

        def forward(self, x):
            if self.stem is not None:
                x = F.leaky_relu(self.stem(x))
            for c, b in zip(self.convs, self.bns):
                x = F.max_pool2d(F.leaky_relu(b(c(x))), 2, 2)
            return self.fc(x.flatten(1))
    return Net()


@pytest.mark.torch
@pytest.mark.parametrize("stem", [False, True])
def test_lenet_matches_pytorch_in_train_and_eval_mode(stem):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    in_ch, size, widths = 4, 16 if stem else 8, (6, 5)
    tnet = _torch_lenet(torch, widths, in_ch, stem).double()
    x = torch.randn(8, in_ch, size, size, dtype=torch.float64)
    tnet(x)  # materialise the lazy Linear, then forget that pass's statistics
    for bn in tnet.bns:
        bn.reset_running_stats()
    net = build_network("lenet_cifar10", in_channels=in_ch, input_size=size, widths=widths,
                        rep_dim=16, stem=stem)
    with jax.enable_x64(True):
        v = net.init(jax.random.key(0), jnp.zeros((1, in_ch, size, size), jnp.float32))
        params = {f"conv{i}": {"kernel": jnp.asarray(c.weight.detach().numpy().transpose(2, 3, 1, 0))}
                  for i, c in enumerate(tnet.convs)}
        params["fc"] = {"kernel": jnp.asarray(tnet.fc.weight.detach().numpy().T)}
        if stem:
            params["stem"] = {"kernel": jnp.asarray(tnet.stem.weight.detach().numpy()
                                                    .transpose(2, 3, 1, 0))}
        v = {"params": params, "batch_stats": jax.tree_util.tree_map(
            lambda a: a.astype(jnp.float64), v["batch_stats"])}
        xj = jnp.asarray(x.numpy())
        for _ in range(2):  # two updates of the running statistics
            out, upd = net.apply(v, xj, train=True, mutable=["batch_stats"])
            v = {"params": params, "batch_stats": upd["batch_stats"]}
            tout = tnet.train()(x)
            np.testing.assert_allclose(out, tout.detach().numpy(), rtol=1e-10, atol=1e-10)
        for i, bn in enumerate(tnet.bns):
            np.testing.assert_allclose(v["batch_stats"][f"bn{i}"]["mean"], bn.running_mean, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(v["batch_stats"][f"bn{i}"]["var"], bn.running_var, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(net.apply(v, xj), tnet.eval()(x).detach().numpy(),
                                   rtol=1e-10, atol=1e-10)


@pytest.mark.torch
def test_mlp_matches_pytorch():
    torch = pytest.importorskip("torch")
    nn, F = torch.nn, torch.nn.functional
    torch.manual_seed(1)
    dims = (7, 9, 5)
    lins = [nn.Linear(a, b, bias=False).double() for a, b in zip(dims[:-1], dims[1:])]
    bns = [nn.BatchNorm1d(b, eps=1e-4, affine=False).double() for b in dims[1:]]
    code = nn.Linear(5, 3, bias=False).double()
    x = torch.randn(6, 7, dtype=torch.float64)
    h = x
    for lin, bn in zip(lins, bns):
        h = F.leaky_relu(bn(lin(h)))
    tout = code(h)
    net = build_network("mlp", in_features=7, hidden=(9, 5), rep_dim=3)
    with jax.enable_x64(True):
        params = {f"fc{i}": {"kernel": jnp.asarray(l.weight.detach().numpy().T)} for i, l in enumerate(lins)}
        params["code"] = {"kernel": jnp.asarray(code.weight.detach().numpy().T)}
        stats = {f"bn{i}": {"mean": jnp.zeros(d, jnp.float64), "var": jnp.ones(d, jnp.float64)}
                 for i, d in enumerate(dims[1:])}
        out, upd = net.apply({"params": params, "batch_stats": stats}, jnp.asarray(x.numpy()),
                             train=True, mutable=["batch_stats"])
        np.testing.assert_allclose(out, tout.detach().numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(upd["batch_stats"]["bn1"]["var"], bns[1].running_var, rtol=1e-10)


def test_init_follows_pytorch_default_bounds():
    net = build_network("lenet_cifar10")
    v = net.init(jax.random.key(0), jnp.zeros((1, 3, 32, 32)))
    k = np.asarray(v["params"]["conv0"]["kernel"])
    bound = 1 / np.sqrt(3 * 25)
    assert np.abs(k).max() <= bound and np.abs(k).max() > 0.9 * bound


@pytest.mark.torch
def test_lenet_train_mode_gradients_match_pytorch():
    """Weight gradients in train mode (BatchNorm with batch statistics, max-pool) as autograd's."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(2)
    in_ch, size, widths = 3, 8, (6, 5)
    tnet = _torch_lenet(torch, widths, in_ch, False).double()
    x = torch.randn(8, in_ch, size, size, dtype=torch.float64)
    tnet(x)
    g = torch.randn(8, 16, dtype=torch.float64)
    (tnet.train()(x) * g).sum().backward()
    net = build_network("lenet_cifar10", in_channels=in_ch, input_size=size, widths=widths,
                        rep_dim=16)
    with jax.enable_x64(True):
        params = {f"conv{i}": {"kernel": jnp.asarray(c.weight.detach().numpy().transpose(2, 3, 1, 0))}
                  for i, c in enumerate(tnet.convs)}
        params["fc"] = {"kernel": jnp.asarray(tnet.fc.weight.detach().numpy().T)}
        stats = {f"bn{i}": {"mean": jnp.zeros(w, jnp.float64), "var": jnp.ones(w, jnp.float64)}
                 for i, w in enumerate(widths)}
        grads = jax.grad(lambda p: jnp.sum(net.apply({"params": p, "batch_stats": stats},
                                                     jnp.asarray(x.numpy()), train=True,
                                                     mutable=["batch_stats"])[0]
                                           * jnp.asarray(g.numpy())))(params)
        for i, c in enumerate(tnet.convs):
            np.testing.assert_allclose(grads[f"conv{i}"]["kernel"],
                                       c.weight.grad.numpy().transpose(2, 3, 1, 0),
                                       rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(grads["fc"]["kernel"], tnet.fc.weight.grad.numpy().T,
                                   rtol=1e-9, atol=1e-12)
