"""The paper's image perturbations (Table 3): blur, centre crop, Gaussian noise and JPEG.

As in the reference (``src/flipad/perturbations.py``), each acts on the 8-bit image before it is
decoded to the generator's range: ``(B, C, H, W)`` uint8 in, ``(B, C, H, W)`` uint8 out.

======  ===============  =============================================================
name    strength         what it does
======  ===============  =============================================================
blur    kernel k (odd)   torchvision ``GaussianBlur(k, sigma=3)``: a k×k Gaussian, σ = 3,
                         normalised, on reflect-padded channels, rounded half to even.
                         k = 1 is the identity (so the paper's "blur 1" is clean data).
crop    s in 1 … 64      centre crop to c×c, c = ⌊s·H/64 + ½⌋, then resized back to H×H
                         with Pillow's bilinear filter (torchvision's ``resize`` of a PIL
                         image). The paper's sizes are for 64×64 images: crop 60/55 is
                         60/55 of 64, and 30/28 of 32. Square images only.
noise   std ≥ 0          adds N(0, std²)·255 per pixel, rounds half to even, clips to
                         [0, 255] (the reference's clip; std is on the 0–1 scale).
jpeg    q in 1 … 95      Pillow JPEG save and reload at quality q, Pillow's defaults
                         otherwise (4:2:0 chroma subsampling for RGB). C = 1 or 3.
======  ===============  =============================================================

Noise is seeded: image i of a call draws from ``np.random.default_rng([seed, first_index + i])``,
so a set perturbed in batches (``first_index`` = the batch's offset) equals the set perturbed at
once. The reference's noise is unseeded.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

from flipad_jax.features import center_crop

KINDS = ("blur", "crop", "noise", "jpeg")
BLUR_SIGMA = 3.0
CROP_REFERENCE_SIZE = 64  # crop strengths are in pixels of a 64×64 image, the paper's size
JPEG_MAX_QUALITY = 95  # Pillow: "values above 95 should be avoided"
_EXPECTED = {
    "blur": "an odd integer kernel size >= 1",
    "crop": f"an integer crop size in 1 … {CROP_REFERENCE_SIZE} (pixels of a "
            f"{CROP_REFERENCE_SIZE}×{CROP_REFERENCE_SIZE} image)",
    "noise": "a finite noise std >= 0 on the 0–1 scale",
    "jpeg": f"an integer JPEG quality in 1 … {JPEG_MAX_QUALITY}",
}
_IN_RANGE = {
    "blur": lambda s: s >= 1 and s % 2 == 1,
    "crop": lambda s: 1 <= s <= CROP_REFERENCE_SIZE,
    "jpeg": lambda s: 1 <= s <= JPEG_MAX_QUALITY,
}


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


@dataclass(frozen=True)
class Perturbation:
    """One perturbation at one strength, e.g. ``Perturbation("jpeg", 90)``; see the module doc.

    Attributes:
      kind: "blur", "crop", "noise" or "jpeg".
      strength: blur kernel size, crop size (64-pixel units), noise std or JPEG quality.
    """

    kind: str
    strength: Union[int, float]

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"perturbation {self.kind!r}: unknown, expected one of "
                             f"{', '.join(KINDS)}")
        s = self.strength
        if self.kind == "noise":
            ok = (isinstance(s, (int, float, np.integer, np.floating)) and not isinstance(s, bool)
                  and math.isfinite(s) and s >= 0)
        else:
            ok = _is_int(s) and _IN_RANGE[self.kind](s)
        if not ok:
            raise ValueError(f"{self.kind}={s!r}: expected {_EXPECTED[self.kind]}")
        object.__setattr__(self, "strength", float(s) if self.kind == "noise" else int(s))

    @classmethod
    def parse(cls, text: str) -> "Perturbation":
        """``"NAME=STRENGTH"`` (``blur=3``, ``crop=60``, ``noise=0.05``, ``jpeg=90``) → spec."""
        kind, sep, value = str(text).partition("=")
        kind, value = kind.strip(), value.strip()
        if not sep or not value:
            raise ValueError(f"perturbation {text!r}: expected NAME=STRENGTH, e.g. blur=3, "
                             "crop=60, noise=0.05 or jpeg=90")
        if kind not in KINDS:
            raise ValueError(f"perturbation {kind!r} in {text!r}: unknown, expected one of "
                             f"{', '.join(KINDS)}")
        try:
            strength = float(value) if kind == "noise" else int(value)
        except ValueError:
            raise ValueError(f"{text!r}: strength {value!r} is not {_EXPECTED[kind]}") from None
        return cls(kind, strength)

    @property
    def name(self) -> str:
        """The name in tables and JSON: ``blur_3``, ``crop_60``, ``noise_0.05``, ``jpeg_90``."""
        return f"{self.kind}_{self.strength:g}"

    def __str__(self) -> str:
        return f"{self.kind}={self.strength:g}"


PAPER_PERTURBATIONS = tuple(Perturbation(k, s) for k, s in (
    ("blur", 1), ("blur", 3), ("crop", 60), ("crop", 55),
    ("noise", 0.05), ("noise", 0.1), ("jpeg", 90), ("jpeg", 80)))


def crop_size(strength: int, size: int) -> int:
    """The crop side for an image of side ``size``: ⌊strength·size/64 + ½⌋ (60, 55 → 30, 28 at
    32; → 60, 55 at 64), at least 1 (a crop of ``strength`` = 64 keeps the whole image)."""
    return max(1, math.floor(strength * size / CROP_REFERENCE_SIZE + 0.5))


def gaussian_kernel1d(size: int, sigma: float = BLUR_SIGMA) -> np.ndarray:
    """torchvision's 1-D blur kernel: exp(−x²/2σ²) at x = −(size−1)/2 … (size−1)/2, sum 1."""
    x = np.linspace(-(size - 1) / 2, (size - 1) / 2, size)
    pdf = np.exp(-0.5 * (x / sigma) ** 2)
    return pdf / pdf.sum()


