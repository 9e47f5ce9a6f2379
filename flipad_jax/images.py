"""Reading images for inversion and scoring: a folder of PNGs or an ``.npy`` array.

PNG pixels p ∈ {0 … 255} map to the generator's output range [low, high] as
``low + p/255 · (high − low)``, the inverse of ``flipad sample``'s quantisation. Arrays are read
with ``allow_pickle=False``. Every failure names the file and what was expected.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _read_png_folder(folder: Path) -> np.ndarray:
    from PIL import Image

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    arrays, first = [], None
    for path in files:
        try:
            with Image.open(path) as img:
                img.load()
                if img.mode not in ("L", "RGB"):
                    raise ValueError(f"{path}: image mode {img.mode!r}, expected 'L' (grey) or "
                                     "'RGB' 8-bit pixels")
                arr = np.asarray(img)
        except OSError as error:
            raise ValueError(f"{path}: unreadable or truncated image ({error})") from None
        arr = arr[:, :, None] if arr.ndim == 2 else arr
        if first is None:
            first = (path, arr.shape)
        elif arr.shape != first[1]:
            raise ValueError(f"{path}: image of shape (H, W, C) = {arr.shape}, expected "
                             f"{first[1]} like {first[0].name} (mixed sizes or channel counts)")
        if arr.dtype != np.uint8:
            raise ValueError(f"{path}: pixel type {arr.dtype}, expected 8-bit images")
        arrays.append(arr)
    return np.stack(arrays).transpose(0, 3, 1, 2)


def load_images(source, output_range=(-1.0, 1.0)) -> np.ndarray:
    """Images as float32 ``(B, C, H, W)`` in ``output_range``.

    Args:
      source: a folder of 8-bit images (sorted by file name) or an ``.npy`` file holding either
        uint8 pixels or floats already in the output range, shaped ``(B, C, H, W)``.
      output_range: (low, high) of the generator's outputs (``head.output_range``); None for
        unbounded heads, which then accept only float arrays.
    """
    path = Path(source)
    if path.is_dir():
        pixels = _read_png_folder(path)
    elif path.suffix == ".npy" and path.is_file():
        try:
            pixels = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise ValueError(f"{path}: not a readable .npy array ({error})") from None
        if pixels.ndim != 4:
            raise ValueError(f"{path}: array of shape {pixels.shape}, expected (B, C, H, W)")
        if pixels.dtype != np.uint8:
            if not np.issubdtype(pixels.dtype, np.floating):
                raise ValueError(f"{path}: dtype {pixels.dtype}, expected uint8 or float")
            if not np.all(np.isfinite(pixels)):
                raise ValueError(f"{path}: holds NaN/inf values")
            return pixels.astype(np.float32)
    else:
        raise ValueError(f"{source}: expected a folder of images or an .npy file")
    if output_range is None:
        raise ValueError(f"{source}: 8-bit pixels need the generator's output range, and this "
                         "head has none (an identity head); pass float arrays instead")
    low, high = map(float, output_range)
    return (low + pixels.astype(np.float32) / 255.0 * (high - low)).astype(np.float32)
