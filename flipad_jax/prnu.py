"""SM-F: the PRNU-style fingerprint baseline (Marra et al. 2019), as the FLIPAD reference runs it.

The reference (``prnu.extract_single`` of the Politecnico di Milano/Binghamton toolbox port, called
by ``wrappers/fingerprinting.py``) turns one 8-bit image into a grey noise residual:

1. per channel, a 4-level ``db4`` wavelet decomposition in PyWavelets' ``symmetric`` mode (4 levels
   even where PyWavelets only warns that the image is too small for them, as at 32×32 and 64×64);
2. each detail band d is shrunk by an adaptive Wiener filter, d · σ²/(v + σ²) with σ = 5 (pixel
   units) and v the smallest of max(box-mean(d²) − σ², 0) over square windows 3, 5, 7 and 9 (the
   box mean counts zeros outside the band, ``uniform_filter(mode="constant")``);
3. the approximation band is set to zero and the transform inverted, cropped to the image size;
4. channels are mixed to grey with weights (0.29893602, 0.58704307, 0.11402090);
5. on each of the four 2×2 polyphase sub-lattices, the mean, then the row means and the column
   means are subtracted;
6. a Wiener filter in the DFT domain: each coefficient of the 2-D DFT F is scaled by the gain of
   step 2 computed on the magnitudes |F|/√(HW), with σ the residual's own std (ddof=1).

The fingerprint f_G is the mean residual over G's training images, made zero-mean and unit-norm;
an image's score is s(x) = −⟨f_G, r̂(x)⟩ with r̂(x) its residual made zero-mean and unit-norm.
The reference scores +⟨·,·⟩ (higher: more likely G); the sign is flipped here so that, like every
detector of this package, a higher score means *less* likely made by G.

The wavelet transform is written out as matrices (one pair per level and axis, built once per image
size), so a whole batch is a few matrix products; it equals ``pywt.wavedec2``/``waverec2`` (tested).
Where the reference divides 0 by 0 (a black image: every coefficient is exactly 0), the residual
is 0 and its score 0; other flat images leave a residual of float rounding noise, as there.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from flipad_jax._checks import check_finite

# Daubechies' 8-tap (4 vanishing moments) analysis low-pass filter, PyWavelets' ``db4.dec_lo``.
DB4_DEC_LO = np.array([-0.010597401785069032, 0.0328830116668852, 0.030841381835560764,
                       -0.18703481171909309, -0.027983769416859854, 0.6308807679298589,
                       0.7148465705529157, 0.2303778133088965])
# Quadrature mirror: dec_hi[k] = (−1)^(k+1) · dec_lo[F−1−k].
DB4_DEC_HI = np.array([(-1) ** (k + 1) * DB4_DEC_LO[7 - k] for k in range(8)])
LEVELS = 4
SIGMA = 5.0
WINDOWS = (3, 5, 7, 9)
RGB_TO_GREY = (0.29893602, 0.58704307, 0.11402090)
_HIGHEST = jax.lax.Precision.HIGHEST  # no TF32 on GPUs: the filters need full float32


def _level_sizes(n: int, levels: int) -> list[int]:
    """Signal lengths n₀ = n, n_{ℓ+1} = ⌊(n_ℓ + 7)/2⌋ of a ``symmetric``-mode db4 decomposition."""
    sizes = [n]
    for _ in range(levels):
        sizes.append((sizes[-1] + len(DB4_DEC_LO) - 1) // 2)
    return sizes


def _analysis(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The one-level db4 analysis of a length-``n`` signal as two ``(⌊(n+7)/2⌋, n)`` matrices.

    Coefficient i is the full convolution of the half-sample-symmetric extension of the signal
    (x₋₁ = x₀, x_n = x_{n−1}, periodic with period 2n) with the filter, taken at index 2i + 1.
    """
    taps = len(DB4_DEC_LO)
    extended = np.pad(np.eye(n), ((taps - 1, taps - 1), (0, 0)), mode="symmetric")

    def filt(f):
        full = np.stack([np.convolve(col, f, "valid") for col in extended.T], axis=1)
        return full[1::2]

    return filt(DB4_DEC_LO), filt(DB4_DEC_HI)


