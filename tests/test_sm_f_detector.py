"""SM-F as a Detector kind (fit / score / predict / save / load, and through the CLI), and
perturbed inputs (--perturb) in fit, score and evaluate."""

import json

import numpy as np
import pytest

import flipad_jax as fj
from flipad_jax.cli import main
from flipad_jax.images import list_images, read_images
from flipad_jax.perturbations import Perturbation, perturb


def _fingerprinted(rng, n, pattern=None):
    """Smooth random content (4×4 blocks upsampled to 32×32) plus, for G, a fixed
    high-frequency pattern of ±4 grey levels: G's 'sensor noise'. 8-bit, (n, 1, 32, 32)."""
    content = np.kron(rng.uniform(40, 215, (n, 1, 4, 4)), np.ones((1, 1, 8, 8)))
    content += rng.normal(0, 2.0, content.shape)
    if pattern is not None:
        content += pattern
    return np.clip(np.round(content), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    pattern = 4.0 * np.sign(rng.normal(size=(1, 1, 32, 32)))
    g = _fingerprinted(rng, 360, pattern)
    real = _fingerprinted(rng, 160)
    return dict(model=g[:100], val=g[100:300], test_model=g[300:], other=real[:100],
                test_other=real[100:])


def _to_float(pixels):
    return (pixels.astype(np.float32) / 127.5 - 1.0).astype(np.float32)


@pytest.mark.slow
def test_sm_f_detector_finds_the_fingerprint_and_round_trips(data, tmp_path):
    det = fj.Detector("sm_f", fnrs=(0.005, 0.05), progress=False)
    det.fit(*(_to_float(data[k]) for k in ("model", "other", "val")))
    assert det.feature_shape_ == (32, 32) and det.network_ is None
    s_model, s_other = det.anomaly_score(_to_float(data["test_model"])), det.anomaly_score(
        _to_float(data["test_other"]))
    assert fj.metrics.roc_auc(s_model, s_other) > 0.95
    assert det.made_by_g(_to_float(data["test_other"]), fnr=0.05).mean() < 0.2
    det.save(tmp_path / "det")
    back = fj.Detector.load(tmp_path / "det")
    np.testing.assert_array_equal(back.anomaly_score(_to_float(data["test_model"])), s_model)
    assert back.thresholds_ == det.thresholds_


def test_sm_f_refuses_standardisation_and_top_k():
    with pytest.raises(ValueError, match="SM-F normalises residuals"):
        fj.FeatureConfig("sm_f", top_k=3)
    with pytest.raises(ValueError, match="SM-F normalises residuals"):
        fj.FeatureConfig("sm_f", standardize="all")


def test_read_images_perturbs_the_pixels_before_decoding(tmp_path):
    x = np.random.default_rng(1).integers(0, 256, (5, 1, 32, 32), dtype=np.uint8)
    np.save(tmp_path / "x.npy", x)
    refs = list_images(tmp_path / "x.npy")
    blur = Perturbation.parse("blur=3")
    np.testing.assert_array_equal(read_images(refs, perturbation=blur),
                                  _to_float(perturb(x, blur)))
    noise = Perturbation.parse("noise=0.1")
    whole = read_images(refs, perturbation=noise, seed=3)
    # each image's noise depends on the seed and its name only, not on the batch it is read in
    np.testing.assert_array_equal(np.concatenate([read_images(refs[:2], perturbation=noise,
                                                              seed=3),
                                                  read_images(refs[2:], perturbation=noise,
                                                              seed=3)]), whole)
    assert not np.array_equal(read_images(refs, perturbation=noise, seed=4), whole)
    np.save(tmp_path / "f.npy", _to_float(x))
    with pytest.raises(ValueError, match=r"f\.npy\[0\]: holds float32 pixels, expected 8-bit"):
        read_images(list_images(tmp_path / "f.npy"), perturbation=blur)


@pytest.mark.slow
def test_cli_fits_and_scores_sm_f_under_a_perturbation(data, tmp_path, capsys):
    for name in ("model", "other", "val", "test_model", "test_other"):
        np.save(tmp_path / f"{name}.npy", data[name])
    det = tmp_path / "det"
    assert main(["fit", "--features", "sm_f", "--model", str(tmp_path / "model.npy"),
                 "--other", str(tmp_path / "other.npy"), "--val", str(tmp_path / "val.npy"),
                 "--perturb", "jpeg=90", "--out", str(det), "--quiet"]) == 0
    out = tmp_path / "s.jsonl"
    base = ["score", str(det), str(tmp_path / "test_model.npy"), "--quiet"]
    assert main(base + ["--out", str(out), "--perturb", "noise=0.05"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 60
    assert main(base + ["--out", str(tmp_path / "t.jsonl"), "--perturb", "noise=0.05"]) == 0
    assert (tmp_path / "t.jsonl").read_text() == out.read_text()  # seeded: reproducible
    assert main(base + ["--out", str(tmp_path / "u.jsonl")]) == 0
    assert (tmp_path / "u.jsonl").read_text() != out.read_text()  # the perturbation acted
    report = tmp_path / "report"
    assert main(["evaluate", str(det), "--model", str(tmp_path / "test_model.npy"), "--other",
                 f"real={tmp_path / 'test_other.npy'}", "--perturb", "jpeg=90", "--out",
                 str(report), "--quiet"]) == 0
    records = json.loads((report / "records.json").read_text())
    assert records["method"] == "SM-F" and records["perturb"] == "jpeg=90"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--features", "sm_f", "--model", str(tmp_path / "model.npy"), "--other",
              str(tmp_path / "other.npy"), "--perturb", "crop=70", "--out", str(tmp_path / "d")])
    assert exit_.value.code == 2 and "crop=70" in capsys.readouterr().err
