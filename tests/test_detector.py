"""fj.Detector end to end: FLIPAD separation, save/load, thresholds, bad input."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flipad_jax as fj
from flipad_jax.deepsad import DeepSADConfig
from flipad_jax.detector import Detector
from flipad_jax.features import FeatureConfig

SMALL = dict(training=DeepSADConfig(epochs=4, batch_size=32,
                                    network_kwargs=dict(widths=(8, 8, 8), rep_dim=16)),
             fnrs=(0.05,), progress=False)


class TinyGenerator:
    """A small reference generator in JAX: z ~ N(0, I) (4×8×8) → ReLU → ConvT(4→3, k4 s2 p1)
    → tanh, giving 3×16×16 images; its head is the last ConvT with z̄ = E[ReLU(N(0,1))].
    Draws come from NumPy generators: jax.random compiles anew for every shape, seconds a test."""

    def __init__(self, seed):
        w = np.random.default_rng(seed).normal(size=(4, 3, 4, 4)).astype(np.float32) * 0.3
        self.head = fj.Head(fj.ConvTranspose2d(w, stride=2, padding=1, in_size=(8, 8)), "tanh",
                            jnp.full((4, 8, 8), 1.0 / np.sqrt(2 * np.pi)))

    def sample(self, rng, n):
        z = rng.normal(size=(n, 4, 8, 8)).astype(np.float32)
        return np.asarray(self.head.forward(jax.nn.relu(z)))


def _noise(rng, n):
    """Images of the same marginal range that G did not make: tanh of Gaussian noise."""
    return np.tanh(rng.normal(size=(n, 3, 16, 16)) * 0.6).astype(np.float32)


@pytest.fixture(scope="module")
def flipad_setup(tmp_path_factory):
    gen = TinyGenerator(0)
    rng = np.random.default_rng(1)
    data = dict(model=gen.sample(rng, 96), other=_noise(rng, 96),
                val=gen.sample(rng, 40), test_model=gen.sample(rng, 100),
                test_other=_noise(rng, 100))
    det = Detector(FeatureConfig("flipad", lam=5e-4, lasso=fj.LassoOptions(max_iter=200)),
                   head=gen.head, **SMALL)
    det.fit(data["model"], data["other"], data["val"])
    return gen, det, data


def test_flipad_detector_separates_generator_samples_from_noise(flipad_setup):
    gen, det, data = flipad_setup
    s_model, s_other = det.anomaly_score(data["test_model"]), det.anomaly_score(data["test_other"])
    assert np.std(s_model) > 0
    acc = fj.metrics.accuracy(s_model, s_other, det.thresholds_[0.05])
    assert acc >= 0.95, acc
    assert det.made_by_g(data["test_model"], fnr=0.05).mean() >= 0.85
    assert det.made_by_g(data["test_other"], fnr=0.05).mean() <= 0.05
    assert det.center_.shape == (16,)


def test_thresholds_are_quantiles_of_validation_scores(flipad_setup):
    _, det, data = flipad_setup
    np.testing.assert_array_equal(det.val_scores_, det.anomaly_score(data["val"]))
    # metrics.threshold is checked against closed forms and torch.quantile in test_metrics.
    assert det.thresholds_[0.05] == fj.metrics.threshold(det.val_scores_, 0.05)
    assert det.threshold(0.1) == fj.metrics.threshold(det.val_scores_, 0.1)  # on request


def test_save_load_scores_identically(flipad_setup, tmp_path):
    gen, det, data = flipad_setup
    det.save(tmp_path / "det")
    meta = json.loads((tmp_path / "det" / "meta.json").read_text())
    assert meta["features"]["kind"] == "flipad" and meta["head"]["fingerprint"]
    loaded = Detector.load(tmp_path / "det", head=gen.head)
    x = data["test_other"][:20]
    np.testing.assert_array_equal(loaded.anomaly_score(x), det.anomaly_score(x))
    assert loaded.thresholds_ == det.thresholds_
    np.testing.assert_array_equal(loaded.val_scores_, det.val_scores_)
    # precomputed features need no head
    feats = det.features(x)
    no_head = Detector.load(tmp_path / "det")
    np.testing.assert_array_equal(no_head.anomaly_score(feats, precomputed=True), det.anomaly_score(x))
    with pytest.raises(ValueError, match="head=None"):
        no_head.anomaly_score(x)
    other_head = TinyGenerator(9).head
    with pytest.raises(ValueError, match="fingerprint"):
        Detector.load(tmp_path / "det", head=other_head)


def test_checkpoint_from_another_version_is_refused(flipad_setup, tmp_path):
    _, det, _ = flipad_setup
    det.save(tmp_path / "det")
    meta_file = tmp_path / "det" / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["format_version"] = 99
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format_version 99.*expected 2"):
        Detector.load(tmp_path / "det")


def test_bad_input(flipad_setup):
    gen, det, data = flipad_setup
    with pytest.raises(ValueError, match=r"per-sample shape \(3, 32, 32\)"):
        det.anomaly_score(np.zeros((2, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match=r"per-sample shape \(1, 16, 16\)"):
        det.anomaly_score(np.zeros((2, 1, 16, 16), np.float32))
    with pytest.raises(ValueError, match=r"features of shape \(5, 8, 8\)"):
        det.anomaly_score(np.zeros((2, 5, 8, 8), np.float32), precomputed=True)
    feats = det.features(data["val"][:3])
    feats[1, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="1 NaN/inf"):
        det.anomaly_score(feats, precomputed=True)
    with pytest.raises(ValueError, match="NaN"):
        det.anomaly_score(np.full((2, 3, 16, 16), np.nan, np.float32))
    for fnr in (0.0, 1.0, -0.5, 2):
        with pytest.raises(ValueError, match="open interval"):
            det.made_by_g(data["val"][:2], fnr=fnr)
    with pytest.raises(ValueError, match="expected at least 200"):
        det.threshold(0.005)  # 40 validation samples
    with pytest.raises(ValueError, match="x_val has 10 samples"):
        Detector("raw", **SMALL).fit(data["model"], data["other"], data["val"][:10])
    with pytest.raises(ValueError, match=r"x_other gives features of shape \(3, 8, 8\)"):
        Detector(FeatureConfig("raw", size=None), **SMALL).fit(
            data["model"], data["other"][:, :, :8, :8], data["val"])
    with pytest.raises(ValueError, match="not fitted"):
        Detector("raw").anomaly_score(data["val"])
    with pytest.raises(ValueError, match="head=None"):
        Detector("flipad")


@pytest.mark.parametrize("kind", ["raw", "dct"])
def test_raw_and_dct_detectors_fit_and_round_trip(kind, tmp_path):
    rng = np.random.default_rng(0)
    x_model = np.tanh(rng.normal(0.5, 0.5, (96, 3, 16, 16))).astype(np.float32)
    x_other = np.tanh(rng.normal(0.0, 0.5, (96, 3, 16, 16))).astype(np.float32)
    det = Detector(FeatureConfig(kind, size=None, crop=16, top_k=2), **SMALL).fit(
        x_model, x_other, x_model[:20] * 0.99)
    assert len(det.channels_) == 2
    if kind == "dct":  # statistics over both classes
        f = np.concatenate([det.features(x_model), det.features(x_other)])
        np.testing.assert_allclose(det.standardizer_.mean, f.mean(0), rtol=1e-4, atol=1e-4)
    else:
        assert det.standardizer_ is None
    det.save(tmp_path / kind)
    np.testing.assert_array_equal(Detector.load(tmp_path / kind).anomaly_score(x_other[:8]),
                                  det.anomaly_score(x_other[:8]))


@pytest.mark.slow
def test_scoring_is_sharded_over_devices(tmp_path):
    """Eight host devices: sharded scores equal the single-device ones."""
    rng = np.random.default_rng(0)
    x = np.tanh(rng.normal(0, 0.5, (80, 3, 16, 16))).astype(np.float32)
    det = Detector(FeatureConfig("raw", size=None), **SMALL).fit(x[:40], x[40:] * 0.5, x[:20])
    det.save(tmp_path / "det")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "s.npy", det.anomaly_score(x))
    code = textwrap.dedent(f"""
        import jax, numpy as np
        from flipad_jax.detector import Detector
        assert jax.device_count() == 8
        det = Detector.load({str(tmp_path / 'det')!r})
        det.training = det.training.replace(score_batch_size=12)  # rounded up to 16: 2 per
                                                                  # device, padded tail
        s = det.anomaly_score(np.load({str(tmp_path / 'x.npy')!r}))
        np.testing.assert_allclose(s, np.load({str(tmp_path / 's.npy')!r}), rtol=1e-5, atol=1e-6)
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def test_load_names_missing_metadata_fields(tmp_path):
    import json
    import flipad_jax as fj
    from flipad_jax.detector_io import FORMAT, FORMAT_VERSION
    folder = tmp_path / "det"
    folder.mkdir()
    (folder / "meta.json").write_text(json.dumps({"format": FORMAT,
                                                  "format_version": FORMAT_VERSION}))
    with pytest.raises(ValueError, match="lacks the field"):
        fj.Detector.load(folder)
