"""Evidence reports (`flipad explain`, `flipad score --report`) and `flipad verify`: records
validate against the shipped schema, hold hashes and values checked here independently
(hashlib over the files, the conformal p-value counted by hand, clip counts from the pixels),
and `verify` catches a one-byte change of the image, the bundle or the detector."""

import base64
import csv
import hashlib
import io
import json
import re
import shutil
from importlib.resources import files

import jax
import jsonschema
import numpy as np
import pytest
from PIL import Image

import flipad_jax as fj
from flipad_jax.cli import main
from flipad_jax.detector import Detector
from tests.test_cli_score import _conv_head_bundle, _images

SMALL = dict(training=fj.DeepSADConfig(epochs=4, batch_size=32,
                                       network_kwargs=dict(widths=(8, 8, 8), rep_dim=16)),
             fnrs=(0.05,), progress=False)
SCHEMA = json.loads(files("flipad_jax").joinpath("schemas/evidence.schema.json").read_text())


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _records(report):
    index = json.loads((report / "report.json").read_text())
    return [json.loads((report / name).read_text()) for name in index["records"]]


def _verify(report, capsys):
    code = main(["verify", str(report), "--quiet"])
    return code, capsys.readouterr().out


def _flip(path, offset=None):
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """A saved RawPAD detector of tiny 1×8×8 images, a test array and a grey PNG."""
    d = tmp_path_factory.mktemp("evidence")
    rng = np.random.default_rng(0)
    det = Detector(fj.FeatureConfig("raw", size=None), **SMALL).fit(
        _images(rng, 96, 0.5), _images(rng, 96, 0.0), _images(rng, 24, 0.5))
    det.save(d / "det")
    np.save(d / "test.npy", _images(rng, 5, 0.3))
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(d / "a.png")
    return d, Detector.load(d / "det", progress=False)


def _explain(d, report, *extra):
    return main(["explain", str(d / "det"), str(d / "test.npy"), str(d / "a.png"), "--report",
                 str(report), "--quiet", *extra])


def test_records_validate_and_hold_checkable_values(raw, tmp_path, capsys):
    d, det = raw
    report = tmp_path / "report"
    assert _explain(d, report) == 0
    records = _records(report)
    assert [r["image"]["name"] for r in records] == (
        [str(d / "a.png")] + [f"{d / 'test.npy'}[{i}]" for i in range(5)])
    x = np.concatenate([np.asarray(Image.open(d / "a.png"), np.float32)[None, None] / 255 * 2 - 1,
                        np.load(d / "test.npy")])
    scores = det.anomaly_score(x)
    val = np.asarray(det.val_scores_, np.float64)
    npy_hash = _sha(d / "test.npy")
    for i, rec in enumerate(records):
        jsonschema.validate(rec, SCHEMA)
        image = rec["image"]
        if i == 0:
            assert image["sha256"] == image["file_sha256"] == _sha(d / "a.png")
        else:
            row = np.load(d / "test.npy")[i - 1]
            assert image["sha256"] == hashlib.sha256(
                row.tobytes() + npy_hash.encode() + str(i - 1).encode()).hexdigest()
        np.testing.assert_allclose(rec["score"], scores[i], rtol=1e-6)
        assert rec["p_value"] == (1 + np.sum(val >= rec["score"])) / (len(val) + 1)
        [decision] = rec["decisions"]
        tau = det.thresholds_[0.05]
        assert decision == dict(fnr=0.05, threshold=tau, made_by_g=bool(rec["score"] <= tau),
                                realised_fnr=float(np.mean(val > tau)))
        assert rec["bundle"] is None and rec["certificate"] is None
        assert rec["detector"]["sha256"] == fj.scoring.detector_digest(d / "det")
        assert rec["detector"]["features"]["kind"] == "raw" and rec["detector"]["n_val"] == 24
        assert rec["command"][1:4] == ["explain", str(d / "det"), str(d / "test.npy")]
        assert rec["versions"]["jax"] == jax.__version__
    code, out = _verify(report, capsys)
    assert code == 0 and "6 of 6 records match" in out and "DIFFERS" not in out


def test_page_is_one_self_contained_file(raw, tmp_path):
    d, _ = raw
    assert _explain(d, tmp_path / "report") == 0
    page = (tmp_path / "report" / "index.html").read_text()
    assert not re.search(r"(href|src)=['\"](?!data:)", page)  # nothing fetched from elsewhere
    sources = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(sources) == 6 * 2  # per sample: the image and its score on the histogram
    for data in sources:
        Image.open(io.BytesIO(base64.b64decode(data))).verify()


