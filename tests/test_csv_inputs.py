"""Tabular rows as CSV at `flipad fit` / `score` / `evaluate`: a CSV of rows of the tabular head's
width is scored like images, each output row named ``file.csv:LINE``; a CSV of the wrong width,
with missing columns or non-numeric cells is refused naming the file and line. End to end on a
tiny Linear head (6 → 4, identity)."""

import csv
import json
import re

import jax
import numpy as np
import pytest

import flipad_jax as fj
from flipad_jax.bundle import Bundle, write_bundle
from flipad_jax.cli import main
from flipad_jax.images import list_images
from flipad_jax.tabular import read_csv_rows
from tests.test_head_bundle import _meta

SMALL = ["--fnr", "0.05", "--epochs", "3", "--batch-size", "32", "--max-iter", "300",
         "--network-opt", "hidden=[16,8]", "--network-opt", "rep_dim=4", "--quiet"]


def _write_csv(path, rows, header=("a", "b", "c", "d")):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        if header:
            writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def tabular(tmp_path_factory):
    """A Linear head bundle, CSVs of its rows (G) and of Gaussian rows, and a FLIPAD detector
    fitted on them through `flipad fit`."""
    d = tmp_path_factory.mktemp("csv")
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 6)).astype(np.float32)
    meta = _meta(activation="identity")
    meta["lipschitz"] = float(np.linalg.norm(w, 2) ** 2)
    write_bundle(d / "head", Bundle(meta, w, rng.normal(size=4).astype(np.float32),
                                    np.full(6, 0.4, np.float32)))
    head = fj.Head.load(d / "head")
    g = lambda n, key: np.asarray(head.forward(jax.nn.relu(jax.random.normal(key, (n, 6)))))
    _write_csv(d / "g.csv", g(80, jax.random.key(0)))
    _write_csv(d / "other.csv", rng.normal(0, 2, (60, 4)), header=None)  # no header line
    test = g(7, jax.random.key(1))
    _write_csv(d / "test.csv", test)
    np.save(d / "test.npy", test)  # the same rows, for scoring through the Python API
    assert main(["fit", "--features", "flipad", "--bundle", str(d / "head"), "--model",
                 str(d / "g.csv"), "--other", str(d / "other.csv"), "--val-fraction", "0.25",
                 "--out", str(d / "det"), *SMALL]) == 0
    return d


def _score(d, source, out, capsys=None):
    code = main(["score", str(d / "det"), str(source), "--bundle", str(d / "head"), "--out",
                 str(out), "--quiet"])
    return code, (capsys.readouterr().err if capsys is not None else None)


@pytest.mark.slow
def test_csv_rows_are_scored_like_the_same_rows_given_to_the_detector(tabular, tmp_path):
    assert _score(tabular, tabular / "test.csv", tmp_path / "csv.jsonl")[0] == 0
    rows = [json.loads(line) for line in (tmp_path / "csv.jsonl").read_text().splitlines()]
    # line 1 is the header: rows are named by their line in the file
    assert [r["path"] for r in rows] == [f"{tabular / 'test.csv'}:{n}" for n in range(2, 9)]
    det = fj.Detector.load(tabular / "det", head=fj.Head.load(tabular / "head"), progress=False)
    np.testing.assert_allclose([r["score"] for r in rows], det.anomaly_score(np.load(tabular / "test.npy")),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_evaluate_takes_csv_sources(tabular, capsys):
    assert main(["evaluate", str(tabular / "det"), "--bundle", str(tabular / "head"),
                 "--model", str(tabular / "test.csv"), "--other",
                 f"noise={tabular / 'other.csv'}", "--quiet"]) == 0
    assert "noise" in capsys.readouterr().out


def test_csv_reader_finds_the_header_and_names_lines(tmp_path):
    lines, values = read_csv_rows(_write_csv(tmp_path / "h.csv", [[1, 2], [3, 4]], ("x", "y")))
    np.testing.assert_array_equal(lines, [2, 3])
    np.testing.assert_array_equal(values, [[1, 2], [3, 4]])
    lines, _ = read_csv_rows(_write_csv(tmp_path / "n.csv", [[1, 2], [3, 4]], None))
    np.testing.assert_array_equal(lines, [1, 2])
    refs = list_images([str(tmp_path / "n.csv")])
    assert [r.name for r in refs] == [f"{tmp_path / 'n.csv'}:1", f"{tmp_path / 'n.csv'}:2"]


@pytest.mark.parametrize("content, message", [
    ("a,b,c,d,e\n1,2,3,4,5\n", r"line 2: rows of 5 values, expected 4 \(the detector's input"),
    ("a,b,c,d\n1,2,3,4\n1,2,3\n", r"line 3: 3 cells, expected 4 \(as the header\)"),
    ("a,b,c,d\n1,2,3,4\n1,x,3,4\n", r"line 3, column 'b': 'x' is not a number"),
    ("1,2,3,4\n1,2,,4\n", r"line 2, column 'column 2': '' is not a number"),
    ("1,2,oops,4\n", r"line 1, column 'column 2': 'oops' is not a number"),
    ("a,b,c,d\n1,2,3,4", r"line 2: the file ends inside this line"),
])
def test_bad_csv_is_refused_naming_the_file_and_line(tabular, tmp_path, capsys, content,
                                                       message):
    bad = tmp_path / "bad.csv"
    bad.write_text(content)
    code, err = _score(tabular, bad, tmp_path / "s.csv", capsys)
    assert code == 1, err
    assert f"{bad}: " in err and re.search(message, err), err
    assert not (tmp_path / "s.csv").exists()


def test_evidence_reports_refuse_csv_rows(tabular, tmp_path, capsys):
    assert main(["explain", str(tabular / "det"), str(tabular / "test.csv"), "--bundle",
                 str(tabular / "head"), "--report", str(tmp_path / "ev"), "--quiet"]) == 1
    assert f"{tabular / 'test.csv'}: a .csv table: evidence reports" in capsys.readouterr().err
    assert not (tmp_path / "ev").exists()
