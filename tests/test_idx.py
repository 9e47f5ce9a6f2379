"""IDX reading against files written here byte by byte from the format's definition."""

import gzip
import struct

import numpy as np
import pytest

from flipad_jax.idx import load_split, read_idx


def _idx_bytes(array, type_code):
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def test_reads_plain_and_gzipped_files_of_every_type(tmp_path):
    rng = np.random.default_rng(0)
    cases = {0x08: rng.integers(0, 256, (3, 4, 5)).astype(np.uint8),
             0x0C: rng.integers(-1000, 1000, (6,)).astype(np.int32),
             0x0D: rng.normal(size=(2, 3)).astype(np.float32)}
    for code, array in cases.items():
        plain, packed = tmp_path / f"{code}.idx", tmp_path / f"{code}.idx.gz"
        plain.write_bytes(_idx_bytes(array, code))
        packed.write_bytes(gzip.compress(_idx_bytes(array, code)))
        for path in (plain, packed):
            np.testing.assert_array_equal(read_idx(path), array)


def test_load_split_pairs_images_and_labels(tmp_path):
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    labels = np.array([3, 7], np.uint8)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(images, 8)))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(labels, 8))
    x, y = load_split(tmp_path, "test")
    assert x.shape == (2, 1, 28, 28) and x.dtype == np.uint8
    np.testing.assert_array_equal(x[:, 0], images)
    np.testing.assert_array_equal(y, labels)
    with pytest.raises(ValueError, match="no train-images-idx3-ubyte"):
        load_split(tmp_path, "train")
    with pytest.raises(ValueError, match="split='val'"):
        load_split(tmp_path, "val")


def test_corrupt_files_are_named(tmp_path):
    good = _idx_bytes(np.zeros((4, 4), np.uint8), 8)
    (tmp_path / "short.idx").write_bytes(good[:-3])
    with pytest.raises(ValueError, match=r"short\.idx: .*\(truncated or corrupt\)"):
        read_idx(tmp_path / "short.idx")
    (tmp_path / "magic.idx").write_bytes(b"\x01\x02\x03\x04" + good[4:])
    with pytest.raises(ValueError, match=r"magic\.idx: bad IDX magic"):
        read_idx(tmp_path / "magic.idx")
    (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=r"bad\.gz: unreadable IDX file"):
        read_idx(tmp_path / "bad.gz")
