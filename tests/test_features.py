"""Feature extraction: DCT vs scipy, nearest resize vs PyTorch, crops, pooling, statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flipad_jax as fj
from flipad_jax.features import (FeatureConfig, Standardizer, center_crop, dct_features,
                                 flipad_features, max_pool_to, raw_features, resize_nearest,
                                 top_channels)


def test_dct_equals_scipy_type2_unnormalised():
    scipy_fft = pytest.importorskip("scipy.fft")
    x = np.random.default_rng(0).uniform(-1, 1, (3, 2, 64, 64)).astype(np.float32)
    crop = x[:, :, 16:48, 16:48].astype(np.float64)
    expected = np.log(np.abs(scipy_fft.dctn(crop, type=2, axes=(-2, -1), norm=None)) + 1e-10)
    np.testing.assert_allclose(dct_features(x, crop=32), expected, rtol=2e-4, atol=2e-4)


# (h, w, size, top, left) as torchvision's center_crop places the window: offset (h − size)/2
# rounded half to even (Python's round), so 0.5 → 0, 1.5 → 2, 2.5 → 2.
@pytest.mark.parametrize("h, w, size, top, left", [
    (64, 64, 32, 16, 16), (32, 32, 32, 0, 0), (33, 34, 32, 0, 1), (35, 37, 32, 2, 2),
    (36, 39, 32, 2, 4), (5, 4, 2, 2, 1), (4, 7, 1, 2, 3), (28, 29, 27, 0, 1)])
def test_center_crop_window_as_torchvision_places_it(h, w, size, top, left):
    x = np.arange(h * w, dtype=np.float32).reshape(1, 1, h, w)
    np.testing.assert_array_equal(center_crop(x, size), x[:, :, top:top + size, left:left + size])


def test_center_crop_larger_than_the_image_is_refused():
    with pytest.raises(ValueError, match=r"crop=33: expected at most the image size \(32, 40\)"):
        center_crop(np.zeros((1, 1, 32, 40), np.float32), 33)


@pytest.mark.torch
@pytest.mark.parametrize("h,size", [(64, 32), (28, 32), (50, 32), (128, 128), (33, 7)])
def test_resize_nearest_matches_torch(h, size):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(1).normal(size=(2, 3, h, h)).astype(np.float32)
    expected = torch.nn.functional.interpolate(torch.from_numpy(x), size=size).numpy()
    np.testing.assert_array_equal(resize_nearest(x, size), expected)


def test_raw_features_subsample_every_other_pixel():
    x = np.random.default_rng(2).uniform(-1, 1, size=(2, 3, 64, 64)).astype(np.float32)
    np.testing.assert_array_equal(raw_features(x, 32), x[:, :, ::2, ::2])
    np.testing.assert_array_equal(raw_features(x[:, :, :32, :32], 32), x[:, :, :32, :32])


@pytest.mark.torch
def test_max_pool_to():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    z = rng.normal(size=(2, 4, 64, 64)).astype(np.float32)
    for source in (z, rng.normal(size=(2, 4, 128, 128)).astype(np.float32)):  # kernel 2 and 4
        k = source.shape[-1] // 32
        expected = torch.nn.functional.max_pool2d(torch.from_numpy(source), k).numpy()
        np.testing.assert_array_equal(max_pool_to(source, 32), expected)
    np.testing.assert_array_equal(max_pool_to(z[:, :, :32, :32], 32), z[:, :, :32, :32])
    np.testing.assert_array_equal(max_pool_to(z[:, 0, 0, :], 32), z[:, 0, 0, :])  # vectors
    with pytest.raises(ValueError, match="pool_to=32"):
        max_pool_to(z[:, :, :48, :48], 32)


def test_standardizer_matches_numpy():
    x = np.random.default_rng(4).normal(2.0, 3.0, size=(50, 2, 3, 3)).astype(np.float32)
    s = Standardizer.fit(x)
    expected = (x - x.mean(0)) / (x.std(0, ddof=1) + 0.05)
    np.testing.assert_allclose(s(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        Standardizer.fit(x[:1])


def test_top_channels_descending():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(100, 4, 2, 2))
    b = a + np.array([0.0, 3.0, 1.0, 2.0])[None, :, None, None]
    np.testing.assert_array_equal(top_channels(a, b, 3), [1, 3, 2])
    with pytest.raises(ValueError, match="top_k=5"):
        top_channels(a, b, 5)


def _tiny_head(key, c_in=4, size=8):
    w = jax.random.normal(key, (c_in, 3, 4, 4)) * 0.3
    op = fj.ConvTranspose2d(w, stride=2, padding=1, in_size=(size, size))
    zbar = jnp.full((c_in, size, size), 1.0 / np.sqrt(2 * np.pi))  # E[relu(N(0, 1))]
    return fj.Head(op, "tanh", zbar)


def test_flipad_features_recover_the_activations_of_the_head():
    head = _tiny_head(jax.random.key(0))
    z = jax.nn.relu(jax.random.normal(jax.random.key(1), (3,) + head.in_shape))
    x = head.forward(z)
    f = flipad_features(head, x, lam=1e-6, pool_to=4, max_iter=3000, tol=1e-7)
    # the layer is injective here (48 outputs per 16 inputs), so ẑ ≈ z; then a 2×2 max-pool
    expected = np.asarray(z).reshape(3, 4, 4, 2, 4, 2).max(axis=(3, 5))
    np.testing.assert_allclose(f, expected, atol=2e-3)
    assert FeatureConfig("flipad", lam=1e-6, pool_to=None, lasso=fj.LassoOptions(max_iter=5)
                         ).extract(x, head).shape == (3, 4, 8, 8)


def test_feature_config_errors():
    with pytest.raises(ValueError, match="features='pixels'"):
        FeatureConfig("pixels")
    with pytest.raises(ValueError, match="head=None"):
        FeatureConfig("flipad").extract(np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match=r"expected \(B, C, H, W\)"):
        raw_features(np.zeros((3, 8, 8), np.float32))
