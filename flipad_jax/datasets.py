"""The offline default data set: Fashion-MNIST from an IDX folder, prepared for the demo.

Fashion-MNIST (Zalando, MIT licence) is what Debian's ``dataset-fashion-mnist`` package installs
under :data:`DEFAULT_FASHION_MNIST`; any folder with the four standard IDX files works. The
28×28 grey images are prepared to the generators' size:

* 32: zero-padded by 2 pixels on each side (the background of Fashion-MNIST is 0, so padding
  adds no edge), the quick and full demo's size;
* 64 (or any other size ≥ 28): resized with Pillow's bicubic filter, the paper-scale size.

Splits: the GANs train on ``train`` (60 000); the detectors' real samples come from ``test``
(10 000), which no generator has seen.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from flipad_jax.idx import load_split

DEFAULT_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
DATA_ENV = "FLIPAD_FASHION_MNIST"


def fashion_mnist_folder(folder=None) -> Path:
    """``folder``, else ``$FLIPAD_FASHION_MNIST``, else Debian's install location; checked."""
    path = Path(folder or os.environ.get(DATA_ENV) or DEFAULT_FASHION_MNIST)
    if not path.is_dir():
        raise ValueError(f"{path}: no Fashion-MNIST folder here. Expected the four IDX files "
                         "(install Debian's dataset-fashion-mnist, or pass --data DIR / set "
                         f"{DATA_ENV})")
    return path


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``(N, 1, 28, 28)`` → ``(N, 1, size, size)``: zero padding to 32, bicubic otherwise."""
    if not (isinstance(size, (int, np.integer)) and size >= images.shape[-1]):
        raise ValueError(f"size={size!r}: expected an int >= {images.shape[-1]} (the image size)")
    h = images.shape[-1]
    if size == h:
        return images
    if size == 32 and h == 28:
        return np.pad(images, ((0, 0), (0, 0), (2, 2), (2, 2)))
    from PIL import Image

    out = np.empty(images.shape[:2] + (size, size), np.uint8)
    for i, img in enumerate(images[:, 0]):
        out[i, 0] = np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC))
    return out


def fashion_mnist(split: str = "train", size: int = 32, folder=None) -> np.ndarray:
    """Fashion-MNIST images of ``split`` as uint8 ``(N, 1, size, size)`` (see the module doc)."""
    images, _ = load_split(fashion_mnist_folder(folder), split)
    return resize_images(images, size)

