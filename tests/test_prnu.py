"""SM-F (PRNU fingerprint): the wavelet transform and the residual against PyWavelets + scipy,
the fingerprint on a planted pattern, and bad input."""

import warnings

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from flipad_jax.prnu import (fingerprint, noise_residual, sm_f_scores, wavedec2, waverec2)

pywt = pytest.importorskip("pywt")
ndimage = pytest.importorskip("scipy.ndimage")


def _pywt_quiet(fn, *args, **kwargs):
    # PyWavelets warns that 4 levels are too many for 32×32; the reference runs them anyway.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fn(*args, **kwargs)


def _shrink(x, noise_var):
    """The toolbox's WaveNoise, written from its description with scipy."""
    local = np.stack([ndimage.uniform_filter(x * x, w, mode="constant") for w in (3, 5, 7, 9)])
    var = np.maximum(local - noise_var, 0).min(axis=0)
    return x * noise_var / (var + noise_var)


def _zero_mean(x):
    x = x - x.mean()
    return x - x.mean(axis=1, keepdims=True) - x.mean(axis=0, keepdims=True)


def _expected_residual(img_chw):
    """Steps 1–6 of the reference for one ``(C, H, W)`` image, float64, with pywt and scipy."""
    c, h, w = img_chw.shape
    noise = np.zeros((c, h, w))
    for ch in range(c):
        coeffs = _pywt_quiet(pywt.wavedec2, img_chw[ch].astype(np.float64), "db4", level=4)
        coeffs = [np.zeros_like(coeffs[0])] + [tuple(_shrink(b, 25.0) for b in lvl)
                                               for lvl in coeffs[1:]]
        noise[ch] = pywt.waverec2(coeffs, "db4")[:h, :w]
    grey = noise[0] if c == 1 else np.tensordot([0.29893602, 0.58704307, 0.11402090], noise, 1)
    for r in (0, 1):
        for s in (0, 1):
            grey[r::2, s::2] = _zero_mean(grey[r::2, s::2])
    spectrum = np.fft.fft2(grey)
    mag = np.abs(spectrum) / np.sqrt(h * w)
    shrunk = np.where(mag == 0, 0, _shrink(mag, grey.var(ddof=1)))
    return np.real(np.fft.ifft2(spectrum * shrunk / np.where(mag == 0, 1, mag)))


def _images(shape, seed=0):
    """Smooth gradients plus texture, 8-bit: structure at several scales like a real image."""
    rng = np.random.default_rng(seed)
    b, c, h, w = shape
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = 128 + 80 * np.sin(3 * xx + rng.uniform(0, 6, (b, c, 1, 1))) * np.cos(2 * yy)
    return np.clip(base + rng.normal(0, 12, shape), 0, 255).astype(np.uint8)


@pytest.mark.slow
@settings(max_examples=10, deadline=None)
@given(h=st.integers(2, 40), w=st.integers(2, 40), levels=st.integers(1, 4))
def test_wavelet_transform_matches_pywavelets(h, w, levels):
    x = np.random.default_rng(h * 41 + w).normal(size=(2, h, w))
    ours = wavedec2(np.float32(x), levels)
    theirs = _pywt_quiet(pywt.wavedec2, x, "db4", level=levels, axes=(-2, -1))
    np.testing.assert_allclose(ours[0], theirs[0], atol=1e-4)
    for mine, ref in zip(ours[1:], theirs[1:]):
        for a, b in zip(mine, ref):
            np.testing.assert_allclose(a, b, atol=1e-4)
    expected = pywt.waverec2(theirs, "db4", axes=(-2, -1))[..., :h, :w]
    np.testing.assert_allclose(waverec2(ours, (h, w)), expected, atol=1e-4)
    np.testing.assert_allclose(expected, x, atol=1e-9)  # the inverse is exact


@pytest.mark.parametrize("shape", [(3, 3, 32, 32), (2, 1, 28, 28), (2, 3, 64, 64),
                                   (1, 3, 33, 30)])
def test_residual_matches_reference_steps(shape):
    images = _images(shape)
    expected = np.stack([_expected_residual(img) for img in images])
    got = noise_residual(images)
    assert got.shape == (shape[0],) + shape[2:] and got.dtype == np.float32
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got, expected, atol=2e-4 * scale)


