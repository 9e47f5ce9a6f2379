"""SM-Inv₂: the Adam reconstruction against torch's Adam on torch's generator, latent recovery for
samples G made, G-made samples scoring below real Fashion-MNIST images, thresholds, bad input."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from converters.demo_gans import GEN_OPTIONS, WEIGHTS_DIR  # noqa: E402
from converters.full_generator import convert_generator  # noqa: E402
from converters.generators import build_generator  # noqa: E402
from flipad_jax.cpu_convolutions import eigen_jit_options  # noqa: E402
from flipad_jax.datasets import fashion_mnist  # noqa: E402
from flipad_jax.generators import Generator  # noqa: E402
from flipad_jax.images import pixels_to_range  # noqa: E402
from flipad_jax.sminv import (SMInv2, _adam, _adam_step, initial_latents,  # noqa: E402
                              reconstruct)

pytestmark = pytest.mark.torch


def _small_model():
    """A small DCGAN (latent 8, 1×16×16) with non-trivial BatchNorm running statistics."""
    torch.manual_seed(1)
    model = build_generator("dcgan", size="small", options=dict(nz=8, nc=1))
    g = torch.Generator().manual_seed(2)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    model = _small_model()
    path = convert_generator(model, tmp_path_factory.mktemp("small") / "g").path
    return model, path


@pytest.fixture(scope="module")
def demo_dcgan(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo") / "dcgan"
    return Generator.load(convert_generator(WEIGHTS_DIR / "dcgan.safetensors", path, arch="dcgan",
                                            arch_options=GEN_OPTIONS, check_samples=2).path)


def test_adam_trajectory_matches_torch(small, x64):
    """Restarts × samples of Adam on each latent's own per-pixel MSE, as torch.optim.Adam on
    torch's generator computes it (float64)."""
    model, path = small
    gen = Generator.load(path, dtype=np.float64)
    restarts, n, steps = 2, 3, 15
    x = np.random.default_rng(0).uniform(-0.9, 0.9, (n, 1, 16, 16))
    key = jax.random.key(4)
    ours = reconstruct(gen, x, key=key, restarts=restarts, steps=steps, progress=False)

    z0 = np.asarray(initial_latents(key, restarts, np.arange(n), (8, 1, 1), np.float64))
    model = model.double()
    z = torch.tensor(z0.reshape(restarts * n, 8, 1, 1), requires_grad=True)
    opt = torch.optim.Adam([z], lr=0.1)
    target = torch.from_numpy(x).reshape(1, n, -1)

    def per_restart(z):
        return (model(z).reshape(restarts, n, -1) - target).square().mean(-1)

    for _ in range(steps):
        opt.zero_grad()
        per_restart(z).sum().backward()
        opt.step()
    with torch.no_grad():
        d = per_restart(z).numpy()
    np.testing.assert_allclose(ours.restart_distances, d.T, rtol=1e-8, atol=1e-12)
    best = d.argmin(0)
    np.testing.assert_array_equal(ours.restart, best)
    np.testing.assert_allclose(ours.distance, d.min(0), rtol=1e-8, atol=1e-12)
    z_best = z.detach().numpy().reshape(restarts, n, 8, 1, 1)[best, np.arange(n)]
    np.testing.assert_allclose(ours.z, z_best, rtol=1e-7, atol=1e-9)


def test_recovers_the_latent_of_a_sample_g_made(small):
    _, path = small
    gen = Generator.load(path)
    z_true = np.random.default_rng(5).standard_normal((2, 8, 1, 1)).astype(np.float32)
    x = np.asarray(gen(z_true))
    rec = reconstruct(gen, x, key=jax.random.key(0), restarts=2, steps=300, progress=False)
    assert np.all(rec.distance < 1e-10)             # reconstruction error ~ 0
    np.testing.assert_allclose(rec.z, z_true, atol=1e-4)  # and the latent itself


@pytest.mark.slow
def test_g_made_samples_score_below_real_images(demo_dcgan):
    z = np.random.default_rng(0).standard_normal((2, 100, 1, 1)).astype(np.float32)
    made = np.asarray(demo_dcgan(z))
    real = pixels_to_range(fashion_mnist("test", 32)[:2])
    rec = reconstruct(demo_dcgan, np.concatenate([made, real]), key=jax.random.key(1),
                      restarts=2, steps=500, progress=False)
    # Measured: made 0.0024, 0.0013; real 0.0101, 0.0419 (the paper's 1000 steps widen it).
    assert rec.distance[:2].max() < rec.distance[2:].min() / 2, rec.distance


def test_adam_step_compiles_with_eigen_convolutions(demo_dcgan, ynnpack_convolutions):
    """SM-Inv's Adam step runs the generator's convolutions through Eigen on a CPU
    (flipad_jax.cpu_convolutions), where plain jax.jit uses YNNPACK."""
    z = jnp.zeros((2, 100, 1, 1))
    args = (demo_dcgan, z, _adam(0.1).init(z), jnp.zeros((2, 32 * 32)), 0.1)
    plain = jax.jit(_adam_step.__wrapped__, static_argnames="features")
    assert ynnpack_convolutions(_adam_step, *args, features=None) == 0
    if jax.default_backend() == "cpu" and eigen_jit_options():  # so the check is not vacuous
        assert ynnpack_convolutions(plain, *args, features=None) > 0


