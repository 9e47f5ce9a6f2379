"""Detector inputs: FLIPAD (final-layer inversion), RawPAD (pixels) and DCTPAD (log-DCT) features.

All functions take and return channel-first batches, ``(B, C, H, W)`` (or ``(B, D)`` for
tabular FLIPAD features), float32.

* FLIPAD (paper §4.3): ẑ = ``head.invert(images).z``, then max-pooled to at most ``pool_to``
  spatially (the reference: LSGAN 64×64 → 32×32 with a 2×2 pool) or, with
  ``downsample="crop"``, centre-cropped to ``pool_to`` (the reference's Stable Diffusion runs:
  128 of 512×512), then standardised with the *inliers'* training mean and std (+0.05).
* RawPAD: the images resized to ``size`` by nearest neighbour (``F.interpolate``'s default mode:
  source index ⌊i·H_in/H_out⌋, i.e. every other pixel for 64 → 32); not standardised.
* DCTPAD: per channel log(|DCT-II(x)| + 1e-10) of the ``crop``×``crop`` centre crop, with the
  unnormalised DCT-II (``scipy.fft.dctn(type=2, norm=None)``, the reference's ``torch_dct`` with
  ``norm=None``); standardised with the mean and std of *all* training features (+0.05).
* SM-F: the grey PRNU noise residual of each image (:mod:`flipad_jax.prnu`), ``(B, H, W)``; the
  detector scores it against G's fingerprint instead of a DeepSAD network.

RawPAD, DCTPAD and SM-F take images in [-1, 1] (FLIPAD: the head's output range); floats outside
it are refused, naming the range found, unless ``x_range`` (their scale) or ``clip`` is given.

The standardisation statistics are fitted on training data only (:class:`Standardizer`) and saved
with the detector.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from flipad_jax._checks import check_int
from flipad_jax.bundle import DOWNSAMPLE_MODES
from flipad_jax.head import DEFAULT_LAM
from flipad_jax.lasso import LassoOptions, Status

STD_EPS = 0.05  # added to the std before dividing (reference ``EPS_std``)
LOG_EPS = 1e-10
FEATURE_KINDS = ("flipad", "raw", "dct", "sm_f")
# Which training samples the standardisation statistics come from by default, per feature kind
# (the reference's image launchers); FeatureConfig.standardize overrides it. SM-F's residuals are
# normalised by its own score, never standardised.
STANDARDIZE_ON = {"flipad": "inliers", "raw": None, "dct": "all", "sm_f": None}
STANDARDIZE_CHOICES = ("inliers", "all", None)
PIXEL_RANGE = (-1.0, 1.0)  # the image range of RawPAD, DCTPAD and SM-F (8-bit pixels map onto it)


def _check_images(name: str, x):
    x = jnp.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"{name} has shape {tuple(x.shape)}: expected (B, C, H, W) images")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        # Integer pixels (0-255) read as floats would be ~127x off the [-1, 1] scale every
        # detector is fitted on; the mapping must be explicit.
        raise ValueError(f"{name} has dtype {x.dtype}: expected floating images in the range "
                         "the detector was fitted on (8-bit pixels: map them first with "
                         "flipad_jax.images.pixels_to_range)")
    return x


def resize_nearest(images, size: int):
    """``(B, C, H, W)`` → ``(B, C, size, size)`` by PyTorch's nearest rule, index ⌊i·H/size⌋."""
    x = _check_images("images", images)
    h, w = x.shape[-2:]
    rows = np.minimum(np.floor(np.arange(size) * (h / size)).astype(np.int64), h - 1)
    cols = np.minimum(np.floor(np.arange(size) * (w / size)).astype(np.int64), w - 1)
    return x[:, :, rows][:, :, :, cols]


def center_crop(images, size: int):
    """The central ``size``×``size`` window (torchvision's rounding of the offset)."""
    x = _check_images("images", images)
    h, w = x.shape[-2:]
    if size > h or size > w:
        raise ValueError(f"crop={size}: expected at most the image size {(h, w)}")
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return x[:, :, top:top + size, left:left + size]