def test_float_and_uint8_pixels_agree():
    images = _images((2, 3, 32, 32))
    np.testing.assert_array_equal(noise_residual(images),
                                  noise_residual(images.astype(np.float32)))


def test_batching_does_not_change_residuals():
    images = _images((50, 1, 32, 32))  # the shape the planted-pattern test compiles too
    np.testing.assert_allclose(noise_residual(images, batch_size=25),
                               noise_residual(images, batch_size=50),
                               atol=1e-4)  # float32 rounding of differently compiled batches


def test_black_image_has_zero_residual_and_score():
    # the reference divides 0 by 0 here; other flat images leave float rounding noise
    images = _images((4, 3, 32, 32))
    images[0] = 0
    r = noise_residual(images)
    np.testing.assert_array_equal(r[0], 0)
    assert sm_f_scores(fingerprint(r[1:]), r[:1])[0] == 0


def test_fingerprint_finds_a_planted_pattern():
    """Images of G carry a fixed ±3-level pixel pattern; the fingerprint of 200 of them scores
    fresh G images below images without the pattern (the sign: higher = less likely G)."""
    rng = np.random.default_rng(7)
    pattern = rng.choice([-3.0, 3.0], size=(1, 1, 32, 32))

    def sample(n, seed, with_pattern):
        x = _images((n, 1, 32, 32), seed).astype(np.float64) + (pattern if with_pattern else 0)
        return np.clip(x, 0, 255)

    f = fingerprint(noise_residual(sample(200, 1, True), batch_size=50))  # one compile
    assert f.shape == (32, 32) and f.dtype == np.float32
    np.testing.assert_allclose([f.mean(), np.linalg.norm(f)], [0, 1], atol=1e-5)
    # the fingerprint correlates with the pattern's own residual
    pattern_residual = noise_residual(np.repeat(128 + pattern, 50, axis=0))[0]  # same compile
    assert np.corrcoef(f.ravel(), pattern_residual.ravel())[0, 1] > 0.5
    g = sm_f_scores(f, noise_residual(sample(50, 2, True), batch_size=50))
    plain = sm_f_scores(f, noise_residual(sample(50, 3, False), batch_size=50))
    assert g.shape == (50,) and np.all(np.abs(g) <= 1)
    assert g.max() < plain.min()


def test_score_is_minus_normalised_correlation():
    rng = np.random.default_rng(3)
    f, r = rng.normal(size=(8, 8)), rng.normal(size=(3, 8, 8))
    expected = [-np.corrcoef(f.ravel(), ri.ravel())[0, 1] for ri in r]  # Pearson = ⟨ẑ, ẑ⟩
    np.testing.assert_allclose(sm_f_scores(f, r), expected, rtol=1e-5)


@pytest.mark.parametrize("images,match", [
    (np.zeros((2, 32, 32), np.uint8), r"shape \(2, 32, 32\)"),
    (np.zeros((2, 2, 32, 32), np.uint8), r"C = 1 or 3"),
    (np.zeros((2, 3, 1, 32), np.uint8), r"H, W >= 2"),
    (np.zeros((2, 3, 8, 8), np.int32), r"dtype int32"),
    (np.full((2, 3, 8, 8), -0.5, np.float32), r"values in \[-0.5"),
    (np.full((2, 3, 8, 8), np.nan, np.float32), r"NaN"),
])
def test_residual_rejects_bad_images(images, match):
    with pytest.raises(ValueError, match=match):
        noise_residual(images)


def test_fingerprint_and_scores_reject_bad_input():
    with pytest.raises(ValueError, match="no rows"):
        fingerprint(np.zeros((0, 8, 8)))
    with pytest.raises(ValueError, match="constant"):
        fingerprint(np.ones((3, 8, 8)))
    with pytest.raises(ValueError, match=r"shape \(8, 8\)"):
        fingerprint(np.ones((8, 8)))
    with pytest.raises(ValueError, match=r"fingerprint has shape \(8, 8\)"):
        sm_f_scores(np.ones((8, 8)), np.ones((2, 8, 9)))
