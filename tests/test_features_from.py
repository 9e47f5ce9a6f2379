"""Cache then train: `flipad invert` features taken by `fit/score --features-from`, equal to the
detector made from the images themselves, and refused when they come from another solve."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flipad_jax as fj
from flipad_jax.cli import main
from flipad_jax.detector import Detector
from tests.test_cli_score import _conv_head_bundle, _error

SOLVE = ["--max-iter", "60"]

pytestmark = pytest.mark.slow  # end-to-end CLI runs: the full suite (CI) runs them


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("features_from")
    bundle = _conv_head_bundle(d / "head", 0)
    head = fj.Head.load(bundle)
    z = jax.nn.relu(jax.random.normal(jax.random.key(0), (90, 5, 4, 4)))
    g = np.asarray(head.forward(z))
    other = np.asarray(jnp.tanh(0.6 * jax.random.normal(jax.random.key(1), (60, 3, 8, 8))))
    for name, x in (("g", g[:60]), ("val", g[60:]), ("other", other)):
        np.save(d / f"{name}.npy", x)
        assert main(["invert", str(bundle), str(d / f"{name}.npy"), "--out",
                     str(d / f"{name}_z.npy"), *SOLVE, "--quiet"]) == 0
    return d, bundle


def _fit(d, bundle, out, suffix, *extra):
    return main(["fit", "--features", "flipad", "--bundle", str(bundle),
                 "--model", str(d / f"g{suffix}.npy"), "--other", str(d / f"other{suffix}.npy"),
                 "--val", str(d / f"val{suffix}.npy"), "--fnr", "0.05", "--epochs", "3",
                 "--batch-size", "32", "--network-opt", "widths=[8,8]", "--network-opt",
                 "rep_dim=8", "--pool-to", "none", "--out", str(out), "--quiet", *extra])


def test_cached_features_give_the_detector_the_images_give(setup, tmp_path, capsys):
    d, bundle = setup
    assert _fit(d, bundle, tmp_path / "from_images", "", *SOLVE) == 0
    assert _fit(d, bundle, tmp_path / "from_features", "_z", "--features-from") == 0
    a = Detector.load(tmp_path / "from_images")
    b = Detector.load(tmp_path / "from_features")
    assert b.feature_config.lasso == a.feature_config.lasso  # taken from the sidecars
    x = np.load(d / "other.npy")
    np.testing.assert_allclose(b.anomaly_score(x), a.anomaly_score(x), rtol=1e-4, atol=1e-6)
    # score --features-from: the cached features score as the images do
    out = tmp_path / "s.jsonl"
    assert main(["score", str(tmp_path / "from_images"), str(d / "other_z.npy"),
                 "--features-from", "--out", str(out), "--quiet"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["path"] == f"{d / 'other_z.npy'}[0]"
    np.testing.assert_allclose([r["score"] for r in rows], a.anomaly_score(x), rtol=1e-5,
                               atol=1e-6)
    capsys.readouterr()


def test_features_pooled_at_invert_time_are_used_as_they_are(setup, tmp_path, capsys):
    d, bundle = setup
    assert main(["fit", "--features", "flipad", "--bundle", str(bundle), "--model",
                 str(d / "g.npy"), "--other", str(d / "other.npy"), "--val", str(d / "val.npy"),
                 "--pool-to", "2", "--out", str(tmp_path / "det"), *SOLVE, "--fnr", "0.05",
                 "--epochs", "3", "--batch-size", "32", "--network-opt", "widths=[8]",
                 "--network-opt", "rep_dim=8",
                 "--quiet"]) == 0
    assert main(["invert", str(bundle), str(d / "other.npy"), "--out", str(tmp_path / "p.npy"),
                 "--pool-to", "2", *SOLVE, "--quiet"]) == 0
    out = tmp_path / "s.jsonl"
    assert main(["score", str(tmp_path / "det"), str(tmp_path / "p.npy"), "--features-from",
                 "--out", str(out), "--quiet"]) == 0
    scores = [json.loads(line)["score"] for line in out.read_text().splitlines()]
    np.testing.assert_allclose(scores, Detector.load(tmp_path / "det").anomaly_score(
        np.load(d / "other.npy")), rtol=1e-5, atol=1e-6)
    capsys.readouterr()


def test_features_of_another_solve_or_head_are_refused(setup, tmp_path, capsys):
    d, bundle = setup
    assert _fit(d, bundle, tmp_path / "det", "", *SOLVE) == 0
    assert main(["invert", str(bundle), str(d / "other.npy"), "--out", str(tmp_path / "l.npy"),
                 "--lam", "0.01", *SOLVE, "--quiet"]) == 0
    out = tmp_path / "s.jsonl"
    assert main(["score", str(tmp_path / "det"), str(tmp_path / "l.npy"), "--features-from",
                 "--out", str(out), "--quiet"]) == 1
    assert "solved with λ=0.01" in _error(capsys) and not out.exists()
    other_bundle = _conv_head_bundle(tmp_path / "head2", 1)
    assert main(["invert", str(other_bundle), str(d / "other.npy"), "--out",
                 str(tmp_path / "h.npy"), *SOLVE, "--quiet"]) == 0
    assert main(["score", str(tmp_path / "det"), str(tmp_path / "h.npy"), "--features-from",
                 "--out", str(out), "--quiet"]) == 1
    assert "inverted with another head" in _error(capsys)
    # the three sets of one fit must come from one solve
    np.save(tmp_path / "g_z.npy", np.load(d / "g_z.npy"))
    (tmp_path / "g_z.json").write_text((tmp_path / "l.json").read_text())
    assert main(["fit", "--features", "flipad", "--bundle", str(bundle), "--model",
                 str(tmp_path / "g_z.npy"), "--other", str(d / "other_z.npy"), "--val",
                 str(d / "val_z.npy"), "--features-from", "--fnr", "0.05", "--out",
                 str(tmp_path / "x"), "--quiet"]) == 1
    assert "features of another head or solve" in _error(capsys)
    # the features' sidecar sets λ and the solver: an explicit one is refused, not ignored
    assert main(["fit", "--features", "flipad", "--bundle", str(bundle), "--model",
                 str(d / "g_z.npy"), "--other", str(d / "other_z.npy"), "--val",
                 str(d / "val_z.npy"), "--features-from", "--lam", "0.01", "--fnr", "0.05",
                 "--out", str(tmp_path / "y"), "--quiet"]) == 1
    assert "--features-from with --lam/--max-iter" in _error(capsys)
    # images are not feature files
    assert main(["score", str(tmp_path / "det"), str(d / "other.npy"), "--features-from",
                 "--out", str(out), "--quiet"]) == 1
    assert "expected a feature file written by `flipad invert`" in _error(capsys)
