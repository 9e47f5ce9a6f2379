"""Whole generators in JAX against PyTorch's own forward: the shipped demo generators, the
registered architectures, random layer chains, and every refusal of the converter and loader."""

import json
import shutil

import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

torch = pytest.importorskip("torch")
nn = torch.nn

from converters.demo_gans import DEMO_MODELS, GEN_OPTIONS, WEIGHTS_DIR  # noqa: E402
from converters.full_generator import convert_generator, describe  # noqa: E402
from converters.generators import build_generator  # noqa: E402
from flipad_jax.generators import Generator, UpsampledConv, from_arrays  # noqa: E402

pytestmark = pytest.mark.torch

FLOAT64_TOL = 1e-9   # float64 forward vs torch's float64 forward, max abs (observed ~1e-14)
FLOAT32_TOL = 1e-4   # float32 vs torch float32: the converter's float32 tolerance


def _torch_forward(model, z, dtype):
    model = model.eval().to(dtype)
    with torch.no_grad():
        return model(torch.from_numpy(z).to(dtype)).numpy()


def _randomise_bn(model, seed=0):
    """Non-trivial running statistics, so eval-mode BatchNorm is exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


@pytest.fixture(scope="module")
def demo_bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("generators")
    return {m.name: convert_generator(WEIGHTS_DIR / f"{m.name}.safetensors", root / m.name,
                                      arch=m.arch, arch_options=GEN_OPTIONS, check_samples=4)
            for m in DEMO_MODELS}


@pytest.mark.slow
@pytest.mark.parametrize("name", [m.name for m in DEMO_MODELS])
def test_demo_generators_match_torch(name, demo_bundles, x64):
    conversion = demo_bundles[name]
    arch = dict((m.name, m.arch) for m in DEMO_MODELS)[name]
    model = build_generator(arch, options=GEN_OPTIONS)
    from safetensors.torch import load_file
    model.load_state_dict(load_file(str(WEIGHTS_DIR / f"{name}.safetensors")))
    z = np.random.default_rng(7).standard_normal((3,) + tuple(model.latent_shape))
    for dtype, tol in ((np.float64, FLOAT64_TOL), (np.float32, FLOAT32_TOL)):
        gen = Generator.load(conversion.path, dtype=dtype)
        want = _torch_forward(model, z.astype(dtype), getattr(torch, np.dtype(dtype).name))
        got = np.asarray(gen(z.astype(dtype)))
        assert got.dtype == dtype and got.shape == (3, 1, 32, 32)
        np.testing.assert_allclose(got, want, atol=tol, rtol=0)
    assert gen.output_range == (-1.0, 1.0) and gen.latent_shape == tuple(model.latent_shape)
    assert conversion.meta["self_check"]["max_abs_error"] <= 1e-5


@pytest.mark.parametrize("arch", ["dcgan", "ebgan", pytest.param("lsgan", marks=pytest.mark.slow),
                                  "medigan_dcgan", "klwgan"])
def test_registered_architectures_match_torch(arch, tmp_path, x64):
    torch.manual_seed(1)
    model = _randomise_bn(build_generator(arch, size="small"))
    conversion = convert_generator(model, tmp_path / arch)
    gen = Generator.load(conversion.path, dtype=np.float64)
    z = np.random.default_rng(3).standard_normal((4,) + tuple(model.latent_shape))
    # KL-WGAN's spectral-norm weight W/σ is stored in float32; torch recomputes σ in float64.
    tol = 1e-5 if arch == "klwgan" else FLOAT64_TOL
    np.testing.assert_allclose(np.asarray(gen(z)), _torch_forward(model, z, torch.float64),
                               atol=tol, rtol=0)


def test_parametrized_spectral_norm_uses_the_eval_weight(tmp_path, x64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.LeakyReLU(0.1),
                          nn.utils.parametrizations.spectral_norm(nn.Linear(7, 3)), nn.Sigmoid())
    model.latent_shape = (5,)
    model.train()(torch.randn(2, 5))  # one power iteration moves u, v away from their init
    gen = Generator.load(convert_generator(model, tmp_path / "sn").path, dtype=np.float64)
    z = np.random.default_rng(0).standard_normal((6, 5))
    # The caller's model still runs (the converter works on a copy); the bundle holds W/σ
    # computed in float32, torch recomputes σ in float64 here.
    np.testing.assert_allclose(np.asarray(gen(z)), _torch_forward(model, z, torch.float64),
                               atol=1e-5, rtol=0)


@pytest.mark.slow
@settings(max_examples=12, deadline=None)
@given(kind=st.sampled_from(["conv2d", "conv_transpose2d"]), k=st.integers(1, 4),
       s=st.integers(1, 3), p=st.integers(0, 2), bias=st.booleans(), up=st.integers(1, 2),
       slope=st.floats(0.0, 0.5))
def test_random_chains_match_torch(kind, k, s, p, bias, up, slope):
    torch.manual_seed(0)
    conv = (nn.Conv2d(3, 4, k, s, min(p, k - 1), bias=bias) if kind == "conv2d" else
            nn.ConvTranspose2d(3, 4, k, s, p, output_padding=s - 1 if p else 0, bias=bias))
    model = _randomise_bn(nn.Sequential(nn.Upsample(scale_factor=up), conv, nn.BatchNorm2d(4),
                                        nn.LeakyReLU(slope), nn.Tanh()))
    model.eval()
    layers, arrays = describe(model, (3, 5, 5))
    with torch.no_grad():
        out_shape = list(model(torch.zeros(1, 3, 5, 5)).shape[1:])
    meta = {"schema_version": 1, "format": "flipad_generator", "arch": "Sequential",
            "latent_shape": [3, 5, 5], "out_shape": out_shape, "output_range": [-1, 1],
            "bn_mode": "eval", "layers": layers}
    z = np.random.default_rng(1).standard_normal((2, 3, 5, 5))
    with jax.enable_x64(True):
        got = np.asarray(from_arrays(meta, arrays, dtype=np.float64)(z))
    np.testing.assert_allclose(got, _torch_forward(model, z, torch.float64), atol=FLOAT64_TOL,
                               rtol=0)


def _upsample_conv_meta(model, size, out_shape):
    layers, arrays = describe(model, (4, size, size))
    return {"schema_version": 1, "format": "flipad_generator", "arch": "Sequential",
            "latent_shape": [4, size, size], "out_shape": list(out_shape),
            "output_range": None, "bn_mode": "eval", "layers": layers}, arrays


@settings(max_examples=15, deadline=None)
@given(sh=st.integers(1, 3), sw=st.integers(1, 3), kh=st.sampled_from([1, 3, 5]),
       kw=st.sampled_from([1, 3, 5]), groups=st.sampled_from([1, 2]), bias=st.booleans(),
       size=st.integers(2, 5), seed=st.integers(0, 2**16))
def test_fused_upsampling_matches_torch_values_and_gradients(sh, sw, kh, kw, groups, bias, size,
                                                             seed):
    """Upsample then a "same" Conv2d, run as one UpsampledConv: torch's forward, and torch's
    gradient with respect to the input (what SM-Inv₂ differentiates)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Upsample(scale_factor=(sh, sw)),
                          nn.Conv2d(4, 6, (kh, kw), 1, (kh // 2, kw // 2), groups=groups,
                                    bias=bias))
    meta, arrays = _upsample_conv_meta(model, size, (6, sh * size, sw * size))
    z = torch.randn(2, 4, size, size, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 6, sh * size, sw * size, dtype=torch.float64)
    out = model.double()(z)
    (out * g).sum().backward()
    with jax.enable_x64(True):
        gen = from_arrays(meta, arrays, dtype=np.float64)
        assert [type(layer) for layer in gen.layers] == [UpsampledConv]
        got, vjp = jax.vjp(gen, z.detach().numpy())
        np.testing.assert_allclose(got, out.detach().numpy(), atol=FLOAT64_TOL, rtol=0)
        np.testing.assert_allclose(vjp(g.numpy())[0], z.grad.numpy(), atol=FLOAT64_TOL, rtol=0)
        unfused = from_arrays(meta, arrays, dtype=np.float64, fuse_upsampling=False)
        assert len(unfused.layers) == 2