@pytest.mark.parametrize("change", ["png", "npy", "detector_meta", "detector_arrays", "record"])
def test_verify_detects_a_one_byte_change(raw, tmp_path, capsys, change):
    src, _ = raw
    d = tmp_path / "inputs"
    shutil.copytree(src, d)
    report = tmp_path / "report"
    assert _explain(d, report) == 0
    assert _verify(report, capsys)[0] == 0
    if change == "png":
        _flip(d / "a.png")
    elif change == "npy":
        _flip(d / "test.npy", offset=len((d / "test.npy").read_bytes()) - 1)  # last row
    elif change == "detector_meta":  # a digit of the threshold: still a loadable detector
        meta = (d / "det" / "meta.json").read_text()
        tau = re.search(r'"thresholds":\s*\[\s*\[\s*0\.05,\s*(-?\d+\.\d{3})', meta)
        digit = tau.end(1) - 1
        meta = meta[:digit] + str((int(meta[digit]) + 1) % 10) + meta[digit + 1:]
        (d / "det" / "meta.json").write_text(meta)
    elif change == "detector_arrays":
        _flip(max((p for p in (d / "det" / "arrays").rglob("*") if p.is_file()),
                  key=lambda p: p.stat().st_size))
    else:  # the record itself: a verdict turned round
        path = report / "samples" / "000001.json"
        rec = json.loads(path.read_text())
        rec["decisions"][0]["made_by_g"] = not rec["decisions"][0]["made_by_g"]
        path.write_text(json.dumps(rec))
    code, out = _verify(report, capsys)
    assert code == 1 and "records match" in out
    if change == "png":
        assert f"DIFFERS  {d / 'a.png'}\n" in out and "image.sha256: recorded" in out
        assert out.count("DIFFERS") == 1
    elif change == "npy":  # every row's hash covers its file's hash; the flipped exponent bit
        # takes the last row's last value out of [-1, 1], so that row is refused, not rescored
        assert out.count("DIFFERS") == 5 and "image.file_sha256" in out
        assert f"cannot recompute: {d / 'test.npy'}[4]: float values span" in out
    elif change == "record":
        assert out.count("DIFFERS") == 1 and f"DIFFERS  {d / 'test.npy'}[0]\n" in out
        assert "decisions.0.made_by_g: recorded" in out
    else:
        assert out.count("DIFFERS") == 6 and out.count("detector.sha256: recorded") == 6
        if change == "detector_meta":
            assert out.count("decisions.0.threshold: recorded") == 6


@pytest.mark.slow
def test_flipad_record_carries_the_lasso_certificate(tmp_path, capsys):
    bundle = _conv_head_bundle(tmp_path / "head", 0)
    head = fj.Head.load(bundle)
    key = jax.random.split(jax.random.key(0), 3)
    g = lambda k, n: np.asarray(head.forward(jax.nn.relu(jax.random.normal(k, (n, 5, 4, 4)))))
    noise = np.tanh(0.6 * np.asarray(jax.random.normal(key[2], (60, 3, 8, 8)), np.float32))
    settings = dict(SMALL, training=SMALL["training"].replace(
        network_kwargs=dict(widths=(8, 8), rep_dim=16)))
    det = Detector(fj.FeatureConfig("flipad", lasso=fj.LassoOptions(max_iter=200)), head=head,
                   **settings).fit(g(key[0], 60), noise, g(key[1], 20))
    det.save(tmp_path / "det")
    # 8-bit pixels: 0 and 255 decode to ∓1 exactly, which the target's clip must move
    pixels = np.random.default_rng(1).integers(0, 256, (2, 3, 8, 8), dtype=np.uint8)
    pixels[0, :, :2] = 255
    np.save(tmp_path / "x.npy", pixels)
    report = tmp_path / "report"
    assert main(["explain", str(tmp_path / "det"), str(tmp_path / "x.npy"), "--bundle",
                 str(bundle), "--report", str(report), "--quiet"]) == 0
    records = _records(report)
    x = pixels.astype(np.float32) / 255 * 2 - 1
    reference = head.invert(x, det.feature_config.lam, options=det.feature_config.lasso)
    for i, rec in enumerate(records):
        jsonschema.validate(rec, SCHEMA)
        cert = rec["certificate"]
        assert cert["clipped"] == int(np.sum((pixels[i] == 0) | (pixels[i] == 255))) > 0
        assert cert["status"] == fj.Status(int(reference.status[i])).name
        assert cert["iterations"] == int(reference.iterations[i])
        np.testing.assert_allclose([cert["objective"], cert["gap"]],
                                   [reference.objective[i], reference.gap[i]], rtol=1e-5)
        assert 0 <= cert["gap"] and cert["lam"] == det.feature_config.lam
        assert rec["bundle"] == dict(path=str(bundle.absolute()),
                                     weights_sha256=_sha(bundle / "head.safetensors"),
                                     meta_sha256=_sha(bundle / "head.json"),
                                     source=head.meta["source"])
    page = (report / "index.html").read_text()
    assert page.count("src='data:image/png") == 2 * 3  # image, histogram, features beside z̄
    assert _verify(report, capsys)[0] == 0
    _flip(bundle / "head.safetensors", offset=len((bundle / "head.safetensors").read_bytes()) - 1)
    code, out = _verify(report, capsys)
    assert code == 1 and out.count("bundle.weights_sha256: recorded") == 2
    assert "cannot recompute" in out and "fingerprint" in out


