"""Reading images for inversion, fitting and scoring: folders, glob patterns and ``.npy`` arrays.

Two steps, so that large sets can be streamed:

* :func:`list_images` expands sources into a sorted list of :class:`ImageRef` (one per image
  file, one per row of an ``.npy`` array or a ``.csv`` table) without reading pixels (``.npy``
  headers only; a CSV is parsed and checked whole, :func:`flipad_jax.tabular.read_csv_rows`);
* :func:`read_images` loads any slice of that list (``.npy`` rows through a memory map).

:func:`load_images` does both for a whole source. PNG pixels p ∈ {0 … 255} map to the generator's
output range [low, high] as ``low + p/255 · (high − low)``, the inverse of ``flipad sample``'s
quantisation. Float arrays are taken as already in the output range, and values outside it are
refused unless their scale (``x_range``) or clipping (``clip``) is given (:func:`floats_to_range`).
Arrays are read with ``allow_pickle=False``. Every failure names the file (for an array row,
``file.npy[i]``, for a CSV row its line) and what was expected.
"""

from __future__ import annotations

import functools
import glob
import os
import zlib
from pathlib import Path
from typing import Iterable, NamedTuple, Optional, Sequence, Union

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
TABLE_SUFFIX = ".csv"  # rows of numbers, the inputs of tabular (Linear) heads
GLOB_CHARS = "*?["


def _is_table(path: str) -> bool:
    return path.lower().endswith(TABLE_SUFFIX)


class ImageRef(NamedTuple):
    """One input image: an image file (``index == -1``), row ``index`` of an ``.npy`` file, or
    the row on line ``index`` of a ``.csv`` file. Refs sort by (path, index), so rows keep their
    order."""

    path: str
    index: int = -1

    @property
    def name(self) -> str:
        """The name in outputs: ``path`` for an image file, ``path[i]`` for an array row,
        ``path:line`` for a CSV row."""
        if self.index < 0:
            return self.path
        return f"{self.path}:{self.index}" if _is_table(self.path) else f"{self.path}[{self.index}]"


def _rows_name(path: str, rows: list) -> str:
    """How errors name rows ``rows`` of an array or CSV file."""
    if _is_table(path):
        return f"{path}: line {rows[0]}" + ("" if len(rows) == 1 else f"-{rows[-1]}")
    return f"{path}[{rows[0]}]" if len(rows) == 1 else f"{path}[{rows[0]}..{rows[-1]}]"