@jax.jit
def _log_dct(x):
    coeffs = jax.scipy.fft.dctn(x, type=2, axes=(-2, -1), norm=None)
    return jnp.log(jnp.abs(coeffs) + LOG_EPS)


def _in_range(images, x_range, clip):
    """Floating ``(B, C, H, W)`` images as float32 in [-1, 1], the range RawPAD, DCTPAD and SM-F
    are fitted on (:func:`flipad_jax.images.floats_to_range`: mapped from ``x_range``, clipped
    with ``clip``, else values outside it are refused)."""
    from flipad_jax.images import floats_to_range

    x = _check_images("images", images)
    return jnp.asarray(floats_to_range(np.asarray(x), PIXEL_RANGE, x_range=x_range, clip=clip,
                                       name="images"))


def dct_features(images, crop: Optional[int] = 32, *, x_range=None, clip: bool = False):
    """DCTPAD: log(|DCT-II₂D| + 1e-10) per channel of the centre crop (None: whole image) of
    images in [-1, 1] (``x_range``, ``clip``: as :func:`raw_features`)."""
    x = _in_range(images, x_range, clip)
    if crop is not None:
        x = center_crop(x, crop)
    return _log_dct(x.astype(jnp.float32))


def raw_features(images, size: Optional[int] = 32, *, x_range=None, clip: bool = False):
    """RawPAD: images in [-1, 1] resized to ``size`` by nearest neighbour (None: unchanged).

    ``x_range``: the scale floats are given in (e.g. ``(0, 255)``), mapped onto [-1, 1] first;
    ``clip``: clip values outside it on purpose. Without either, values outside [-1, 1] are
    refused (they would mean a wrong scale)."""
    x = _in_range(images, x_range, clip)
    return x if size is None or x.shape[-2:] == (size, size) else resize_nearest(x, size)


def residual_features(images, *, x_range=None, clip: bool = False):
    """SM-F: the PRNU noise residual (:func:`flipad_jax.prnu.noise_residual`) of images in
    [-1, 1] (``x_range``, ``clip``: as :func:`raw_features`), mapped to the 8-bit scale
    [0, 255] first. ``(B, C, H, W)`` → ``(B, H, W)``."""
    from flipad_jax.prnu import noise_residual

    x = np.asarray(_in_range(images, x_range, clip), np.float64)
    return noise_residual(((x + 1.0) * 127.5).astype(np.float32))


def max_pool_to(z, size: Optional[int] = 32):
    """Max-pool ``(B, C, H, W)`` activations with kernel = stride = H // size so that the result
    is at most ``size``×``size``; smaller maps (and vectors, ``(B, D)``) pass unchanged."""
    z = jnp.asarray(z)
    if size is None or z.ndim == 2 or max(z.shape[-2:]) <= size:
        return z
    h, w = z.shape[-2:]
    if h % size or w % size or h // size != w // size:
        raise ValueError(f"activations of spatial size {(h, w)}: expected H and W multiples of "
                         f"pool_to={size} with the same factor")
    k = h // size
    b, c = z.shape[:2]
    return z.reshape(b, c, size, k, size, k).max(axis=(3, 5))


def downsample(z, size: Optional[int] = 32, mode: str = "maxpool"):
    """FLIPAD's spatial reduction of ``(B, C, H, W)`` activations to ``size``:
    :func:`max_pool_to` ("maxpool") or :func:`center_crop` ("crop"). Maps no larger than
    ``size``, vectors ``(B, D)`` and ``size=None`` pass unchanged."""
    if mode not in DOWNSAMPLE_MODES:
        raise ValueError(f"downsample={mode!r}: expected one of {list(DOWNSAMPLE_MODES)}")
    if mode == "maxpool":
        return max_pool_to(z, size)
    z = jnp.asarray(z)
    if size is None or z.ndim == 2 or max(z.shape[-2:]) <= size:
        return z
    return center_crop(z, size)


