"""`flipad fit`, `flipad score` and `flipad evaluate`: streaming, resumable, atomic scoring; bad
input refused naming the file; fit → score → evaluate end to end. Tiny 1×8×8 images and a RawPAD
detector fitted once per module (DeepSAD settings like test_detector.SMALL)."""

import csv
import errno
import json
import os
import signal
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from flipad_jax import _partial, metrics
from flipad_jax.bundle import Bundle, write_bundle
from flipad_jax.cli import main
from flipad_jax.detector import Detector
from flipad_jax.detector_io import HeadMismatchError
from tests.test_head_bundle import _meta

TINY = ["--fnr", "0.05", "--epochs", "4", "--batch-size", "32", "--network-opt",
        "widths=[8,8,8]", "--network-opt", "rep_dim=16", "--quiet"]


def _images(rng, n, mean):
    return np.tanh(rng.normal(mean, 0.5, (n, 1, 8, 8))).astype(np.float32)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Arrays of G's (mean 0.5) and other (mean 0) tiny images, and two RawPAD detectors
    fitted through `flipad fit` (seeds 0 and 1)."""
    d = tmp_path_factory.mktemp("score")
    rng = np.random.default_rng(0)
    arrays = dict(model=_images(rng, 96, 0.5), other=_images(rng, 96, 0.0),
                  test_model=_images(rng, 40, 0.5), test_other=_images(rng, 30, 0.0),
                  other2=_images(rng, 30, 0.25))
    for name, x in arrays.items():
        np.save(d / f"{name}.npy", x)
    for seed in (0, 1):
        assert main(["fit", "--features", "raw", "--size", "none", "--model",
                     str(d / "model.npy"), "--other", str(d / "other.npy"), "--val-fraction",
                     "0.25", "--seed", str(seed), "--out", str(d / f"det{seed}"), *TINY]) == 0
    return d, arrays, Detector.load(d / "det0", progress=False)


def _score(det, *inputs, out, extra=()):
    return main(["score", str(det), *map(str, inputs), "--out", str(out), "--quiet", *extra])


def _csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _error(capsys):
    err = capsys.readouterr().err
    assert "error:" in err
    return err


# -- kill and resume -----------------------------------------------------------------------------

@pytest.mark.slow
def test_kill_half_way_then_resume_scores_every_input_once(setup, tmp_path):
    n_rows = 2000  # 200 batches of 10, each flushed and synced: enough to be killed in the middle
    d, _, det = setup
    x = _images(np.random.default_rng(1), n_rows, 0.25)
    np.save(tmp_path / "big.npy", x)
    out = tmp_path / "scores.csv"
    partial = tmp_path / "scores.csv.partial"
    cmd = [sys.executable, "-m", "flipad_jax.cli", "score", str(d / "det0"),
           str(tmp_path / "big.npy"), "--out", str(out), "--batch-size", "10", "--quiet"]
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=log)
    deadline, lines = time.time() + 300, 0
    try:
        while proc.poll() is None and time.time() < deadline:
            if partial.exists():
                lines = partial.read_bytes().count(b"\n")
                assert not out.exists()
                if lines > n_rows // 3:
                    proc.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.005)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "log").read_text()[-2000:]
    assert n_rows // 3 < lines < n_rows + 1 and partial.exists() and not out.exists()

    assert _score(d / "det0", tmp_path / "big.npy", out=out, extra=["--batch-size", "10"]) == 0
    assert out.exists() and not partial.exists()
    assert not (tmp_path / "scores.csv.partial.json").exists()
    rows = _csv_rows(out)
    assert rows[0] == ["path", "score", "p_value", "g_at_fnr_0.05"] and len(rows) == n_rows + 1
    names = [r[0] for r in rows[1:]]
    assert names == [f"{tmp_path / 'big.npy'}[{i}]" for i in range(n_rows)]  # each once, in order
    scores = np.array([float(r[1]) for r in rows[1:]])
    np.testing.assert_allclose(scores, det.anomaly_score(x), rtol=0, atol=1e-6)
    tau = det.thresholds_[0.05]
    assert [r[3] for r in rows[1:]] == ["true" if s <= tau else "false" for s in scores]
    # the same bytes as one uninterrupted run with the same batches (other batch sizes may
    # round differently, within 1e-6)
    assert _score(d / "det0", tmp_path / "big.npy", out=tmp_path / "once.csv",
                  extra=["--batch-size", "10"]) == 0
    assert out.read_bytes() == (tmp_path / "once.csv").read_bytes()


class _FailAfter:
    """A stand-in for _partial._write_all that raises OSError(errno) after ``n`` good writes."""

    def __init__(self, n, code=errno.ENOSPC):
        self.n, self.code, self.real = n, code, _partial._write_all

    def __call__(self, fd, data):
        if self.n == 0:
            self.real(fd, data[:len(data) // 2])  # half a batch reaches the disk
            raise OSError(self.code, os.strerror(self.code))
        self.n -= 1
        self.real(fd, data)


def test_full_disk_keeps_the_partial_for_resume(setup, tmp_path, monkeypatch, capsys):
    d, arrays, det = setup
    out = tmp_path / "s.jsonl"
    monkeypatch.setattr(_partial, "_write_all", _FailAfter(2))  # the 3rd batch fails
    assert _score(d / "det0", d / "test_model.npy", out=out, extra=["--batch-size", "8"]) == 1
    err = _error(capsys)
    assert f"writing {out}.partial failed (the disk is full)" in err and "resume" in err
    assert not out.exists()
    kept = (tmp_path / "s.jsonl.partial").read_text().splitlines()
    assert len(kept) == 16  # two whole batches; the half-written third was dropped
    monkeypatch.undo()
    assert _score(d / "det0", d / "test_model.npy", out=out, extra=["--batch-size", "8"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in rows] == [f"{d / 'test_model.npy'}[{i}]" for i in range(40)]
    np.testing.assert_allclose([r["score"] for r in rows], det.anomaly_score(arrays["test_model"]),
                               atol=1e-6, rtol=0)
    assert all(set(r["verdict"]) == {"0.05"} for r in rows)
    assert f"{len(kept)} of them resumed" in capsys.readouterr().out


def test_resume_refuses_another_detector_and_a_finished_output(setup, tmp_path, monkeypatch,
                                                               capsys):
    d, _, _ = setup
    out = tmp_path / "s.csv"
    monkeypatch.setattr(_partial, "_write_all", _FailAfter(1, errno.EIO))
    assert _score(d / "det0", d / "test_model.npy", out=out, extra=["--batch-size", "8"]) == 1
    assert "Input/output error" in _error(capsys)
    monkeypatch.undo()
    assert _score(d / "det1", d / "test_model.npy", out=out) == 1
    err = _error(capsys)
    assert "was started with another detector" in err and str(d / "det1") in err
    assert _score(d / "det0", d / "test_other.npy", out=out) == 1
    assert "another input list (40 inputs then, 30 now)" in _error(capsys)
    assert _score(d / "det0", d / "test_model.npy", out=out, extra=["--shard", "0/2"]) == 1
    assert "another input list" in _error(capsys)
    assert not out.exists()
    # the right detector resumes; then the finished OUT is refused without --overwrite
    assert _score(d / "det0", d / "test_model.npy", out=out) == 0
    first = out.read_bytes()
    assert _score(d / "det0", d / "test_model.npy", out=out) == 1
    assert f"out={str(out)!r} already exists" in _error(capsys)
    assert _score(d / "det1", d / "test_model.npy", out=out, extra=["--overwrite"]) == 0
    assert out.read_bytes() != first and not (tmp_path / "s.csv.partial").exists()


def test_truncated_trailing_line_is_dropped_and_rescored(setup, tmp_path, monkeypatch):
    d, _, _ = setup
    full = tmp_path / "full.csv"
    assert _score(d / "det0", d / "test_other.npy", out=full) == 0
    out, partial = tmp_path / "s.csv", tmp_path / "s.csv.partial"
    monkeypatch.setattr(_partial, "_write_all", _FailAfter(3))  # header + 2 batches of 8
    assert _score(d / "det0", d / "test_other.npy", out=out, extra=["--batch-size", "8"]) == 1
    monkeypatch.undo()
    lines = full.read_text().splitlines(keepends=True)
    assert partial.read_text() == "".join(lines[:17])
    with open(partial, "a") as f:  # as a kill in the middle of a write leaves it
        f.write(lines[17][:9])
    assert _score(d / "det0", d / "test_other.npy", out=out, extra=["--batch-size", "5"]) == 0
    assert out.read_text() == full.read_text() and not partial.exists()


# -- bad input -----------------------------------------------------------------------------------

def test_bad_images_are_refused_naming_the_file(setup, tmp_path, capsys):
    d, _, det = setup
    folder = tmp_path / "pngs"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "s.csv"
    assert _score(d / "det0", folder, out=out) == 0  # grey 8-bit PNGs map to [-1, 1]
    rows = _csv_rows(out)
    assert [r[0] for r in rows[1:]] == [str(folder / f"{i}.png") for i in range(3)]
    pixels = np.stack([np.asarray(Image.open(folder / f"{i}.png")) for i in range(3)])[:, None]
    np.testing.assert_allclose([float(r[1]) for r in rows[1:]],
                               det.anomaly_score(pixels / 255.0 * 2 - 1), atol=1e-6)
    out.unlink()

    cases = {
        "truncated": lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n truncated"),
        "wrong size": lambda p: Image.fromarray(np.zeros((16, 16), np.uint8)).save(p),
        "mixed channels": lambda p: Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(p),
    }
    expected = {"truncated": "unreadable or truncated", "wrong size": r"(1, 16, 16), expected "
                "(1, 8, 8) (the detector's input shape)", "mixed channels": "(3, 8, 8)"}
    for name, make in cases.items():
        make(folder / "1.png")
        for extra in ([], ["--batch-size", "1"]):
            assert _score(d / "det0", folder, out=out, extra=extra) == 1, name
            err = _error(capsys)
            assert f"{folder / '1.png'}: " in err and expected[name] in err, err
            assert not out.exists()
            for leftover in tmp_path.glob("s.csv.partial*"):
                leftover.unlink()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _score(d / "det0", empty, out=out) == 1
    assert f"{empty}: no images" in _error(capsys)
    pattern = str(tmp_path / "nothing" / "*.png")
    assert _score(d / "det0", pattern, out=out) == 1
    assert f"{pattern}: the glob pattern matches no images" in _error(capsys)
    bad = np.zeros((4, 1, 8, 8), np.float32)
    bad[2, 0, 3, 3] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    assert _score(d / "det0", tmp_path / "nan.npy", out=out) == 1
    assert f"{tmp_path / 'nan.npy'}[2]: holds NaN/inf" in _error(capsys)
    assert _score(d / "det0", d / "test_model.npy", out=tmp_path / "s.txt") == 1
    assert "expected .csv or .jsonl" in _error(capsys)
    assert _score(d / "det0", d / "test_model.npy", out=out, extra=["--shard", "2/2"]) == 1
    assert "--shard '2/2': expected K/N with 0 <= K < N" in _error(capsys)
    assert not out.exists() and not (tmp_path / "s.txt").exists()


def test_exit_status_tells_usage_errors_refusals_and_bugs_apart(capsys, monkeypatch):
    with pytest.raises(SystemExit) as info:
        main(["score", "det"])
    assert info.value.code == 2  # argparse's convention for usage errors
    assert "flipad score: error: the following arguments are required" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("flipad-jax ")
    from flipad_jax import scoring

    def broken(*args, **kwargs):
        raise KeyError("boom")

    monkeypatch.setattr(scoring, "parse_shard", broken)
    assert main(["score", "det", "x.npy", "--out", "s.csv"]) == 3
    assert "internal error (a bug" in capsys.readouterr().err
    assert main(["--verbose", "score", "det", "x.npy", "--out", "s.csv"]) == 3
    assert "Traceback" in capsys.readouterr().err


def _conv_head_bundle(path, seed):
    """A tiny ConvTranspose2d head bundle, 5×4×4 → 3×8×8 with tanh (as test_head_bundle's)."""
    rng = np.random.default_rng(seed)
    meta = _meta("conv_transpose2d", (5, 4, 4), (3, 8, 8), "tanh", False, stride=[2, 2],
                 padding=[1, 1], dilation=[1, 1], groups=1, output_padding=[0, 0])
    import flipad_jax as fj

    weight = (0.3 * rng.normal(size=(5, 3, 4, 4))).astype(np.float32)
    meta["lipschitz"] = float(fj.ConvTranspose2d(weight, stride=2, padding=1,
                                                 in_size=(4, 4)).lipschitz())
    write_bundle(path, Bundle(meta, weight, None, np.full((5, 4, 4), 0.4, np.float32)))
    return path


@pytest.mark.slow
def test_flipad_detector_needs_its_own_head(tmp_path, capsys):
    import flipad_jax as fj

    bundle = _conv_head_bundle(tmp_path / "head", 0)
    other_bundle = _conv_head_bundle(tmp_path / "head2", 1)
    head = fj.Head.load(bundle)
    z = jax.nn.relu(jax.random.normal(jax.random.key(0), (60, 5, 4, 4)))
    np.save(tmp_path / "g.npy", np.asarray(head.forward(z)))
    np.save(tmp_path / "noise.npy",
            np.asarray(jnp.tanh(0.6 * jax.random.normal(jax.random.key(1), (40, 3, 8, 8)))))
    det = tmp_path / "det"
    fit = ["fit", "--features", "flipad", "--model", str(tmp_path / "g.npy"), "--other",
           str(tmp_path / "noise.npy"), "--val-fraction", "0.34", "--max-iter", "100",
           "--out", str(det), *TINY, "--network-opt", "widths=[8,8]"]  # 4x4 features
    assert main(fit) == 1
    assert "--features flipad: expected --bundle DIR" in _error(capsys)
    assert main(fit + ["--bundle", str(bundle)]) == 0
    out = tmp_path / "s.jsonl"
    assert _score(det, tmp_path / "noise.npy", out=out, extra=["--bundle", str(bundle)]) == 0
    loaded = Detector.load(det, head=head)
    noise = np.load(tmp_path / "noise.npy")
    np.testing.assert_allclose([json.loads(l)["score"] for l in out.read_text().splitlines()],
                               loaded.anomaly_score(noise), atol=1e-6, rtol=0)
    out.unlink()
    assert _score(det, tmp_path / "noise.npy", out=out, extra=["--bundle", str(other_bundle)]) == 1
    err = _error(capsys)
    assert f"--bundle {other_bundle} does not belong to the detector {det}" in err
    assert "fingerprint" in err
    # one folder is enough: the detector carries its head bundle and checks it on load
    assert (det / "head" / "head.json").is_file()
    assert _score(det, tmp_path / "noise.npy", out=out) == 0
    np.testing.assert_allclose([json.loads(l)["score"] for l in out.read_text().splitlines()],
                               loaded.anomaly_score(noise), atol=1e-6, rtol=0)
    np.testing.assert_array_equal(Detector.load(det).anomaly_score(noise),
                                  loaded.anomaly_score(noise))
    out.unlink()
    # a changed embedded z̄ (weights and ‖A‖² untouched) fails the fingerprint check
    from flipad_jax.bundle import read_bundle
    embedded = read_bundle(det / "head")
    shutil.rmtree(det / "head")
    write_bundle(det / "head", embedded._replace(zbar=embedded.zbar + 0.01))
    with pytest.raises(HeadMismatchError, match="fingerprint"):
        Detector.load(det)
    shutil.rmtree(det / "head")
    assert _score(det, tmp_path / "noise.npy", out=out) == 1
    err = _error(capsys)
    assert f"{det}: a FLIPAD detector" in err and "expected --bundle DIR" in err
    assert "it carries none" in err
    assert not out.exists() and not (tmp_path / "s.jsonl.partial").exists()


# -- fit → score → evaluate ----------------------------------------------------------------------

def test_fit_checks_validation_size_naming_the_source(setup, tmp_path, capsys):
    d, _, _ = setup
    base = ["fit", "--features", "raw", "--model", str(d / "test_model.npy"), "--other",
            str(d / "other.npy"), "--out", str(tmp_path / "det"), "--quiet"]
    assert main(base) == 1  # 10% of 40 is 4 validation images; fnr 0.005 needs 200
    err = _error(capsys)
    assert f"--model {d / 'test_model.npy'}: 40 images" in err and "at least 200" in err
    val = ["--val", str(d / "other2.npy")]
    assert main(base + val) == 1
    assert f"--val {d / 'other2.npy'}: 30 images, expected at least 200" in _error(capsys)
    np.save(tmp_path / "big.npy", np.zeros((30, 1, 16, 16), np.float32))
    assert main(base + val + ["--other", str(tmp_path / "big.npy"), "--fnr", "0.05"]) == 1
    assert f"{tmp_path / 'big.npy'}: image of shape (C, H, W) = (1, 16, 16), expected (1, 8, 8)" \
        in _error(capsys)
    assert not (tmp_path / "det").exists()


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_score_shards_and_evaluate_end_to_end(setup, tmp_path, suffix, capsys):
    d, arrays, det = setup
    inputs = [d / "test_model.npy", d / "test_other.npy"]
    whole = tmp_path / f"all{suffix}"
    assert _score(d / "det0", *inputs, out=whole, extra=["--batch-size", "16"]) == 0
    text = whole.read_text()
    if suffix == ".csv":
        rows = _csv_rows(whole)[1:]
        got = {r[0]: (float(r[1]), r[3] == "true") for r in rows}
    else:
        rows = [json.loads(line) for line in text.splitlines()]
        got = {r["path"]: (r["score"], r["verdict"]["0.05"]) for r in rows}
    assert len(rows) == 70 and len(got) == 70
    x = np.concatenate([arrays["test_model"], arrays["test_other"]])
    names = [f"{inputs[0]}[{i}]" for i in range(40)] + [f"{inputs[1]}[{i}]" for i in range(30)]
    scores = det.anomaly_score(x)
    np.testing.assert_allclose([got[n][0] for n in names], scores, atol=1e-6, rtol=0)
    assert [got[n][1] for n in names] == list(scores <= det.thresholds_[0.05])
    # three shards, concatenated (CSV: one header), give the same file
    parts = []
    for k in range(3):
        part = tmp_path / f"part{k}{suffix}"
        assert _score(d / "det0", *reversed(inputs), out=part, extra=["--shard", f"{k}/3"]) == 0
        lines = part.read_text().splitlines(keepends=True)
        assert 23 <= len(lines) - (suffix == ".csv") <= 24
        parts += lines[1:] if suffix == ".csv" and k else lines
    assert "".join(parts) == text

    report = tmp_path / "report"
    argv = ["evaluate", str(d / "det0"), "--model", str(inputs[0]), "--other",
            f"real={inputs[1]}", "--other", f"g2={d / 'other2.npy'}", "--model-name", "tiny",
            "--out", str(report), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| RawPAD |" in printed and "tiny vs real" in printed and "AUC" in printed
    rec = json.loads((report / "records.json").read_text())
    assert (report / "table.md").read_text().strip() in printed
    s_model, s_real = scores[:40], scores[40:]
    by_other = {r["other"]: r for r in rec["records"]}
    assert by_other["real"]["auc"] == pytest.approx(metrics.roc_auc(s_model, s_real), abs=1e-6)
    assert by_other["real"]["acc@fnr=0.05"] == pytest.approx(
        metrics.accuracy(s_model, s_real, det.thresholds_[0.05]), abs=1e-6)
    assert rec["counts"] == {"tiny": 40, "real": 30, "g2": 30}
    assert main(argv) == 1
    assert f"out={str(report)!r} already exists" in _error(capsys)
    assert main(argv + ["--other", "real=x"]) == 1
    assert "--other real=...: given twice" in _error(capsys)
