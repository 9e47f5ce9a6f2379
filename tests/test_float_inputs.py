"""Float images outside the detector's image range are refused, not silently clipped, unless
their scale is given (``x_range`` / ``--x-range LO,HI``) or clipping is asked for (``clip`` /
``--clip``). Independent truth: 0-255 floats are an affine image of the same [-1, 1] images, so
with ``--x-range 0,255`` every feature, inversion and score equals the [-1, 1] one."""

import json

import numpy as np
import pytest

from flipad_jax.cli import main
from flipad_jax.detector import Detector
from flipad_jax.features import dct_features, raw_features, residual_features
from flipad_jax.images import floats_to_range
from tests.test_cli_score import TINY, _conv_head_bundle, _images

FEATURES = [(raw_features, {}), (dct_features, dict(crop=4)), (residual_features, {})]


def _to_255(x):
    """[-1, 1] images on the 0-255 scale (float32), as a user's arrays might come."""
    return ((np.asarray(x, np.float64) + 1.0) * 127.5).astype(np.float32)


@pytest.mark.parametrize("extract, kwargs", FEATURES)
def test_features_refuse_out_of_range_floats_unless_the_scale_is_given(extract, kwargs):
    x = np.random.default_rng(0).uniform(-1, 1, (3, 3, 8, 8)).astype(np.float32)
    with pytest.raises(ValueError, match=r"images: float values span \[[0-9.]+, 25[0-9.]*\], "
                                         r"expected \[-1, 1\]: pass x_range"):
        extract(_to_255(x), **kwargs)
    expected = np.asarray(extract(x, **kwargs))
    np.testing.assert_allclose(extract(_to_255(x), x_range=(0, 255), **kwargs), expected,
                               rtol=1e-4, atol=1e-4)
    wide = x * 1.5
    np.testing.assert_array_equal(extract(wide, clip=True, **kwargs),
                                  extract(np.clip(wide, -1, 1), **kwargs))


def test_values_outside_the_given_scale_are_refused_too():
    with pytest.raises(ValueError, match=r"x: float values span \[0, 300\], expected \[0, 255\] "
                                         r"\(x_range, mapped onto \(-1.0, 1.0\)\)"):
        floats_to_range(np.array([0.0, 300.0]), x_range=(0, 255))
    with pytest.raises(ValueError, match=r"x_range=\(3.0, 3.0\): expected \(low, high\)"):
        floats_to_range(np.zeros(2), x_range=(3.0, 3.0))
    with pytest.raises(ValueError, match="no bounded range"):
        floats_to_range(np.zeros(2), None, clip=True)
    # the affine map sends the ends and the middle of the scale to those of the range
    np.testing.assert_array_equal(floats_to_range(np.array([0.0, 127.5, 255.0]), (0.0, 1.0),
                                                  x_range=(0, 255)), [0.0, 0.5, 1.0])


def test_integer_pixels_keep_their_refusal():
    with pytest.raises(ValueError, match="dtype uint8: expected floating images"):
        raw_features(np.zeros((1, 1, 8, 8), np.uint8))


# -- the command line ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rawpad(tmp_path_factory):
    """A tiny RawPAD detector fitted through `flipad fit` and test images on three scales."""
    d = tmp_path_factory.mktemp("float_inputs")
    rng = np.random.default_rng(0)
    for name, x in dict(model=_images(rng, 64, 0.5), other=_images(rng, 64, 0.0)).items():
        np.save(d / f"{name}.npy", x)
        np.save(d / f"{name}255.npy", _to_255(x))
    x = _images(rng, 12, 0.25)
    pixels = np.round(_to_255(x)).astype(np.uint8)
    for name, arr in dict(x=x, x255=_to_255(x), wide=1.5 * x, pixels=pixels,
                          pixels_f=(pixels / 127.5 - 1).astype(np.float32)).items():
        np.save(d / f"{name}.npy", arr)
    assert main(["fit", "--features", "raw", "--size", "none", "--model", str(d / "model.npy"),
                 "--other", str(d / "other.npy"), "--val-fraction", "0.34", "--out",
                 str(d / "det"), *TINY]) == 0
    return d


@pytest.mark.slow
def test_fit_with_x_range_fits_the_same_detector_and_says_so(rawpad, capsys):
    fit = ["fit", "--features", "raw", "--size", "none", "--model", str(rawpad / "model255.npy"),
           "--other", str(rawpad / "other255.npy"), "--val-fraction", "0.34", *TINY]
    capsys.readouterr()
    assert main(fit + ["--out", str(rawpad / "refused")]) == 1
    assert "model255.npy[0..63]: float values span" in capsys.readouterr().err
    assert main(fit + ["--out", str(rawpad / "det255"), "--x-range", "0,255"]) == 0
    assert "float inputs mapped from [0, 255]" in capsys.readouterr().out
    x = np.load(rawpad / "x.npy")
    scores = [Detector.load(rawpad / name, progress=False).anomaly_score(x) for name in ("det", "det255")]
    np.testing.assert_allclose(scores[1], scores[0], rtol=1e-4, atol=1e-6)