def _csv_rows(path) -> tuple[np.ndarray, np.ndarray]:
    """(line numbers, float64 rows) of a CSV (:func:`flipad_jax.tabular.read_csv_rows`), parsed
    once per version of the file: it is listed first, then read batch by batch."""
    stat = os.stat(path)
    return _parsed_csv(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _parsed_csv(path: str, mtime_ns: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    from flipad_jax.tabular import read_csv_rows

    return read_csv_rows(path)


def _open_npy(path) -> np.ndarray:
    """The array of an ``.npy`` file as a read-only memory map, checked to be (B, C, H, W) of
    uint8 or float pixels (values are checked when rows are read)."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable .npy array ({error})") from None
    if arr.ndim != 4:
        raise ValueError(f"{path}: array of shape {arr.shape}, expected (B, C, H, W)")
    if arr.dtype != np.uint8 and not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{path}: dtype {arr.dtype}, expected uint8 or float")
    if len(arr) == 0:
        raise ValueError(f"{path}: array of shape {arr.shape} holds no images, expected B >= 1")
    return arr


def _read_image(path) -> np.ndarray:
    """The 8-bit pixels of one image file as ``(C, H, W)`` uint8 (C = 1 grey or 3 RGB)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("L", "RGB"):
                raise ValueError(f"{path}: image mode {img.mode!r}, expected 'L' (grey) or "
                                 "'RGB' 8-bit pixels")
            arr = np.asarray(img)
    except OSError as error:
        raise ValueError(f"{path}: unreadable or truncated image ({error})") from None
    if arr.dtype != np.uint8:
        raise ValueError(f"{path}: pixel type {arr.dtype}, expected 8-bit images")
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _folder_files(folder: Path) -> list[ImageRef]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    return [ImageRef(str(p)) for p in files]


def _expand(source: str, *, in_glob: bool = False) -> list[ImageRef]:
    path = Path(source)
    if path.is_dir():
        return _folder_files(path)
    if path.is_file() and path.suffix == ".npy":
        return [ImageRef(source, i) for i in range(len(_open_npy(path)))]
    if path.is_file() and _is_table(source):
        return [ImageRef(source, int(line)) for line in _csv_rows(path)[0]]
    if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        return [ImageRef(source)]
    if in_glob:  # a match that is no image: skipped, as a folder skips such files
        return []
    if any(c in source for c in GLOB_CHARS):
        refs = [r for match in sorted(glob.glob(source)) for r in _expand(match, in_glob=True)]
        if not refs:
            raise ValueError(f"{source}: the glob pattern matches no images: expected it to "
                             f"match image files ({', '.join(IMAGE_SUFFIXES)}), .npy arrays, "
                             ".csv tables or folders of images")
        return refs
    if path.exists():
        raise ValueError(f"{source}: not an image ({', '.join(IMAGE_SUFFIXES)}), .npy or .csv "
                         "file: expected a folder of images, a glob pattern, an .npy array or a "
                         ".csv table")
    raise ValueError(f"{source}: no such file or folder: expected a folder of images, a glob "
                     "pattern (quoted), an .npy array or a .csv table")


def list_images(sources: Union[str, Path, Sequence[Union[str, Path]]]) -> list[ImageRef]:
    """Every image of ``sources``, sorted by (path, row) and without repeats; reads no pixels.

    Args:
      sources: one or several of: a folder of 8-bit images (``.png``, ``.jpg``, ...), a glob
        pattern over such files, ``.npy`` arrays or folders, an ``.npy`` array ``(B, C, H, W)``
        (one ref per row), a ``.csv`` table of numbers with an optional header line (one ref
        per row, the input of a tabular head) or a single image file.
    """
    if isinstance(sources, (str, Path)):
        sources = [sources]
    refs = {r for source in sources for r in _expand(str(source))}
    if not refs:
        raise ValueError("sources=[]: expected at least one folder, glob pattern or .npy file")
    return sorted(refs)


def split_validation(refs: Sequence[ImageRef], fraction: float, *, need: int, seed: int,
                     what: str = "images") -> tuple[list[ImageRef], list[ImageRef]]:
    """(train, validation) parts of ``refs``: a ``fraction`` held out by a permutation seeded
    with ``seed``, each part in the input order. ``need``: the fewest validation images the
    thresholds need (⌈1/fnr⌉); ``what`` names the source in errors."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"--val-fraction {fraction}: expected a number in (0, 1)")
    n_val = int(round(fraction * len(refs)))
    if n_val < need or n_val == len(refs):
        raise ValueError(f"{what}: {len(refs)} images, so --val-fraction {fraction} holds out "
                         f"{n_val} for validation, expected at least {need} (⌈1/fnr⌉ for the "
                         "smallest fnr) and some left to train on: pass --val SRC, more images or "
                         "a larger --val-fraction")
    order = np.random.default_rng(seed).permutation(len(refs))
    return ([refs[i] for i in np.sort(order[n_val:])], [refs[i] for i in np.sort(order[:n_val])])


def _groups(refs: Sequence[ImageRef]) -> Iterable[tuple[str, list[int]]]:
    """Consecutive refs of one ``.npy`` file grouped as (path, rows); image files alone."""
    start = 0
    while start < len(refs):
        stop = start + 1
        if refs[start].index >= 0:
            while stop < len(refs) and refs[stop].path == refs[start].path:
                stop += 1
        yield refs[start].path, [r.index for r in refs[start:stop]]
        start = stop


def _to_range(pixels: np.ndarray, output_range, path: str, rows: Optional[list], *,
              x_range=None, clip: bool = False) -> np.ndarray:
    """uint8 pixels → float32 in ``output_range``; floats are checked for NaN/inf and brought
    into it by :func:`floats_to_range`. ``rows``: the array rows of ``pixels`` (named in
    errors), None for an image file."""
    if pixels.dtype != np.uint8:
        finite = np.isfinite(pixels).reshape(len(pixels), -1).all(axis=1)
        if not finite.all():
            bad = int(np.argmin(finite))
            name = path if rows is None else _rows_name(path, [rows[bad]])
            raise ValueError(f"{name}: holds NaN/inf values, expected finite pixels")
        return floats_to_range(pixels, output_range, x_range=x_range, clip=clip,
                               name=path if rows is None else _rows_name(path, rows))
    if output_range is None:
        raise ValueError(f"{path}: 8-bit pixels need the generator's output range, and this "
                         "head has none (an identity head); pass float arrays instead")
    return pixels_to_range(pixels, output_range)


def floats_to_range(x, expected=(-1.0, 1.0), *, x_range=None, clip: bool = False,
                    name: str = "x") -> np.ndarray:
    """Float images as float32 in the ``expected`` range (the head's output range, [-1, 1] for
    RawPAD / DCTPAD / SM-F), refusing values outside it rather than clipping them silently.

    Args:
      x: float array of any shape.
      expected: ``(low, high)``; None (an unbounded head): x is returned as float32, and
        ``x_range`` and ``clip`` are refused.
      x_range: ``(lo, hi)``, the scale x is given in (e.g. ``(0, 255)``), mapped affinely onto
        ``expected`` first; None: x is already on the ``expected`` scale.
      clip: clip values outside the range into it on purpose; otherwise they are refused,
        naming the range found and the one expected.
      name: what x is, in errors.
    """
    x = np.asarray(x)
    if expected is None:
        if x_range is not None or clip:
            raise ValueError(f"{name}: x_range={x_range!r}, clip={clip!r}: this head's images "
                             "have no bounded range to map or clip onto; expected neither")
        return x.astype(np.float32)
    low, high = map(float, expected)
    if x_range is not None:
        lo, hi = map(float, x_range)
        if not lo < hi:
            raise ValueError(f"x_range={tuple(x_range)!r}: expected (low, high) with low < high")
    else:
        lo, hi = low, high
    if not clip and x.size:
        found = (float(x.min()), float(x.max()))
        if found[0] < lo or found[1] > hi:
            scale = "" if x_range is None else f" (x_range, mapped onto {(low, high)})"
            raise ValueError(f"{name}: float values span [{found[0]:.6g}, {found[1]:.6g}], "
                             f"expected [{lo:g}, {hi:g}]{scale}: pass x_range / --x-range LO,HI "
                             "for the scale the values are in (e.g. 0,255), or clip / --clip to "
                             "clip them on purpose")
    x = np.asarray(x, np.float64)
    if x_range is not None:
        x = low + (x - lo) * ((high - low) / (hi - lo))
    return np.clip(x, low, high).astype(np.float32)  # without clip, this only trims rounding


def pixels_to_range(pixels: np.ndarray, output_range=(-1.0, 1.0)) -> np.ndarray:
    """uint8 pixels p → float32 ``low + p/255 · (high − low)``: how an 8-bit image decodes."""
    low, high = map(float, output_range)
    return (low + pixels.astype(np.float32) / 255.0 * (high - low)).astype(np.float32)


def perturb_refs(pixels: np.ndarray, names: Sequence[str], perturbation, seed: int = 0):
    """``perturbation`` (:class:`flipad_jax.perturbations.Perturbation`) applied to the 8-bit
    images ``pixels`` ``(n, C, H, W)`` named ``names``. Random perturbations draw each image's
    noise from ``(seed, crc32(name))``, so an image is perturbed the same way whatever batch,
    shard or resumed run reads it."""
    from flipad_jax.perturbations import perturb

    if pixels.dtype != np.uint8:
        raise ValueError(f"{names[0]}: holds {pixels.dtype} pixels, expected 8-bit images (PNG "
                         f"files or uint8 arrays) for --perturb {perturbation}")
    return np.concatenate([perturb(pixels[i:i + 1], perturbation, seed=seed,
                                   first_index=zlib.crc32(name.encode("utf-8", "surrogateescape")))
                           for i, name in enumerate(names)])


def read_images(refs: Sequence[ImageRef], output_range=(-1.0, 1.0), *,
                shape: Optional[Sequence[int]] = None, shape_from: str = "",
                progress: bool = False, perturbation=None, seed: int = 0, x_range=None,
                clip: bool = False) -> np.ndarray:
    """The images of ``refs`` as float32 ``(len(refs), C, H, W)`` in ``output_range``.

    Args:
      refs: from :func:`list_images` (any slice; ``.npy`` rows are read through a memory map).
      output_range: (low, high) of the generator's outputs (``head.output_range``) that 8-bit
        pixels are mapped to; None for unbounded heads, which then accept only float arrays.
      shape: the expected per-image ``(C, H, W)`` (e.g. the detector's input shape), named in
        errors by ``shape_from``; None: every image must have the first one's shape.
      progress: show a progress bar.
      perturbation: a :class:`flipad_jax.perturbations.Perturbation` applied to the 8-bit pixels
        before they are decoded (:func:`perturb_refs`, noise seeded by ``seed``); None: none.
      x_range, clip: how float arrays are brought into ``output_range`` (:func:`floats_to_range`:
        mapped from the scale ``x_range``, clipped, or else refused when outside it); 8-bit
        pixels always map from 0–255.
    """
    from tqdm.auto import tqdm

    expected = None if shape is None else tuple(int(s) for s in shape)
    parts = []
    bar = tqdm(total=len(refs), disable=not progress, desc="reading", unit="img", leave=False)
    done = 0
    for path, rows in _groups(refs):
        if rows[0] < 0:
            pixels, rows = _read_image(path)[None], None
        elif _is_table(path):
            pixels = _read_csv_rows(path, rows)
        else:
            arr = _open_npy(path)
            if rows[-1] >= len(arr):
                raise ValueError(f"{path}[{rows[-1]}]: no such row, the array holds {len(arr)} "
                                 "images (it changed since it was listed)")
            contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
            pixels = np.array(arr[rows[0]:rows[-1] + 1] if contiguous else arr[rows])
        if expected is None:
            expected, shape_from = pixels.shape[1:], f"like {path}"
        if pixels.shape[1:] != expected and _is_table(path):
            raise ValueError(f"{path}: line {rows[0]}: rows of {pixels.shape[1]} values, "
                             f"expected {' x '.join(map(str, expected))} {shape_from}")
        if pixels.shape[1:] != expected:
            raise ValueError(f"{path}: image of shape (C, H, W) = {pixels.shape[1:]}, expected "
                             f"{expected} {shape_from} (mixed sizes or channel counts)")
        if perturbation is not None:
            pixels = perturb_refs(pixels, [r.name for r in refs[done:done + len(pixels)]],
                                  perturbation, seed)
        parts.append(_to_range(pixels, output_range, path, rows, x_range=x_range, clip=clip))
        done += len(pixels)
        bar.update(len(pixels))
    bar.close()
    if not parts:
        raise ValueError("refs=[]: expected at least one image")
    return np.concatenate(parts)


def _read_csv_rows(path: str, lines: list) -> np.ndarray:
    """The rows of ``path`` on ``lines`` (from :func:`list_images`), ``(len(lines), width)``."""
    numbers, values = _csv_rows(path)
    at = np.searchsorted(numbers, lines)
    found = (at < len(numbers)) & (numbers[np.minimum(at, len(numbers) - 1)] == lines)
    if not found.all():
        raise ValueError(f"{path}: line {lines[int(np.argmin(found))]}: no such row (the file "
                         "changed since it was listed)")
    return values[at]


def load_images(source, output_range=(-1.0, 1.0), *, shape: Optional[Sequence[int]] = None,
                shape_from: str = "", x_range=None, clip: bool = False) -> np.ndarray:
    """All images of ``source`` (see :func:`list_images`) as float32 ``(B, C, H, W)`` in
    ``output_range``: uint8 pixels (PNG files, uint8 arrays) are mapped to it, float arrays are
    taken as already in it (or on the scale ``x_range``). ``shape``, ``shape_from``, ``x_range``,
    ``clip``: as in :func:`read_images`."""
    return read_images(list_images(source), output_range, shape=shape, shape_from=shape_from,
                       x_range=x_range, clip=clip)
