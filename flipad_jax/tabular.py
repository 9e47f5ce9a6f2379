"""Tabular data: a strict numeric CSV reader and the wine data of the paper's tabular experiment.

The wine data is UCI Wine Quality (Cortez et al. 2009, CC BY 4.0; see ``data/README.md``):
red 1599 and white 4898 rows of 11 physicochemical features, vendored as one CSV. The paper's
generators train on, and sample in, a whitened space; :func:`prepare_wine` reproduces the
authors' preprocessing (``RealDataset`` in ``klwgan_data_utils.py`` with its defaults): with a
``RandomState(seed)`` stream, shuffle the rows, permute the columns, whiten with the SVD of the
first 10⁴ rows, and split off test (the last 10 %) and validation (then the last
min(10 %, 1000)) rows.

Every reader refuses bad input with a ``ValueError`` that names the file and the line: an empty
or truncated file (the last line has no line end), a missing column, a row of the wrong width, a
cell that is not a finite number. No pandas: the csv module and numpy.
"""

from __future__ import annotations

import csv
import hashlib
import io
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np

WINE_FILE = Path(__file__).parent / "data" / "wines-quality.csv"
WINE_SHA256 = "7c2f0ec89b30e7a6cf95fb29281c77052ac7564b797601e5b49b6692e0d193d3"
WINE_FEATURES = ("fixed_acidity", "volatile_acidity", "citric_acid", "residual_sugar",
                 "chlorides", "free_sulfur_dioxide", "total_sulfur_dioxide", "density", "pH",
                 "sulphates", "alcohol")
# The paper's names of the two data sets and their value of the file's ``color`` column.
WINE_COLORS = {"redwine": "red", "whitewine": "white"}
WHITEN_ROWS = 10 ** 4  # the reference whitens with the SVD of the first 10⁴ rows


def _lines(path: Path, delimiter: str):
    """(line number, cells) of every row; refuses an unreadable, empty or truncated file."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}: line {line}: not UTF-8 text (byte {e.start})") from None
    if not text:
        raise ValueError(f"{path}: empty file, expected CSV rows")
    if not text.endswith(("\n", "\r")):
        line = len(text.splitlines())
        raise ValueError(f"{path}: line {line}: the file ends inside this line (no line end): "
                         "truncated?")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        for cells in reader:
            yield reader.line_num, cells
    except csv.Error as e:
        raise ValueError(f"{path}: line {reader.line_num}: malformed CSV ({e})") from None


def _table(path, columns: Optional[Sequence[str]], *, header: bool, delimiter: str):
    """(column names, line numbers, rows of the selected cells as strings)."""
    path = Path(path)
    lines = _lines(path, delimiter)
    width, names = None, None
    if header:
        first = next(lines, None)
        if first is None or not any(c.strip() for c in first[1]):
            raise ValueError(f"{path}: line 1: expected a header line naming the columns")
        names = tuple(c.strip() for c in first[1])
        width = len(names)
        doubled = sorted({n for n in names if names.count(n) > 1})
        if doubled:
            raise ValueError(f"{path}: line 1: duplicate column names {doubled}")
        if columns is not None:
            missing = [c for c in columns if c not in names]
            if missing:
                raise ValueError(f"{path}: line 1: missing columns {missing}; the header has "
                                 f"{list(names)}")
    elif columns is not None:
        raise ValueError(f"columns={list(columns)!r}: columns are chosen by name, which needs "
                         "header=True")
    numbers, rows, index = [], [], None
    for number, cells in lines:
        if width is None:
            width = len(cells)
            names = tuple(f"column {i}" for i in range(width))
        if len(cells) != width:
            what = "an empty line" if not cells else f"{len(cells)} cells"
            raise ValueError(f"{path}: line {number}: {what}, expected {width} "
                             f"(as {'the header' if header else 'the first row'})")
        if index is None:
            index = [names.index(c) for c in columns] if columns is not None \
                else list(range(width))
        numbers.append(number)
        rows.append([cells[i] for i in index])
    if not rows:
        raise ValueError(f"{path}: no data rows")
    return tuple(names[i] for i in index), numbers, rows


def _numbers(path, names, numbers, rows) -> np.ndarray:
    """The cells as float64 ``(len(rows), len(names))``; non-numbers and non-finite refused."""
    out = np.empty((len(rows), len(names)), np.float64)
    for r, (number, cells) in enumerate(zip(numbers, rows)):
        for c, cell in enumerate(cells):
            try:
                value = float(cell)
            except ValueError:
                raise ValueError(f"{path}: line {number}, column {names[c]!r}: {cell!r} is not "
                                 "a number") from None
            if not np.isfinite(value):
                raise ValueError(f"{path}: line {number}, column {names[c]!r}: {cell!r} is not "
                                 "a finite number")
            out[r, c] = value
    return out


def read_numeric_csv(path, columns: Optional[Sequence[str]] = None, *, header: bool = True,
                     delimiter: str = ",") -> np.ndarray:
    """A CSV of numbers as a float64 array ``(rows, columns)``.

    Args:
      path: the CSV file (UTF-8; ``\\n`` or ``\\r\\n`` line ends; the last line must end too).
      columns: names of the columns to return, in this order (default: all); needs ``header``.
      header: whether line 1 names the columns (the authors' ``data.csv`` files have none).
      delimiter: the cell separator (the UCI originals use ``;``).

    Raises ``ValueError`` naming the file and line for: an empty or truncated file, a missing
    or duplicate column name, a row of another width than the header (or the first row), a cell
    of a selected column that is not a finite number.
    """
    names, numbers, rows = _table(path, columns, header=header, delimiter=delimiter)
    return _numbers(path, names, numbers, rows)


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def read_csv_rows(path, *, delimiter: str = ",") -> tuple[np.ndarray, np.ndarray]:
    """The rows of a numeric CSV with an optional header, and their line numbers.

    Line 1 is a header when none of its cells is a number (so a data row with one bad cell is
    refused, not taken for a header). Refusals as :func:`read_numeric_csv`: every row must have
    the header's (or the first row's) width and finite numbers in every cell.

    Returns:
      ``(lines, values)``: ``(n,)`` int64 line numbers in the file (1-based, as errors name
      them) and float64 ``(n, width)``.
    """
    path = Path(path)
    first = next(_lines(path, delimiter), None)
    header = first is not None and not any(_is_number(c) for c in first[1])
    names, numbers, rows = _table(path, None, header=header, delimiter=delimiter)
    return np.asarray(numbers, np.int64), _numbers(path, names, numbers, rows)


def load_wine(path=None) -> dict[str, np.ndarray]:
    """The wine rows: ``{"redwine": (1599, 11), "whitewine": (4898, 11)}`` float64, in file order.

    ``path`` (default: the vendored copy, whose SHA-256 is checked) is a CSV with a header that
    has the columns of ``WINE_FEATURES`` and ``color`` (``red`` or ``white``); other columns
    (``quality``) are ignored.
    """
    if path is None:
        path = WINE_FILE
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != WINE_SHA256:
            raise ValueError(f"{path}: SHA-256 {digest}, expected {WINE_SHA256}: the packaged "
                             "wine data was modified; reinstall the package")
    names, numbers, rows = _table(path, WINE_FEATURES + ("color",), header=True, delimiter=",")
    colors = [row[-1].strip() for row in rows]
    for number, color in zip(numbers, colors):
        if color not in WINE_COLORS.values():
            raise ValueError(f"{path}: line {number}, column 'color': {color!r}, expected one "
                             f"of {sorted(WINE_COLORS.values())}")
    values = _numbers(path, names[:-1], numbers, [row[:-1] for row in rows])
    colors = np.asarray(colors)
    return {name: values[colors == color] for name, color in WINE_COLORS.items()}


class WineSplits(NamedTuple):
    """One wine data set, preprocessed as the reference (float64 throughout).

    Attributes:
      train, valid, test: whitened rows ``(n, 11)``; red 1296 / 144 / 159, white 3969 / 440 /
        489.
      columns: ``(11,)`` int, the column permutation: whitened column j mixes the raw
        columns ``columns`` in this order.
      mean: ``(11,)`` the mean of the permuted raw rows.
      whiten: ``(11, 11)`` W with whitened = (permuted raw − mean) @ W.
    """

    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    columns: np.ndarray
    mean: np.ndarray
    whiten: np.ndarray

    def raw(self, rows) -> np.ndarray:
        """Whitened rows ``(n, 11)`` back in raw units and the file's column order."""
        permuted = np.asarray(rows, np.float64) @ np.linalg.inv(self.whiten) + self.mean
        return permuted[:, np.argsort(self.columns)]