def _synthesis(k: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The one-level db4 inverse from ``k`` coefficients per band to ``n`` ≤ 2k − 6 samples, as two
    ``(n, k)`` matrices: x[t] = Σᵢ a[i]·rec_lo[t + 6 − 2i] + d[i]·rec_hi[t + 6 − 2i], with
    rec = the analysis filter reversed (PyWavelets' ``idwt``, cropped to the first n samples)."""
    taps = len(DB4_DEC_LO)
    t = np.arange(n)[:, None] + taps - 2 - 2 * np.arange(k)[None, :]
    inside = (t >= 0) & (t < taps)
    tap = np.clip(t, 0, taps - 1)
    return (np.where(inside, DB4_DEC_LO[::-1][tap], 0.0),
            np.where(inside, DB4_DEC_HI[::-1][tap], 0.0))


@functools.lru_cache(maxsize=None)
def _axis_matrices(n: int, levels: int) -> tuple:
    """Per level ℓ = 1 … levels: (analysis lo, analysis hi, synthesis lo, synthesis hi), float32."""
    sizes = _level_sizes(n, levels)
    per_level = [_analysis(sizes[i]) + _synthesis(sizes[i + 1], sizes[i]) for i in range(levels)]
    return tuple(tuple(m.astype(np.float32) for m in mats) for mats in per_level)


def _apply(m_rows, m_cols, x):
    """M_rows · x · M_colsᵀ over the last two axes of ``x``."""
    return jnp.einsum("ij,...jk,lk->...il", m_rows, x, m_cols, precision=_HIGHEST)


def wavedec2(x, levels: int = LEVELS) -> list:
    """Multi-level 2-D db4 decomposition of ``x`` ``(..., H, W)`` (``symmetric`` mode), laid out
    as ``pywt.wavedec2(x, "db4", level=levels, axes=(-2, -1))``:
    ``[a_L, (h_L, v_L, d_L), …, (h_1, v_1, d_1)]``, level ℓ of shape ``(..., H_ℓ, W_ℓ)`` with
    H_ℓ = ⌊(H_{ℓ−1} + 7)/2⌋; h = detail across rows (low-pass along W), v = across columns."""
    rows, cols = (_axis_matrices(n, levels) for n in x.shape[-2:])
    details = []
    for (r_lo, r_hi, _, _), (c_lo, c_hi, _, _) in zip(rows, cols):
        details.append((_apply(r_hi, c_lo, x), _apply(r_lo, c_hi, x), _apply(r_hi, c_hi, x)))
        x = _apply(r_lo, c_lo, x)
    return [x] + details[::-1]


def waverec2(coeffs: list, shape: tuple[int, int]):
    """The inverse of :func:`wavedec2` for an image of ``shape`` = (H, W): ``(..., H, W)``.
    Equals ``pywt.waverec2(coeffs, "db4")`` cropped to (H, W) (PyWavelets crops each level's
    reconstruction to the next level's detail size; an odd side comes back one sample longer)."""
    levels = len(coeffs) - 1
    rows, cols = _axis_matrices(shape[0], levels), _axis_matrices(shape[1], levels)
    x = coeffs[0]
    for (h, v, d), (_, _, r_lo, r_hi), (_, _, c_lo, c_hi) in zip(coeffs[1:], rows[::-1],
                                                                  cols[::-1]):
        x = (_apply(r_lo, c_lo, x) + _apply(r_hi, c_lo, h) + _apply(r_lo, c_hi, v)
             + _apply(r_hi, c_hi, d))
    return x


def _box_mean(x, size: int):
    """Mean over a ``size``×``size`` window (odd size) of the last two axes, zeros outside."""
    pad = [(0, 0)] * (x.ndim - 2) + [(size // 2, size // 2)] * 2
    window = (1,) * (x.ndim - 2) + (size, size)
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, (1,) * x.ndim, pad)
    return total / (size * size)


def _wiener_gain(x, noise_var):
    """σ²/(v + σ²), v = min over the windows of max(box-mean(x²) − σ², 0); 0 where σ² = 0."""
    energy = x * x
    var = jnp.min(jnp.stack([jnp.maximum(_box_mean(energy, w) - noise_var, 0.0)
                             for w in WINDOWS]), axis=0)
    denom = var + noise_var
    return jnp.where(denom > 0, noise_var / jnp.where(denom > 0, denom, 1.0), 0.0)


def _zero_mean(x):
    """Subtract the mean, then the row means and the column means (last two axes)."""
    x = x - jnp.mean(x, axis=(-2, -1), keepdims=True)
    return x - jnp.mean(x, axis=-1, keepdims=True) - jnp.mean(x, axis=-2, keepdims=True)


def _zero_mean_total(x):
    for r in (0, 1):
        for c in (0, 1):
            x = x.at[..., r::2, c::2].set(_zero_mean(x[..., r::2, c::2]))
    return x


def _wiener_dft(x):
    """Shrink the DFT of each ``(H, W)`` residual by the Wiener gain of its normalised magnitude,
    with the noise variance set to the residual's own variance (ddof=1)."""
    h, w = x.shape[-2:]
    noise_var = jnp.var(x, axis=(-2, -1), ddof=1, keepdims=True)
    spectrum = jnp.fft.fft2(x)
    gain = _wiener_gain(jnp.abs(spectrum) / float(np.sqrt(h * w)), noise_var)
    return jnp.real(jnp.fft.ifft2(spectrum * gain.astype(spectrum.dtype))).astype(jnp.float32)


@jax.jit
def _residual(images):
    coeffs = wavedec2(images)
    noise_var = SIGMA ** 2
    details = [tuple(band * _wiener_gain(band, noise_var) for band in level)
               for level in coeffs[1:]]
    noise = waverec2([jnp.zeros_like(coeffs[0])] + details, images.shape[-2:])
    if noise.shape[-3] == 3:
        noise = jnp.einsum("c,...chw->...hw", jnp.asarray(RGB_TO_GREY, jnp.float32), noise,
                           precision=_HIGHEST)
    else:
        noise = noise[..., 0, :, :]
    return _wiener_dft(_zero_mean_total(noise))


def noise_residual(images, *, batch_size: int = 256) -> np.ndarray:
    """The reference's grey PRNU noise residual of each image (steps 1–6 of the module doc).

    Args:
      images: ``(B, C, H, W)``, C = 1 (grey) or 3 (RGB), H, W ≥ 2, in the 8-bit pixel scale
        [0, 255]: uint8, or floats (e.g. generator outputs mapped from [low, high] by
        ``(x − low)/(high − low)·255``; the reference truncates to uint8 first, this does not).
      batch_size: images per jitted call (bounds memory; the last batch compiles once more).

    Returns:
      ``(B, H, W)`` float32 residuals.
    """
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[1] not in (1, 3) or min(x.shape[2:], default=0) < 2:
        raise ValueError(f"images has shape {x.shape}: expected (B, C, H, W) with C = 1 or 3 "
                         "and H, W >= 2")
    if x.dtype != np.uint8:
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"images has dtype {x.dtype}: expected uint8 or float pixels in "
                             "[0, 255]")
        check_finite("images", x)
        if x.size and (x.min() < 0 or x.max() > 255):
            raise ValueError(f"images has values in [{x.min()}, {x.max()}]: expected the 8-bit "
                             "pixel scale [0, 255] (map [low, high] outputs by "
                             "(x - low)/(high - low)*255)")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected >= 1")
    x = x.astype(np.float32)
    parts = [np.asarray(_residual(x[i:i + batch_size])) for i in range(0, len(x), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0,) + x.shape[2:], np.float32)


def _unit(v):
    """Rows of ``v`` ``(B, D)`` minus their mean, divided by their L2 norm (zero rows stay 0)."""
    v = v - v.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    return np.where(norm > 0, v / np.where(norm > 0, norm, 1.0), 0.0), norm[:, 0]


def _check_residuals(name, r) -> np.ndarray:
    r = np.asarray(r)
    if r.ndim != 3:
        raise ValueError(f"{name} has shape {r.shape}: expected (B, H, W) residuals "
                         "(from noise_residual)")
    check_finite(name, r)
    return r.astype(np.float64)


def fingerprint(residuals) -> np.ndarray:
    """f_G: the mean of G's residuals ``(n, H, W)``, zero-mean and unit-norm, ``(H, W)`` float32."""
    r = _check_residuals("residuals", residuals)
    if len(r) == 0:
        raise ValueError("residuals has no rows: expected the residuals of n >= 1 images of G")
    mean = r.mean(axis=0)
    unit, norm = _unit(mean.reshape(1, -1))
    if norm[0] == 0:
        raise ValueError("the mean residual is constant (all images flat?): a fingerprint "
                         "needs a non-constant mean residual")
    return unit.reshape(mean.shape).astype(np.float32)


def sm_f_scores(f_g, residuals) -> np.ndarray:
    """s(x) = −⟨f_G, r̂(x)⟩ ∈ [−1, 1] per image, ``(B,)`` float32 (higher: less likely made by G).

    Args:
      f_g: ``(H, W)`` from :func:`fingerprint` (made zero-mean, unit-norm again here).
      residuals: ``(B, H, W)`` from :func:`noise_residual`; each is made zero-mean and unit-norm
        (a constant residual stays 0 and scores 0).
    """
    f = np.asarray(f_g)
    r = _check_residuals("residuals", residuals)
    if f.shape != r.shape[1:]:
        raise ValueError(f"fingerprint has shape {f.shape}, residuals {r.shape}: expected "
                         "(H, W) and (B, H, W) of the same image size")
    check_finite("fingerprint", f)
    f_unit, _ = _unit(f.reshape(1, -1).astype(np.float64))
    r_unit, _ = _unit(r.reshape(len(r), -1))
    return (-(r_unit @ f_unit[0])).astype(np.float32)