def test_score_report_agrees_with_the_scores(raw, tmp_path, capsys):
    d, _ = raw
    out, report = tmp_path / "s.csv", tmp_path / "report"
    assert main(["score", str(d / "det"), str(d / "test.npy"), "--out", str(out), "--report",
                 str(report), "--batch-size", "2", "--quiet"]) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    records = _records(report)
    assert [r["image"]["name"] for r in records] == [row["path"] for row in rows]
    for row, rec in zip(rows, records):
        assert float(row["score"]) == pytest.approx(rec["score"], rel=1e-6)
        assert float(row["p_value"]) == rec["p_value"]
        assert (row["g_at_fnr_0.05"] == "true") == rec["decisions"][0]["made_by_g"]
        assert rec["input"]["batch_size"] == 2
    assert _verify(report, capsys)[0] == 0


def test_an_existing_report_folder_is_refused_untouched(raw, tmp_path, capsys):
    d, _ = raw
    report = tmp_path / "report"
    report.mkdir()
    (report / "keep.txt").write_text("mine")
    assert _explain(d, report) == 1
    assert f"out={str(report)!r} already exists" in capsys.readouterr().err
    out = tmp_path / "s.csv"
    assert main(["score", str(d / "det"), str(d / "test.npy"), "--out", str(out), "--report",
                 str(report), "--quiet"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "s.csv.partial").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no half-written folder
    assert [p.name for p in report.iterdir()] == ["keep.txt"]
    assert main(["verify", str(tmp_path / "report")]) == 1
    assert "no report.json" in capsys.readouterr().err


def test_a_refused_input_leaves_no_report(raw, tmp_path, capsys):
    d, _ = raw
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "rgb.png")
    report = tmp_path / "report"
    assert main(["explain", str(d / "det"), str(d / "test.npy"), str(tmp_path / "rgb.png"),
                 "--report", str(report), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert (f"{tmp_path / 'rgb.png'}: image of shape (C, H, W) = (3, 8, 8), "
            "expected (1, 8, 8)") in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rgb.png"]


@pytest.mark.slow
def test_sm_f_report_with_negative_scores_verifies(tmp_path, capsys):
    rng = np.random.default_rng(2)
    images = lambda n, mean: np.tanh(rng.normal(mean, 0.5, (n, 1, 16, 16))).astype(np.float32)
    x_model = images(40, 0.5)
    Detector("sm_f", fnrs=(0.05,), progress=False).fit(
        x_model, images(4, 0.0), images(24, 0.5)).save(tmp_path / "det")
    # G's own training images share its fingerprint: negative scores
    np.save(tmp_path / "x.npy", np.concatenate([x_model[:2], images(2, 0.0)]))
    report = tmp_path / "report"
    assert main(["explain", str(tmp_path / "det"), str(tmp_path / "x.npy"), "--report",
                 str(report), "--quiet"]) == 0
    records = _records(report)
    for rec in records:
        jsonschema.validate(rec, SCHEMA)
        assert rec["detector"]["kind"] == "sm_f" and rec["certificate"] is None
    assert min(r["score"] for r in records) < 0  # −⟨f_G, r̂(x)⟩: drawn on a linear axis
    assert _verify(report, capsys)[0] == 0