@pytest.mark.parametrize("k, stride, padding", [(4, 1, 2), (3, 1, 0), (3, 2, 1)])
def test_upsampling_is_not_fused_with_other_convolutions(k, stride, padding):
    """An even kernel, a padding other than k // 2 or a stride keep the two layers (and still
    match torch)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(4, 3, k, stride, padding))
    with torch.no_grad():
        out = model.double()(torch.randn(2, 4, 3, 3, dtype=torch.float64))
    meta, arrays = _upsample_conv_meta(model, 3, out.shape[1:])
    z = np.random.default_rng(0).standard_normal((2, 4, 3, 3))
    with jax.enable_x64(True):
        gen = from_arrays(meta, arrays, dtype=np.float64)
        assert not any(isinstance(layer, UpsampledConv) for layer in gen.layers)
        np.testing.assert_allclose(np.asarray(gen(z)), _torch_forward(model, z, torch.float64),
                                   atol=FLOAT64_TOL, rtol=0)


@pytest.mark.slow
def test_generator_is_a_pytree_that_jits(demo_bundles):
    gen = Generator.load(demo_bundles["lsgan"].path)
    z = np.random.default_rng(0).standard_normal((2, 100)).astype(np.float32)
    leaves = jax.tree_util.tree_leaves(gen)
    assert leaves and all(isinstance(leaf, jax.Array) for leaf in leaves)
    np.testing.assert_allclose(np.asarray(jax.jit(lambda g, z: g(z))(gen, z)),
                               np.asarray(gen(z)), atol=1e-5)  # XLA fuses differently


# -- refusals -----------------------------------------------------------------------------------
def test_unconvertible_architecture_is_named(tmp_path):
    model = build_generator("sd_vae_last", size="small")
    with pytest.raises(ValueError, match="SDVAELastBlock.*cannot be converted whole"):
        convert_generator(model, tmp_path / "sd")
    assert not (tmp_path / "sd").exists()


@pytest.mark.parametrize("layer, match", [
    (nn.Dropout(0.1), r"layer '1' \(Dropout"),
    (nn.BatchNorm2d(2, track_running_stats=False), r"layer '1' \(BatchNorm2d\).*running"),
    (nn.Upsample(scale_factor=2, mode="bilinear"), r"layer '1' \(Upsample"),
    (nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), r"layer '1'.*'reflect'"),
])
def test_unconvertible_layer_is_named(layer, match, tmp_path):
    model = nn.Sequential(nn.ConvTranspose2d(3, 2, 4, 1, 0), layer)
    model.latent_shape = (3, 1, 1)
    with pytest.raises(ValueError, match=match):
        convert_generator(model, tmp_path / "g")


def test_torchscript_program_is_refused(tmp_path):
    model = build_generator("dcgan", size="small")
    path = tmp_path / "g.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    with pytest.raises(ValueError, match="torchscript program: cannot be converted whole"):
        convert_generator(path, tmp_path / "g")


def test_existing_output_is_refused(demo_bundles):
    path = demo_bundles["dcgan"].path
    with pytest.raises(ValueError, match="already exists"):
        convert_generator(WEIGHTS_DIR / "dcgan.safetensors", path, arch="dcgan",
                          arch_options=GEN_OPTIONS)


def _edited_copy(src, dst, edit):
    shutil.copytree(src, dst)
    meta = json.loads((dst / "generator.json").read_text())
    edit(meta)
    (dst / "generator.json").write_text(json.dumps(meta))
    return dst


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["layers"][2].update(type="gelu"), r"'layers\[2\].type' is 'gelu'"),
    (lambda m: m.update(bn_mode="train"), r"'bn_mode' is 'train'"),
    (lambda m: m.update(out_shape=[1, 64, 64]), r"'out_shape' is \[1, 64, 64\].*\[1, 32, 32\]"),
    (lambda m: m["layers"][0].update(name="nope"), r"lacks 'nope.weight'"),
    (lambda m: m["layers"][0].update(stride=[1]), r"'layers\[0\].stride'"),
])
def test_loader_names_the_bad_field(edit, match, demo_bundles, tmp_path):
    folder = _edited_copy(demo_bundles["dcgan"].path, tmp_path / "bad", edit)
    with pytest.raises(ValueError, match=match):
        Generator.load(folder)


def test_loader_refuses_a_folder_without_a_bundle(tmp_path):
    with pytest.raises(ValueError, match="generator.json is missing"):
        Generator.load(tmp_path)


def test_latent_check(demo_bundles):
    gen = Generator.load(demo_bundles["dcgan"].path)
    with pytest.raises(ValueError, match=r"z has shape \(2, 100\): expected \(B, 100, 1, 1\)"):
        gen.check_latents("z", np.zeros((2, 100), np.float32))
