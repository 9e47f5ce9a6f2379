"""``flipad convert --diffusers``: a small random diffusers AutoencoderKL, saved with diffusers'
own ``save_pretrained``, converted through the CLI. Truth is the diffusers model itself (its
decoder's output and the input of ``decoder.conv_out``, seen by a forward hook), PyTorch's own
convolutions (the lasso's optimality conditions) and hashlib."""

import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
F = torch.nn.functional

import flipad_jax as fj  # noqa: E402
from flipad_jax import features  # noqa: E402
from flipad_jax.cli import main  # noqa: E402
from converters.diffusers_vae import convert_diffusers  # noqa: E402

pytestmark = pytest.mark.torch

SAMPLES, SEED = 12, 3


def _tiny_vae():
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
        layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16).eval()


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    _tiny_vae().save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def bundle(vae_dir):
    out = vae_dir.parent / "bundle"
    assert main(["convert", "--diffusers", str(vae_dir), "--out", str(out), "--samples",
                 str(SAMPLES), "--seed", str(SEED), "--check-samples", "2", "--quiet"]) == 0
    return out


def _decode64(latents):
    """(decoder output, input of decoder.conv_out) in float64, the pipeline's latent scaling."""
    vae = _tiny_vae().double()
    seen = {}
    hook = vae.decoder.conv_out.register_forward_hook(lambda m, i, o: seen.update(i=i[0]))
    with torch.no_grad():
        x = vae.decode(latents.double() / vae.config.scaling_factor).sample
    hook.remove()
    return x.numpy(), seen["i"].numpy()


def test_head_reproduces_the_decoder_in_float64(bundle):
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    x, head_in = _decode64(latents)
    with jax.enable_x64(True):
        head = fj.Head.load(bundle, dtype=jnp.float64)
        out = np.asarray(head.forward(head_in))
    assert np.max(np.abs(out - x)) <= 1e-5
    meta = json.loads((bundle / "head.json").read_text())
    assert meta["self_check"]["dtype"] == "float64"
    assert meta["self_check"]["max_abs_error"] <= 1e-5


def test_bundle_records_the_head_the_paper_inverts(vae_dir, bundle):
    meta = json.loads((bundle / "head.json").read_text())
    assert meta["layer"] == {"kind": "conv2d", "name": "vae.decoder.conv_out", "has_bias": True,
                             "stride": [1, 1], "padding": [1, 1], "dilation": [1, 1],
                             "groups": 1}
    assert (meta["in_shape"], meta["out_shape"]) == ([8, 16, 16], [3, 16, 16])
    assert meta["activation"] == "identity" and meta["output_range"] == [-1.0, 1.0]
    assert meta["features"] == {"downsample": "crop", "size": 128}
    assert meta["diffusers"]["scaling_factor"] == pytest.approx(0.18215)
    weights = (vae_dir / "diffusion_pytorch_model.safetensors").read_bytes()
    assert meta["source"]["format"] == "diffusers"
    assert meta["source"]["sha256"] == hashlib.sha256(weights).hexdigest()


def test_zbar_is_the_mean_conv_out_input_over_unit_latents(bundle):
    # latent i of seed s: numpy's default_rng([s, i]) standard normal (head.json latent_scheme)
    latents = torch.from_numpy(np.stack([
        np.random.default_rng([SEED, i]).standard_normal((4, 8, 8), np.float32)
        for i in range(SAMPLES)]))
    _, head_in = _decode64(latents)
    zbar = fj.Head.load(bundle).zbar
    np.testing.assert_allclose(np.asarray(zbar), head_in.mean(axis=0), rtol=0, atol=1e-5)


def test_inverting_a_decoded_image_meets_the_lasso_optimality_conditions(bundle):
    """At ẑ, g = Aᵀ(Aẑ + b − x) (PyTorch's conv and its transpose) must satisfy
    |g| ≤ λ everywhere and g = −λ·sign(ẑ − z̄) where ẑ ≠ z̄."""
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(11))
    x, _ = _decode64(latents)
    x = np.clip(x, -1.0, 1.0)  # the images the pipeline writes
    lam = 1e-3
    with jax.enable_x64(True):
        head = fj.Head.load(bundle, dtype=jnp.float64)
        res = head.invert(x, lam=lam, max_iter=20000, tol=1e-12)
        z, zbar = np.array(res.z), np.array(head.zbar)
        weight, bias = np.array(head.op.weight), np.array(head.bias)  # writable, for torch
    assert int(np.asarray(res.clipped).sum()) == 0  # identity: the target is x, nothing moved
    w = torch.from_numpy(weight)
    residual = F.conv2d(torch.from_numpy(z), w, torch.from_numpy(bias), padding=1) - \
        torch.from_numpy(x)
    g = F.conv_transpose2d(residual, w, padding=1).numpy()
    tol = 1e-6
    assert np.max(np.abs(g)) <= lam + tol
    active = np.abs(z - zbar) > 1e-9
    assert active.any() and not active.all()
    np.testing.assert_allclose(g[active], -lam * np.sign(z - zbar)[active], rtol=0, atol=tol)