def prepare_wine(rows, *, seed: int = 0) -> WineSplits:
    """Shuffle, permute columns, whiten and split ``rows`` ``(n, d)`` as the reference does.

    With ``rs = np.random.RandomState(seed)`` (the reference seeds the global legacy generator
    with 0 for every repetition, which draws the same numbers): ``rs.shuffle`` the rows, then
    permute the columns by ``rs.permutation(d)``; subtract the mean of all rows; with the SVD
    X[:m] = U S Vᵀ of the first m = min(n, 10⁴) centred rows, W = V S⁻¹ √m, so the first m
    whitened rows have identity second moment; test = the last ⌊0.1 n⌋ rows, valid = the last
    min(⌊0.1 (n − n_test)⌋, 1000) of the rest, train = the remainder. The SVD's signs are
    LAPACK's, so a whitened column may be the negative of another build's.
    """
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed={seed!r}: expected an int >= 0")
    data = np.array(rows, dtype=np.float64)
    if data.ndim != 2 or data.shape[0] < 20 or data.shape[1] < 1:
        raise ValueError(f"rows of shape {data.shape}: expected (n, d) with n >= 20 and d >= 1")
    if not np.all(np.isfinite(data)):
        raise ValueError("rows hold NaN/inf: expected finite values")
    rs = np.random.RandomState(seed)
    rs.shuffle(data)
    columns = rs.permutation(data.shape[1])
    data = data[:, columns]
    mean = data.mean(0)
    data -= mean
    m = min(data.shape[0], WHITEN_ROWS)
    _, s, vt = np.linalg.svd(data[:m], full_matrices=False)
    if s[-1] <= s[0] * 1e-12:
        raise ValueError(f"rows: singular values {s}: the columns are linearly dependent, "
                         "expected full rank to whiten")
    whiten = vt.T / s * np.sqrt(m)
    data = data @ whiten
    n_test = int(data.shape[0] * 0.1)
    rest, test = data[:-n_test], data[-n_test:]
    n_valid = min(int(rest.shape[0] * 0.1), 1000)
    return WineSplits(rest[:-n_valid], rest[-n_valid:], test, columns, mean, whiten)


def wine_splits(name: str, *, path=None, seed: int = 0) -> WineSplits:
    """:func:`prepare_wine` of ``load_wine(path)[name]``; name "redwine" or "whitewine"."""
    if name not in WINE_COLORS:
        raise ValueError(f"name={name!r}: expected one of {sorted(WINE_COLORS)}")
    return prepare_wine(load_wine(path)[name], seed=seed)
