"""Reading IDX files (the MNIST / Fashion-MNIST format), plain or gzipped, without pickles.

Layout: magic ``00 00 <type> <ndim>``, then ``ndim`` big-endian uint32 sizes, then the data in
row-major order. Debian's ``dataset-fashion-mnist`` installs the four standard files under
``/usr/share/datasets/fashion-mnist/``; :func:`load_split` reads a split from such a folder.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
          0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
SPLIT_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path) -> np.ndarray:
    """The array stored in an IDX file (``.gz`` is decompressed), checked against its header."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as error:
        raise ValueError(f"{path}: unreadable IDX file ({error})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _TYPES:
        raise ValueError(f"{path}: bad IDX magic {raw[:4].hex()!r}, expected 0000<type><ndim> "
                         f"with type in {[hex(t) for t in _TYPES]}")
    dtype, ndim = np.dtype(_TYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, expected {header})")
    shape = tuple(int(v) for v in np.frombuffer(raw, ">u4", ndim, 4))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: {len(raw)} bytes, expected {expected} for shape {shape} "
                         f"of {dtype} (truncated or corrupt)")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def load_split(folder, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(images ``(N, 1, H, W)`` uint8, labels ``(N,)`` uint8) of a split from an IDX folder."""
    if split not in SPLIT_FILES:
        raise ValueError(f"split={split!r}: expected one of {list(SPLIT_FILES)}")
    folder = Path(folder)
    arrays = []
    for stem in SPLIT_FILES[split]:
        candidates = [folder / stem, folder / (stem + ".gz")]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise ValueError(f"{folder}: no {stem}[.gz] (expected the four standard IDX files, "
                             "e.g. from Debian's dataset-fashion-mnist)")
        arrays.append(read_idx(found))
    images, labels = arrays
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"{folder}: images {images.shape} and labels {labels.shape}: expected "
                         "(N, H, W) and (N,)")
    return images[:, None], labels
