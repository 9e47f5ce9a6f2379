"""Perturbations: blur and crop+resize against PyTorch, JPEG against Pillow, noise statistics and
seeding, the spec parser and bad input."""

import io

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image

from flipad_jax.perturbations import (PAPER_PERTURBATIONS, Perturbation, crop_size, perturb)


def _images(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _smooth_images(shape, seed=0):
    """8-bit images with structure (JPEG and resizing behave as on photos, not on pure noise)."""
    rng = np.random.default_rng(seed)
    b, c, h, w = shape
    yy, xx = np.mgrid[0:h, 0:w] / h
    base = 128 + 90 * np.sin(5 * xx + rng.uniform(0, 6, (b, c, 1, 1))) * np.cos(3 * yy)
    return np.clip(base + rng.normal(0, 6, shape), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- spec


def test_paper_perturbations_and_names():
    assert [p.name for p in PAPER_PERTURBATIONS] == [
        "blur_1", "blur_3", "crop_60", "crop_55", "noise_0.05", "noise_0.1", "jpeg_90", "jpeg_80"]
    for p in PAPER_PERTURBATIONS:
        assert Perturbation.parse(str(p)) == p


@pytest.mark.parametrize("text,kind,strength", [
    ("blur=3", "blur", 3), ("crop=60", "crop", 60), (" noise = 0.05 ", "noise", 0.05),
    ("noise=0", "noise", 0.0), ("jpeg=90", "jpeg", 90), ("jpeg=1", "jpeg", 1),
    ("jpeg=95", "jpeg", 95), ("crop=64", "crop", 64)])
def test_parse(text, kind, strength):
    p = Perturbation.parse(text)
    assert (p.kind, p.strength) == (kind, strength)
    assert type(p.strength) is type(strength)


@pytest.mark.parametrize("text,match", [
    ("sharpen=3", "'sharpen'.*unknown"), ("blur", "NAME=STRENGTH"), ("blur=", "NAME=STRENGTH"),
    ("blur=abc", "'abc' is not an odd integer"), ("blur=2", r"blur=2: expected an odd"),
    ("blur=0", "blur=0"), ("blur=-1", "blur=-1"), ("blur=3.5", "'3.5' is not"),
    ("crop=65", r"crop=65: expected an integer crop size in 1 … 64"), ("crop=0", "crop=0"),
    ("noise=-0.1", r"noise=-0.1: expected a finite noise std >= 0"), ("noise=nan", "noise=nan"),
    ("noise=x", "'x' is not a finite noise std"),
    ("jpeg=96", r"jpeg=96: expected an integer JPEG quality in 1 … 95"), ("jpeg=0", "jpeg=0"),
    ("jpeg=90.5", "'90.5' is not")])
def test_parse_rejects(text, match):
    with pytest.raises(ValueError, match=match):
        Perturbation.parse(text)


def test_constructor_rejects_wrong_types():
    with pytest.raises(ValueError, match="blur=3.0"):
        Perturbation("blur", 3.0)
    with pytest.raises(ValueError, match="jpeg=True"):
        Perturbation("jpeg", True)
    with pytest.raises(ValueError, match="'Blur'"):
        Perturbation("Blur", 3)


# ---------------------------------------------------------------- blur


def _torch_blur(x, size, sigma=3.0):
    """torchvision's GaussianBlur written with torch: reflect pad, depthwise conv2d, float32."""
    torch = pytest.importorskip("torch")
    t = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    k1 = torch.exp(-0.5 * (t / sigma) ** 2)
    k1 = k1 / k1.sum()
    c = x.shape[1]
    kernel = (k1[:, None] * k1[None, :]).expand(c, 1, size, size)
    xt = torch.nn.functional.pad(torch.from_numpy(x).float(), [size // 2] * 4, mode="reflect")
    return torch.nn.functional.conv2d(xt, kernel, groups=c).numpy().astype(np.float64)


@pytest.mark.torch
@pytest.mark.parametrize("size,shape", [(3, (4, 3, 32, 32)), (5, (2, 1, 28, 28)),
                                        (3, (2, 3, 2, 9)), (9, (1, 3, 16, 12))])
def test_blur_matches_torch_reflect_conv(size, shape):
    x = _images(shape)
    before_rounding = _torch_blur(x, size)
    got = perturb(x, Perturbation("blur", size))
    assert got.dtype == np.uint8 and got.shape == x.shape
    # equal to torch's rounding (half to even) except where float32 sums sit on a .5 tie
    on_tie = np.abs(before_rounding - np.floor(before_rounding) - 0.5) < 1e-3
    np.testing.assert_array_equal(got[~on_tie], np.rint(before_rounding)[~on_tie])
    assert np.abs(got.astype(int) - np.rint(before_rounding)).max() <= 1


def test_blur_1_is_the_identity():
    x = _images((3, 3, 32, 32))
    np.testing.assert_array_equal(perturb(x, "blur=1"), x)


def test_blur_keeps_constant_images():
    x = np.full((1, 3, 8, 8), 200, np.uint8)
    np.testing.assert_array_equal(perturb(x, "blur=7"), x)


def test_blur_kernel_larger_than_the_image_errors():
    with pytest.raises(ValueError, match=r"blur=5: .*H, W = 2, 8"):
        perturb(_images((1, 1, 2, 8)), "blur=5")


# ---------------------------------------------------------------- crop


def test_crop_sizes_scale_with_the_image():
    assert [crop_size(s, 64) for s in (60, 55, 64)] == [60, 55, 64]
    assert [crop_size(s, 32) for s in (60, 55, 64)] == [30, 28, 32]
    assert [crop_size(s, 28) for s in (60, 55)] == [26, 24]


@pytest.mark.torch
@pytest.mark.parametrize("strength,shape", [(60, (3, 3, 32, 32)), (55, (3, 3, 32, 32)),
                                            (55, (2, 1, 64, 64)), (60, (2, 1, 28, 28))])
def test_crop_matches_torch_bilinear(strength, shape):
    """Centre crop (torchvision's offset round((H − c)/2)) and bilinear upsampling back, against
    ``F.interpolate(mode="bilinear", align_corners=False)`` run as Pillow runs it: along W, round
    to 8 bits, then along H. Pillow's fixed-point weights may break exact .5 ties the other way
    (26 → 28 has weights k/28), so a few pixels may differ by one level."""
    torch = pytest.importorskip("torch")
    interpolate = torch.nn.functional.interpolate
    x = _smooth_images(shape)
    h = shape[-1]
    side = {(60, 32): 30, (55, 32): 28, (55, 64): 55, (60, 28): 26}[strength, h]
    top = {30: 1, 28: 2, 55: 4, 26: 1}[side]  # round((H − c)/2), 4.5 → 4 (half to even)
    window = torch.from_numpy(x[:, :, top:top + side, top:top + side]).double()
    along_w = torch.floor(interpolate(window, size=(side, h), mode="bilinear",
                                      align_corners=False) + 0.5)
    expected = torch.floor(interpolate(along_w, size=(h, h), mode="bilinear",
                                       align_corners=False) + 0.5).numpy()
    got = perturb(x, Perturbation("crop", strength))
    assert got.dtype == np.uint8 and got.shape == x.shape
    diff = np.abs(got - expected)
    assert diff.max() <= 1 and np.mean(diff == 0) > 0.95
    one_pass = interpolate(window, size=(h, h), mode="bilinear", align_corners=False).numpy()
    assert np.abs(got - one_pass).max() <= 1  # two roundings of at most ½ each


def test_crop_64_is_the_identity():
    x = _images((2, 3, 32, 32))
    np.testing.assert_array_equal(perturb(x, "crop=64"), x)


def test_crop_needs_square_images():
    with pytest.raises(ValueError, match=r"crop=60: expected square images, got H, W = 32, 30"):
        perturb(_images((1, 3, 32, 30)), "crop=60")


# ---------------------------------------------------------------- noise


def test_noise_statistics_and_seeding():
    x = np.full((8, 3, 32, 32), 128, np.uint8)  # mid-grey: no clipping at 0.05
    a = perturb(x, "noise=0.05", seed=3)
    assert a.dtype == np.uint8
    diff = a.astype(np.float64) - 128
    # rounding adds variance 1/12 to the Gaussian's (255·0.05)²
    assert np.std(diff) == pytest.approx(np.sqrt((255 * 0.05) ** 2 + 1 / 12), rel=0.03)
    assert abs(np.mean(diff)) < 0.3
    np.testing.assert_array_equal(perturb(x, "noise=0.05", seed=3), a)
    assert np.mean(perturb(x, "noise=0.05", seed=4) != a) > 0.9


def test_noise_batches_reproduce_one_call():
    x = _images((6, 1, 8, 8))
    whole = perturb(x, "noise=0.1", seed=11)
    parts = [perturb(x[i:i + 4], "noise=0.1", seed=11, first_index=i) for i in (0, 4)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_noise_clips_to_the_8_bit_range():
    x = np.array([0, 255], np.uint8).reshape(1, 1, 1, 2).repeat(500, axis=2)
    y = perturb(x, "noise=0.1", seed=0)
    assert y[..., 0].min() == 0 and y[..., 1].max() == 255
    assert y[..., 0].mean() > 5 and y[..., 1].mean() < 250


def test_noise_zero_is_the_identity():
    x = _images((2, 3, 8, 8))
    np.testing.assert_array_equal(perturb(x, "noise=0", seed=0), x)


@pytest.mark.parametrize("kwargs,match", [({}, "seed=None: noise=0.05 draws random noise"),
                                          ({"seed": -1}, "seed=-1"),
                                          ({"seed": 1.5}, "seed=1.5"),
                                          ({"seed": 0, "first_index": -2}, "first_index=-2")])
def test_noise_needs_a_seed(kwargs, match):
    with pytest.raises(ValueError, match=match):
        perturb(_images((1, 1, 4, 4)), "noise=0.05", **kwargs)


# ---------------------------------------------------------------- jpeg


@pytest.mark.parametrize("quality", [90, 80])
@pytest.mark.parametrize("channels,mode", [(3, "RGB"), (1, "L")])
def test_jpeg_equals_pillow_round_trip(quality, channels, mode):
    x = _smooth_images((3, channels, 32, 32))
    got = perturb(x, Perturbation("jpeg", quality))
    for img, out in zip(x, got):
        pil = Image.fromarray(img[0] if channels == 1 else img.transpose(1, 2, 0), mode)
        buffer = io.BytesIO()
        pil.save(buffer, format="JPEG", quality=quality)
        decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())))
        np.testing.assert_array_equal(out, decoded[None] if channels == 1
                                      else decoded.transpose(2, 0, 1))


def test_jpeg_lower_quality_loses_more():
    x = _smooth_images((4, 3, 32, 32))
    err = {q: np.abs(perturb(x, f"jpeg={q}").astype(int) - x).mean() for q in (95, 90, 80, 20)}
    assert 0 < err[95] < err[90] < err[80] < err[20]


def test_jpeg_needs_grey_or_rgb():
    with pytest.raises(ValueError, match="C = 2 channels: jpeg=90"):
        perturb(_images((1, 2, 8, 8)), "jpeg=90")


# ---------------------------------------------------------------- common


@settings(max_examples=15, deadline=None)
@given(index=st.integers(0, len(PAPER_PERTURBATIONS) - 1), b=st.integers(0, 3),
       c=st.sampled_from([1, 3]), h=st.sampled_from([8, 28, 32]))
def test_every_paper_perturbation_keeps_shape_and_input(index, b, c, h):
    x = _images((b, c, h, h), seed=b + h)
    before = x.copy()
    y = perturb(x, PAPER_PERTURBATIONS[index], seed=0)
    assert y.shape == x.shape and y.dtype == np.uint8
    np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize("images,match", [
    (np.zeros((1, 3, 8, 8), np.float32), "dtype float32: .*expected uint8"),
    (np.zeros((1, 3, 8, 8), np.int64), "dtype int64"),
    (np.zeros((3, 8, 8), np.uint8), r"shape \(3, 8, 8\): expected \(B, C, H, W\)")])
def test_bad_images(images, match):
    with pytest.raises(ValueError, match=match):
        perturb(images, "blur=3")