def test_downsample_modes_against_closed_forms():
    z = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    np.testing.assert_array_equal(features.downsample(z, 8, "crop"), z[:, :, 4:12, 4:12])
    pooled = F.max_pool2d(torch.from_numpy(z), 2).numpy()
    np.testing.assert_array_equal(features.downsample(z, 8, "maxpool"), pooled)
    np.testing.assert_array_equal(features.downsample(z, 32, "crop"), z)  # already small
    with pytest.raises(ValueError, match="downsample='avg'"):
        features.downsample(z, 8, "avg")
    with pytest.raises(ValueError, match="downsample='avg'"):
        fj.FeatureConfig(downsample="avg")
    config = fj.FeatureConfig(downsample="crop", pool_to=128)
    assert fj.FeatureConfig(**json.loads(json.dumps(config.to_json()))) == config


def test_features_of_a_diffusers_head_are_centre_crops(bundle):
    images = np.zeros((2, 3, 16, 16), np.float32)
    head = fj.Head.load(bundle)
    config = fj.FeatureConfig(downsample="crop", pool_to=8, lasso=fj.LassoOptions(max_iter=5))
    full = config.replace(pool_to=None).extract(images, head)
    np.testing.assert_array_equal(config.extract(images, head), np.asarray(full)[:, :, 4:12, 4:12])


@pytest.mark.slow
def test_fit_takes_the_bundles_downsample_unless_told(bundle, tmp_path):
    rng = np.random.default_rng(0)
    x, _ = _decode64(torch.from_numpy(rng.standard_normal((40, 4, 8, 8), np.float32)))
    np.save(tmp_path / "g.npy", np.clip(x, -1, 1).astype(np.float32))
    np.save(tmp_path / "other.npy", rng.uniform(-1, 1, (30, 3, 16, 16)).astype(np.float32))
    base = ["fit", "--features", "flipad", "--bundle", str(bundle), "--model",
            str(tmp_path / "g.npy"), "--other", str(tmp_path / "other.npy"), "--val-fraction",
            "0.5", "--max-iter", "20", "--fnr", "0.05", "--epochs", "1", "--batch-size", "16",
            "--network-opt",
            "widths=[8,8]", "--network-opt", "rep_dim=8", "--quiet"]
    told = {"recorded": [], "told": ["--downsample", "maxpool", "--pool-to", "8"]}
    for name, flags in told.items():
        assert main(base + flags + ["--out", str(tmp_path / name)]) == 0
    recorded = fj.Detector.load(tmp_path / "recorded", progress=False).feature_config
    assert (recorded.downsample, recorded.pool_to) == ("crop", 128)
    told = fj.Detector.load(tmp_path / "told", progress=False).feature_config
    assert (told.downsample, told.pool_to) == ("maxpool", 8)


def test_a_bad_recorded_downsample_is_refused_naming_the_field(bundle, tmp_path):
    import shutil
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    meta = json.loads((copy / "head.json").read_text())
    (copy / "head.json").write_text(json.dumps({**meta, "features": {"downsample": "avg",
                                                                     "size": 128}}))
    with pytest.raises(ValueError, match="field 'features.downsample' is 'avg'"):
        fj.Head.load(copy)


# -- refusals -----------------------------------------------------------------------------------
def test_folder_without_config_is_refused(tmp_path, capsys):
    assert main(["convert", "--diffusers", str(tmp_path), "--out", str(tmp_path / "b")]) == 1
    assert "no config.json" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_pickled_checkpoint_is_refused_unread(vae_dir, tmp_path):
    folder = tmp_path / "vae_bin"
    folder.mkdir()
    (folder / "config.json").write_text((vae_dir / "config.json").read_text())
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(ValueError, match=r"only pickled weights \(diffusion_pytorch_model.bin\)"):
        convert_diffusers(folder, tmp_path / "b")


def test_other_model_classes_are_refused(vae_dir, tmp_path):
    folder = tmp_path / "unet"
    folder.mkdir()
    config = json.loads((vae_dir / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match="_class_name is 'UNet2DModel'"):
        convert_diffusers(folder, tmp_path / "b")


def test_bad_downsample_is_refused(vae_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["convert", "--diffusers", str(vae_dir), "--out", str(tmp_path / "b"),
              "--downsample", "avg"])
    assert exit_.value.code == 2 and "invalid choice: 'avg'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="downsample='avg'"):
        convert_diffusers(vae_dir, tmp_path / "b", downsample="avg")
    with pytest.raises(ValueError, match="pool_to=5"):  # 16x16 maps do not max-pool to 5
        convert_diffusers(vae_dir, tmp_path / "b", downsample="maxpool", downsample_size=5)
    assert not (tmp_path / "b").exists()


def test_model_and_diffusers_together_are_a_usage_error(vae_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["convert", "netG.pth", "--diffusers", str(vae_dir), "--out", str(tmp_path / "b")])
    assert exit_.value.code == 2 and "not allowed with" in capsys.readouterr().err
    assert main(["convert", "--diffusers", str(vae_dir), "--arch", "dcgan",
                 "--out", str(tmp_path / "b")]) == 1
    assert "--arch: not used with --diffusers" in capsys.readouterr().err