def flipad_features(head, images, *, lam: float, pool_to: Optional[int] = 32,
                    downsample_mode: str = "maxpool", batch_size: int = 1000,
                    progress: bool = False, **invert_kwargs):
    """FLIPAD features before standardisation: ``downsample(head.invert(images).z)``.

    Args:
      head: a :class:`~flipad_jax.Head`.
      images: ``(B, *head.out_shape)`` images in the head's output range (or pass ``x_range``).
      lam: λ of the lasso (paper: 5e-4 small GANs).
      pool_to: spatial size the activations are reduced to (None: no reduction).
      downsample_mode: "maxpool" or "crop" (see :func:`downsample`).
      batch_size, progress: as in :meth:`~flipad_jax.Head.invert_batches`.
      **invert_kwargs: passed to ``head.invert`` (x_range, clip, options, max_iter, ...).

    Returns:
      ``(B, C', h, w)`` float32 (``(B, D)`` for a linear head).
    """
    res = head.invert_batches(images, lam, batch_size=batch_size, progress=progress,
                              **invert_kwargs)
    check_solved(res.status)
    return downsample(jnp.asarray(res.z), pool_to, downsample_mode)


def check_solved(status, path: str = "images") -> None:
    """Refuse inversions whose ``(B,)`` solver status says they went non-finite; ``path`` names
    where they come from."""
    bad = np.asarray(status) == Status.NONFINITE
    if bad.any():
        raise ValueError(f"{path}: the inversion of {int(bad.sum())} image(s) (indices "
                         f"{np.flatnonzero(bad)[:10].tolist()}) went non-finite: expected finite "
                         "activations")


class Standardizer(NamedTuple):
    """(x − mean) / (std + eps), statistics per feature element (C×H×W or D).

    ``std`` is the unbiased sample standard deviation (``torch.std``'s default), as in the
    reference; ``eps`` = 0.05 keeps near-constant elements from blowing up.
    """

    mean: jax.Array
    std: jax.Array
    eps: float = STD_EPS

    @classmethod
    def fit(cls, x, eps: float = STD_EPS) -> "Standardizer":
        """Statistics of ``(n, *shape)`` features over the sample axis (n ≥ 2), in float64."""
        x = np.asarray(x, np.float64)
        if len(x) < 2:
            raise ValueError(f"x has {len(x)} sample(s): expected at least 2 to fit a std")
        return cls(jnp.asarray(x.mean(axis=0), jnp.float32),
                   jnp.asarray(x.std(axis=0, ddof=1), jnp.float32), float(eps))

    def __call__(self, x):
        return (jnp.asarray(x, jnp.float32) - self.mean[None]) / (self.std + self.eps)[None]


def top_channels(x_inliers, x_outliers, k: int):
    """Indices of the ``k`` channels whose inlier and outlier mean features differ most.

    The score of channel j is the mean over space of |mean_inliers − mean_outliers|; indices are
    returned in descending score order (the reference's ``select_channels``).

    Args:
      x_inliers, x_outliers: ``(n, C, H, W)`` or ``(n, D)`` (then per dimension).
      k: number of channels, 1 ≤ k ≤ C.
    """
    a = np.asarray(x_inliers, np.float64).mean(axis=0)
    b = np.asarray(x_outliers, np.float64).mean(axis=0)
    diff = np.abs(a - b)
    per_channel = diff.reshape(diff.shape[0], -1).mean(axis=1)
    check_int("top_k", k, maximum=len(per_channel))
    return np.argsort(-per_channel, kind="stable")[:k].astype(np.int64)


_AUTO = "auto"