def _scores(d, name, out, extra=()):
    code = main(["score", str(d / "det"), str(d / f"{name}.npy"), "--out", str(out), "--quiet",
                 *extra])
    return code, ([json.loads(line)["score"] for line in out.read_text().splitlines()]
                  if code == 0 else None)


def test_score_refuses_0_255_floats_and_maps_them_with_x_range(rawpad, tmp_path, capsys):
    _, expected = _scores(rawpad, "x", tmp_path / "x.jsonl")
    code, _ = _scores(rawpad, "x255", tmp_path / "refused.jsonl")
    err = capsys.readouterr().err
    assert code == 1 and f"{rawpad / 'x255.npy'}[0..11]: float values span" in err
    assert "expected [-1, 1]" in err and "--x-range" in err
    assert not (tmp_path / "refused.jsonl").exists()
    _, mapped = _scores(rawpad, "x255", tmp_path / "mapped.jsonl", ["--x-range", "0,255"])
    np.testing.assert_allclose(mapped, expected, rtol=1e-5, atol=1e-6)


def test_score_clip_clips_on_purpose(rawpad, tmp_path):
    _, clipped = _scores(rawpad, "wide", tmp_path / "w.jsonl", ["--clip"])
    np.save(rawpad / "clipped.npy", np.clip(np.load(rawpad / "wide.npy"), -1, 1))
    _, expected = _scores(rawpad, "clipped", tmp_path / "c.jsonl")
    np.testing.assert_array_equal(clipped, expected)


def test_uint8_pixels_map_from_0_255_whatever_x_range_says(rawpad, tmp_path):
    _, expected = _scores(rawpad, "pixels_f", tmp_path / "f.jsonl")
    _, plain = _scores(rawpad, "pixels", tmp_path / "p.jsonl")
    _, flagged = _scores(rawpad, "pixels", tmp_path / "q.jsonl", ["--x-range", "0,1"])
    np.testing.assert_allclose(plain, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(flagged, plain)


@pytest.mark.slow
def test_evaluate_and_report_with_x_range(rawpad, tmp_path, capsys):
    assert main(["evaluate", str(rawpad / "det"), "--model", str(rawpad / "x255.npy"),
                 "--other", f"o={rawpad / 'x255.npy'}", "--x-range", "0,255", "--out",
                 str(tmp_path / "rep"), "--quiet"]) == 0
    assert json.loads((tmp_path / "rep" / "records.json").read_text())["x_range"] == [
        0, 255]
    capsys.readouterr()
    code = main(["score", str(rawpad / "det"), str(rawpad / "x255.npy"), "--out",
                 str(tmp_path / "s.csv"), "--x-range", "0,255", "--report", str(tmp_path / "ev")])
    assert code == 1 and "--report with --x-range/--clip" in capsys.readouterr().err


def test_bad_x_range_is_a_usage_error(rawpad, tmp_path):
    for text in ("255,0", "0", "a,b"):
        with pytest.raises(SystemExit) as exit_:
            main(["score", str(rawpad / "det"), str(rawpad / "x.npy"), "--out",
                  str(tmp_path / "s.csv"), "--x-range", text])
        assert exit_.value.code == 2


def test_invert_with_x_range_equals_the_inversion_of_the_same_images(tmp_path, capsys):
    bundle = _conv_head_bundle(tmp_path / "head", 0)
    x = np.tanh(np.random.default_rng(1).normal(0, 0.6, (4, 3, 8, 8))).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "x255.npy", _to_255(x))
    common = ["--max-iter", "200", "--quiet"]
    assert main(["invert", str(bundle), str(tmp_path / "x.npy"), "--out",
                 str(tmp_path / "a.npy"), *common]) == 0
    assert main(["invert", str(bundle), str(tmp_path / "x255.npy"), "--out",
                 str(tmp_path / "b.npy"), *common]) == 1
    err = capsys.readouterr().err
    assert "x255.npy[0..3]: float values span" in err and "expected [-1, 1]" in err
    assert main(["invert", str(bundle), str(tmp_path / "x255.npy"), "--out",
                 str(tmp_path / "b.npy"), "--x-range", "0,255", *common]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "b.npy"), np.load(tmp_path / "a.npy"),
                               rtol=1e-4, atol=1e-5)
