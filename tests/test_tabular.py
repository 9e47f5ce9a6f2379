"""The wine data and the strict CSV reader: counts and values against the UCI originals, the
authors' split sizes, whitening by its defining property, and every refusal naming file and
line."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from flipad_jax.tabular import (WINE_FEATURES, WINE_FILE, load_wine, prepare_wine,
                                read_numeric_csv, wine_splits)

# The first data line of each UCI original (winequality-red.csv / -white.csv), quality dropped.
UCI_FIRST_ROW = {"redwine": [7.4, 0.7, 0, 1.9, 0.076, 11, 34, 0.9978, 3.51, 0.56, 9.4],
                 "whitewine": [7, 0.27, 0.36, 20.7, 0.045, 45, 170, 1.001, 3, 0.45, 8.8]}
# Train / valid / test sizes of the authors' split (REFERENCE.md §9).
SPLITS = {"redwine": (1296, 144, 159), "whitewine": (3969, 440, 489)}


def test_wine_counts_columns_and_first_rows():
    wine = load_wine()
    assert {k: v.shape for k, v in wine.items()} == {"redwine": (1599, 11),
                                                     "whitewine": (4898, 11)}
    for name, rows in wine.items():
        assert rows.dtype == np.float64 and not np.isnan(rows).any()
        np.testing.assert_array_equal(rows[0], UCI_FIRST_ROW[name])
    # Published ranges of the UCI data: pH between 2.7 and 4.1, alcohol 8 to 15 % vol.
    both = np.concatenate(list(wine.values()))
    ph, alcohol = both[:, WINE_FEATURES.index("pH")], both[:, WINE_FEATURES.index("alcohol")]
    assert 2.7 < ph.min() and ph.max() < 4.1 and 8 <= alcohol.min() and alcohol.max() < 15


@pytest.mark.parametrize("name", ["redwine", "whitewine"])
def test_splits_sizes_whitening_and_inverse(name):
    s = wine_splits(name)
    assert (len(s.train), len(s.valid), len(s.test)) == SPLITS[name]
    assert sorted(s.columns) == list(range(11))
    rows = np.concatenate([s.train, s.valid, s.test])
    # Whitening's defining property: zero mean and identity second moment (all rows < 10⁴).
    np.testing.assert_allclose(rows.mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(rows.T @ rows / len(rows), np.eye(11), atol=1e-12)
    # The splits hold every raw row once: undoing the whitening gives the file's rows back. (Sort
    # keys rounded to 7 decimals, far from the file's values' rounding boundaries, so that rows
    # equal up to 1e-12 sort alike.)
    back, raw = s.raw(rows), load_wine()[name]
    order = lambda a: a[np.lexsort(np.round(a, 7).T[::-1])]  # noqa: E731
    np.testing.assert_allclose(order(back), order(raw), rtol=1e-12, atol=1e-12)


def test_prepare_is_deterministic_per_seed_and_refuses_bad_rows():
    rows = load_wine()["redwine"]
    a, b, c = prepare_wine(rows), prepare_wine(rows), prepare_wine(rows, seed=1)
    np.testing.assert_array_equal(a.train, b.train)
    assert not np.array_equal(a.columns, c.columns) or not np.array_equal(a.train, c.train)
    bad = rows.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        prepare_wine(bad)
    with pytest.raises(ValueError, match="linearly dependent"):
        prepare_wine(np.concatenate([rows, rows[:, :1]], axis=1))
    with pytest.raises(ValueError, match="name='rosewine'"):
        wine_splits("rosewine")


def _write(path, text):
    path.write_bytes(text.encode())
    return path


GOOD = "a,b,c\n1,2,3\n4.5,-6e-3,7\n"


def test_reader_reads_selected_columns(tmp_path):
    f = _write(tmp_path / "t.csv", GOOD)
    np.testing.assert_array_equal(read_numeric_csv(f), [[1, 2, 3], [4.5, -6e-3, 7]])
    np.testing.assert_array_equal(read_numeric_csv(f, ["c", "a"]), [[3, 1], [7, 4.5]])
    np.testing.assert_array_equal(read_numeric_csv(_write(tmp_path / "n.csv", "1;2\r\n3;4\r\n"),
                                                   header=False, delimiter=";"), [[1, 2], [3, 4]])


@pytest.mark.parametrize("text, columns, message", [
    ("", None, "empty file"),
    ("a,b,c\n1,2,3\n4,5", None, "line 3: the file ends inside this line"),  # truncated
    ("a,b,c\n1,2,3\n4,5,6\n7,8\n", None, "line 4: 2 cells, expected 3"),
    ("a,b,c\n1,2,3,4\n", None, "line 2: 4 cells, expected 3"),
    ("a,b,c\n1,2,3\n\n4,5,6\n", None, "line 3: an empty line"),
    ("a,b,c\n1,x,3\n", None, "line 2, column 'b': 'x' is not a number"),
    ("a,b,c\n1,2,3\n1,nan,3\n", None, "line 3, column 'b': 'nan' is not a finite number"),
    ("a,b,c\n1,,3\n", None, "line 2, column 'b': '' is not a number"),
    ("a,b,c\n1,2,3\n", ["a", "d", "e"], r"line 1: missing columns \['d', 'e'\]"),
    ("a,b,a\n1,2,3\n", None, r"line 1: duplicate column names \['a'\]"),
    ("a,b,c\n", None, "no data rows"),
    ('a,b,c\n1,"2"x,3\n', None, "line 2: malformed CSV"),
    ("a,b,c\n1,2,3\n\xff\n", None, "not UTF-8"),
])
def test_reader_refuses_with_file_and_line(tmp_path, text, columns, message):
    f = tmp_path / "bad.csv"
    f.write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match=message) as err:
        read_numeric_csv(f, columns)
    assert str(f) in str(err.value)


def test_wine_loader_refuses_corrupt_copies(tmp_path):
    lines = WINE_FILE.read_bytes().decode().splitlines(keepends=True)
    truncated = _write(tmp_path / "truncated.csv", "".join(lines[:101]) + lines[101][:9])
    with pytest.raises(ValueError, match=f"{truncated}: line 102: the file ends inside"):
        load_wine(truncated)
    no_ph = _write(tmp_path / "no_ph.csv", "".join(lines).replace(",pH,", ",ph,", 1))
    with pytest.raises(ValueError, match=r"line 1: missing columns \['pH'\]"):
        load_wine(no_ph)
    cells = lines[500].split(",")
    cells[3] = "1.9.1"
    corrupt = _write(tmp_path / "corrupt.csv", "".join(lines[:500] + [",".join(cells)]
                                                       + lines[501:]))
    with pytest.raises(ValueError, match="line 501, column 'residual_sugar': '1.9.1' is not a"):
        load_wine(corrupt)
    rose = _write(tmp_path / "rose.csv", "".join(lines).replace(",red\r\n", ",rose\r\n", 1))
    with pytest.raises(ValueError, match="line 2, column 'color': 'rose'"):
        load_wine(rose)


@settings(max_examples=30, deadline=None)
@given(hnp.arrays(np.float64, hnp.array_shapes(min_dims=2, max_dims=2, max_side=6),
                  elements=st.floats(allow_nan=False, allow_infinity=False)))
def test_reader_round_trips_any_finite_matrix(tmp_path_factory, values):
    f = tmp_path_factory.mktemp("rt") / "m.csv"
    header = ",".join(f"c{j}" for j in range(values.shape[1]))
    f.write_text(header + "\n" + "".join(",".join(repr(float(v)) for v in row) + "\n"
                                         for row in values))
    np.testing.assert_array_equal(read_numeric_csv(f), values)