@dataclass(frozen=True)
class FeatureConfig:
    """How images become detector inputs, with the paper's defaults; JSON-able (saved with the
    detector).

    Attributes:
      kind: "flipad" (needs a head), "raw", "dct" or "sm_f" (images in [−1, 1]).
      lam: FLIPAD's λ (paper: 5e-4 small GANs and Redwine, 1e-4 Whitewine, 1e-5 Stable
        Diffusion, 1e-3 medical).
      lasso: FLIPAD's solver settings (:class:`~flipad_jax.LassoOptions`; the reference solver
        is ``LassoOptions.paper(head.op)``).
      pool_to: FLIPAD target size of the spatial reduction (None: none).
      downsample: FLIPAD's reduction, "maxpool" (default) or "crop" (centre crop, the
        reference's Stable Diffusion setting).
      size: RawPAD resize target (None: none).
      crop: DCTPAD centre crop (None: whole image).
      invert_batch_size: images per batch of lasso solves (the reference's 1000, the unit of its
        batch-wide stop rule; on a CPU per-sample-stop solves are cut to cache size,
        :meth:`~flipad_jax.Head.invert_batches`).
      standardize: which training features give the standardisation statistics: "inliers",
        "all" or None (none); "auto": the kind's default (:data:`STANDARDIZE_ON`: FLIPAD
        inliers, DCTPAD all, RawPAD none; the reference's tabular launcher: none).
      std_eps: the +0.05 of the standardisation.
      top_k: keep the k channels (dimensions, for vectors) whose inlier and outlier means
        differ most (None: all).
    """

    kind: str = "flipad"
    lam: float = DEFAULT_LAM
    lasso: LassoOptions = field(default_factory=LassoOptions)
    pool_to: Optional[int] = 32
    size: Optional[int] = 32
    crop: Optional[int] = 32
    invert_batch_size: int = 1000
    standardize: Optional[str] = _AUTO
    std_eps: float = STD_EPS
    top_k: Optional[int] = None
    downsample: str = "maxpool"

    def __post_init__(self):
        if self.kind not in FEATURE_KINDS:
            raise ValueError(f"features={self.kind!r}: expected one of {FEATURE_KINDS}")
        if isinstance(self.lasso, dict):  # from JSON
            object.__setattr__(self, "lasso", LassoOptions.from_json(self.lasso))
        if self.standardize not in STANDARDIZE_CHOICES + (_AUTO,):
            raise ValueError(f"standardize={self.standardize!r}: expected one of "
                             f"{STANDARDIZE_CHOICES + (_AUTO,)}")
        check_int("invert_batch_size", self.invert_batch_size)
        if self.downsample not in DOWNSAMPLE_MODES:
            raise ValueError(f"downsample={self.downsample!r}: expected one of "
                             f"{list(DOWNSAMPLE_MODES)}")
        if self.top_k is not None:
            check_int("top_k", self.top_k)
        if self.kind == "sm_f" and (self.standardize_on is not None or self.top_k is not None):
            raise ValueError(f"standardize={self.standardize!r}, top_k={self.top_k!r}: SM-F "
                             "normalises residuals in its score; expected neither")

    @property
    def standardize_on(self) -> Optional[str]:
        """"inliers", "all" or None: the setting in force for this kind."""
        return STANDARDIZE_ON[self.kind] if self.standardize == _AUTO else self.standardize

    def replace(self, **changes) -> "FeatureConfig":
        return replace(self, **changes)

    def extract(self, images, head=None, *, progress: bool = False):
        """Unstandardised features of ``(B, C, H, W)`` images (see the module docstring);
        ``progress`` shows the inversion's progress bar."""
        if self.kind == "flipad":
            if head is None:
                raise ValueError("head=None: FLIPAD features need the generator's Head")
            return flipad_features(head, images, lam=self.lam, pool_to=self.pool_to,
                                   downsample_mode=self.downsample,
                                   batch_size=self.invert_batch_size, progress=progress,
                                   options=self.lasso)
        if self.kind == "raw":
            return raw_features(images, self.size)
        if self.kind == "sm_f":
            return residual_features(images)
        return dct_features(images, self.crop)

    def to_json(self) -> dict:
        return asdict(self)