def test_results_do_not_depend_on_batching(small):
    gen = Generator.load(small[1])
    x = np.random.default_rng(1).uniform(-1, 1, (3, 1, 16, 16)).astype(np.float32)
    kw = dict(key=jax.random.key(2), restarts=3, steps=4, progress=False)
    whole = reconstruct(gen, x, batch_size=3, **kw)
    compiled = _adam_step._cache_size()
    padded = reconstruct(gen, x, batch_size=2, **kw)  # a batch of 2, then 1 padded to 2
    assert _adam_step._cache_size() == compiled + 1  # one compilation for both calls
    for a, b in zip(whole, padded):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert whole.z.shape == (3, 8, 1, 1) and whole.restart_distances.shape == (3, 3)


def test_paper_settings_are_the_defaults():
    for fn in (reconstruct, SMInv2):
        params = inspect.signature(fn).parameters
        assert (params["restarts"].default, params["steps"].default, params["lr"].default) == \
            (10, 1000, 0.1)


def test_detector_thresholds_on_training_scores(small, tmp_path):
    gen = Generator.load(small[1])
    rng = np.random.default_rng(3)
    x_train = np.asarray(gen(rng.standard_normal((4, 8, 1, 1)).astype(np.float32)))
    det = SMInv2(gen, restarts=2, steps=100, fnrs=(0.25,), progress=False).fit(x_train)
    assert det.train_scores_.shape == (4,)
    # τ(0.25) is the 0.75 quantile of the 4 training scores: at most one lies above it.
    assert np.sum(det.train_scores_ > det.thresholds_[0.25]) <= 1
    x_new = np.concatenate([np.asarray(gen(rng.standard_normal((1, 8, 1, 1)).astype(np.float32))),
                            rng.uniform(-1, 1, (1, 1, 16, 16)).astype(np.float32)])
    scores = det.anomaly_score(x_new)
    assert scores[0] < scores[1]
    np.testing.assert_array_equal(det.made_by_g(x_new), scores <= det.thresholds_[0.25])

    det.save(tmp_path / "sminv.json")
    back = SMInv2.load(tmp_path / "sminv.json", gen)
    assert back.thresholds_ == det.thresholds_ and back.config == det.config
    np.testing.assert_array_equal(back.train_scores_, det.train_scores_)


def test_load_refuses_another_generator(small, demo_dcgan, tmp_path):
    gen = Generator.load(small[1])
    x = np.asarray(gen(np.zeros((4, 8, 1, 1), np.float32)))
    SMInv2(gen, restarts=1, steps=1, fnrs=(0.25,), progress=False).fit(x).save(tmp_path / "d")
    with pytest.raises(ValueError, match="expected the generator the detector was fitted with"):
        SMInv2.load(tmp_path / "d", demo_dcgan)


@pytest.mark.parametrize("change, match", [
    (dict(images=np.zeros((2, 1, 32, 32), np.float32)), r"images has shape \(2, 1, 32, 32\)"),
    (dict(images=np.zeros((0, 1, 16, 16), np.float32)), r"images has shape \(0, 1, 16, 16\)"),
    (dict(images=np.full((1, 1, 16, 16), np.nan, np.float32)), "images holds 256 NaN"),
    (dict(images=np.zeros((1, 1, 16, 16), np.int32)), "images has dtype int32"),
    (dict(restarts=0), "restarts=0: expected an int >= 1"),
    (dict(steps=2.5), "steps=2.5: expected an int >= 1"),
    (dict(batch_size=True), "batch_size=True: expected an int >= 1"),
    (dict(lr=-0.1), r"lr=-0.1: expected a finite number > 0"),
])
def test_bad_input_is_named(small, change, match):
    gen = Generator.load(small[1])
    kw = dict(images=np.zeros((1, 1, 16, 16), np.float32), key=jax.random.key(0), steps=1,
              progress=False)
    kw.update(change)
    with pytest.raises(ValueError, match=match):
        reconstruct(gen, kw.pop("images"), **kw)


def test_detector_refuses_bad_settings_and_unfitted_use(small):
    gen = Generator.load(small[1])
    with pytest.raises(ValueError, match=r"fnr=1.5"):
        SMInv2(gen, fnrs=(1.5,))
    with pytest.raises(ValueError, match="seed=-1"):
        SMInv2(gen, seed=-1)
    with pytest.raises(ValueError, match="not fitted"):
        SMInv2(gen).threshold(0.005)
    with pytest.raises(ValueError, match=r"x_train has 4 samples: expected at least 200"):
        SMInv2(gen, restarts=1, steps=1, progress=False).fit(np.zeros((4, 1, 16, 16), np.float32))