def _blur(x: np.ndarray, size: int) -> np.ndarray:
    h, w = x.shape[-2:]
    half = size // 2
    if half >= min(h, w):
        raise ValueError(f"blur={size}: the kernel needs images larger than {half} pixels per "
                         f"side for reflect padding, got H, W = {h}, {w}")
    kernel = gaussian_kernel1d(size)
    y = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (half, half), (half, half)),
               mode="reflect")
    # separable: along H, then along W (the 2-D kernel is the outer product)
    y = sum(kernel[i] * y[:, :, i:i + h, :] for i in range(size))
    y = sum(kernel[i] * y[:, :, :, i:i + w] for i in range(size))
    return np.rint(y).astype(np.uint8)


def _pil_images(x: np.ndarray, what: str):
    """Yield (index, PIL image) per image of ``x`` (C = 1: mode L, C = 3: RGB)."""
    from PIL import Image

    if x.shape[1] not in (1, 3):
        raise ValueError(f"images have C = {x.shape[1]} channels: {what} expects 1 (grey) or "
                         "3 (RGB)")
    for i, img in enumerate(x):
        yield i, Image.fromarray(img[0] if len(img) == 1 else img.transpose(1, 2, 0))


def _from_pil(img) -> np.ndarray:
    arr = np.asarray(img)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _crop(x: np.ndarray, strength: int) -> np.ndarray:
    from PIL import Image

    h, w = x.shape[-2:]
    if h != w:
        raise ValueError(f"crop={strength}: expected square images, got H, W = {h}, {w}")
    side = crop_size(strength, h)
    # center_crop takes decoded (float) images only; 0…255 are exact in float32
    cropped = np.asarray(center_crop(x.astype(np.float32), side)).astype(np.uint8)
    out = np.empty_like(x)
    for i, img in _pil_images(cropped, f"crop={strength}"):
        out[i] = _from_pil(img.resize((w, h), Image.BILINEAR))
    return out


def _noise(x: np.ndarray, std: float, seed: int, first_index: int) -> np.ndarray:
    out = np.empty_like(x)
    for i, img in enumerate(x):
        rng = np.random.default_rng([seed, first_index + i])
        noisy = img + rng.normal(0.0, std, img.shape) * 255
        out[i] = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    return out


def _jpeg(x: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image

    out = np.empty_like(x)
    for i, img in _pil_images(x, f"jpeg={quality}"):
        with io.BytesIO() as buffer:
            img.save(buffer, format="JPEG", quality=quality)
            buffer.seek(0)
            with Image.open(buffer) as decoded:
                out[i] = _from_pil(decoded.convert(img.mode))
    return out


def perturb(images, perturbation: Union[Perturbation, str], *, seed: Optional[int] = None,
            first_index: int = 0) -> np.ndarray:
    """Apply ``perturbation`` to each 8-bit image.

    Args:
      images: ``(B, C, H, W)`` uint8.
      perturbation: a :class:`Perturbation` or its ``"NAME=STRENGTH"`` text.
      seed: the noise seed, an int >= 0 (required for ``noise``, unused by the others).
      first_index: the index of ``images[0]`` in the whole set (noise of image i is drawn from
        ``default_rng([seed, first_index + i])``, so batches reproduce a whole-set call).

    Returns:
      ``(B, C, H, W)`` uint8, a new array.
    """
    p = perturbation if isinstance(perturbation, Perturbation) else Perturbation.parse(perturbation)
    x = np.asarray(images)
    if x.dtype != np.uint8:
        raise ValueError(f"images has dtype {x.dtype}: perturbations act on 8-bit images, "
                         "expected uint8")
    if x.ndim != 4:
        raise ValueError(f"images has shape {x.shape}: expected (B, C, H, W)")
    if p.kind == "noise":
        if not (_is_int(seed) and seed >= 0):
            raise ValueError(f"seed={seed!r}: {p} draws random noise, expected an int seed >= 0")
        if not (_is_int(first_index) and first_index >= 0):
            raise ValueError(f"first_index={first_index!r}: expected an int >= 0")
        return _noise(x, p.strength, int(seed), int(first_index))
    if p.kind == "blur":
        return _blur(x, p.strength)
    if p.kind == "crop":
        return _crop(x, p.strength)
    return _jpeg(x, p.strength)
