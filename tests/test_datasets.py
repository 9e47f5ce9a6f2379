"""The demo's data preparation: Fashion-MNIST from IDX files, padded or resized, mapped to [−1, 1]."""

import gzip
from pathlib import Path

import numpy as np
import pytest

from flipad_jax.datasets import (DEFAULT_FASHION_MNIST, fashion_mnist, fashion_mnist_folder,
                                 resize_images)
from flipad_jax.images import pixels_to_range
from tests.test_idx import _idx_bytes


def _fake_fashion(folder: Path, n: int = 5) -> np.ndarray:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)
    folder.mkdir()
    for split, stem in (("train", "train"), ("test", "t10k")):
        (folder / f"{stem}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(images,
                                                                                      0x08)))
        (folder / f"{stem}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress(_idx_bytes(np.arange(n, dtype=np.uint8), 0x08)))
    return images


def test_pad_to_32_centres_the_image_on_zeros(tmp_path):
    images = _fake_fashion(tmp_path / "fm")
    x = fashion_mnist("test", 32, tmp_path / "fm")
    assert x.shape == (5, 1, 32, 32) and x.dtype == np.uint8
    np.testing.assert_array_equal(x[:, 0, 2:30, 2:30], images)
    assert x[:, :, :2].sum() == x[:, :, 30:].sum() == x[..., :2].sum() == x[..., 30:].sum() == 0


def test_resize_to_64_is_pillows_bicubic(tmp_path):
    from PIL import Image
    images = _fake_fashion(tmp_path / "fm")
    x = fashion_mnist("train", 64, tmp_path / "fm")
    assert x.shape == (5, 1, 64, 64)
    expected = np.asarray(Image.fromarray(images[3]).resize((64, 64), Image.BICUBIC))
    np.testing.assert_array_equal(x[3, 0], expected)
    flat = resize_images(np.full((1, 1, 28, 28), 77, np.uint8), 64)
    assert np.all(flat == 77)  # bicubic keeps a constant image constant


def test_refusals_name_the_value(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="size=20"):
        resize_images(np.zeros((1, 1, 28, 28), np.uint8), 20)
    monkeypatch.delenv("FLIPAD_FASHION_MNIST", raising=False)
    with pytest.raises(ValueError, match="nowhere.*dataset-fashion-mnist"):
        fashion_mnist_folder(tmp_path / "nowhere")
    monkeypatch.setenv("FLIPAD_FASHION_MNIST", str(tmp_path / "env"))
    with pytest.raises(ValueError, match="env"):
        fashion_mnist_folder()


def test_pixels_decode_to_the_tanh_range():
    p = np.arange(256, dtype=np.uint8)
    x = pixels_to_range(p)
    assert x[0] == -1.0 and x[-1] == 1.0 and x.dtype == np.float32
    np.testing.assert_allclose(x, p / 127.5 - 1.0, atol=1e-7)


@pytest.mark.skipif(not Path(DEFAULT_FASHION_MNIST).is_dir(),
                    reason="Debian's dataset-fashion-mnist is not installed (CI installs it)")
def test_the_installed_data_set():
    x = fashion_mnist("test", 32)
    assert x.shape == (10000, 1, 32, 32)
    # Known statistics of Fashion-MNIST's test split (28×28 mean 73.15), diluted by the padding.
    assert abs(x.mean() * (32 * 32) / (28 * 28) - 73.15) < 0.05
