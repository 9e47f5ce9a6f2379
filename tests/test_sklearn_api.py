"""The Detector under scikit-learn's and PyOD's conventions: clone, cross_val_score, fit(X, y),
the sign of score_samples / decision_function / predict, and PyOD's fitted attributes."""

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.model_selection import StratifiedKFold, cross_val_score

from flipad_jax.deepsad import DeepSADConfig
from flipad_jax.detector import Detector
from flipad_jax.features import FeatureConfig

TRAINING = DeepSADConfig(epochs=3, batch_size=32,
                         network_kwargs=dict(widths=(4, 4, 4), rep_dim=8))


def _labelled(seed=0, n=200):
    """3×16×16 images: G's (y = 1) carry a fixed bright square, others (y = 0) are plain noise."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, size=(n, 3, 16, 16)).astype(np.float32) * 0.5
    y = np.r_[np.ones(n // 2, np.int64), np.zeros(n - n // 2, np.int64)]
    x[y == 1, :, 4:12, 4:12] = 0.9
    order = rng.permutation(n)
    return x[order], y[order]


def _detector():
    return Detector(FeatureConfig("raw", size=16), training=TRAINING, fnrs=(0.05,),
                    progress=False)


@pytest.mark.slow
def test_clone_gives_an_unfitted_copy_with_equal_parameters():
    det = _detector()
    x, y = _labelled()
    det.fit(x, y)
    copy = clone(det)
    assert copy.get_params() == det.get_params()
    with pytest.raises(ValueError, match="not fitted"):
        copy.anomaly_score(x)
    changed = clone(det).set_params(fnrs=(0.05, 0.1))
    assert changed.fnrs == (0.05, 0.1)
    with pytest.raises(ValueError, match="not a Detector parameter"):
        det.set_params(lam=1.0)
    assert Detector("raw", fnrs=np.array([0.05, 0.01])).fnrs == (0.01, 0.05)


@pytest.mark.slow
def test_cross_val_score_runs_and_separates_the_planted_pattern():
    x, y = _labelled(n=300)
    scores = cross_val_score(_detector(), x, y, cv=StratifiedKFold(3, shuffle=True,
                                                                   random_state=0))
    assert scores.shape == (3,)
    assert np.all(scores > 0.75), scores  # balanced folds: chance is 0.5


def test_signs_follow_scikit_learn_and_pyod():
    x, y = _labelled(seed=1)
    det = _detector().fit(x, y, val_fraction=0.25, seed=3)
    test, y_test = _labelled(seed=2)
    anomaly = det.anomaly_score(test)
    made = det.made_by_g(test)
    np.testing.assert_array_equal(det.score_samples(test), -anomaly)
    decision = det.decision_function(test)
    np.testing.assert_array_equal(decision >= 0, made)
    np.testing.assert_array_equal(det.predict(test), np.where(made, 1, -1))
    assert det.score(test, y_test) == np.mean(made == (y_test == 1))
    # G's samples have the larger sklearn scores (lower = more abnormal)
    assert det.score_samples(test)[y_test == 1].mean() > det.score_samples(test)[y_test == 0].mean()
    # PyOD: threshold_ on decision_scores_ (G's validation scores), labels_ 1 = outlier
    assert det.threshold_ == det.thresholds_[0.05]
    assert len(det.decision_scores_) == round(0.25 * 100)
    np.testing.assert_array_equal(det.labels_, (det.decision_scores_ > det.threshold_))


def test_labelled_fit_uses_the_stated_split():
    x, y = _labelled(seed=4)
    det = _detector().fit(x, y, val_fraction=0.25, seed=3)
    g = x[y == 1]
    val = g[np.random.default_rng(3).permutation(len(g))[:25]]
    # the validation scores are those of exactly the held-out images
    np.testing.assert_array_equal(np.sort(det.val_scores_), np.sort(det.anomaly_score(val)))


@pytest.mark.parametrize("y, match", [
    (np.full(200, 2), r"y holds \[2\]: expected 1 \(G's sample\), 0 \(any other\)"),
    (np.ones(199), r"y has shape \(199,\): expected \(200,\)"),
    (np.ones(200), "200 samples of G .1. and 0 others"),
])
def test_bad_labels_are_refused(y, match):
    x, _ = _labelled()
    with pytest.raises(ValueError, match=match):
        _detector().fit(x, y)


def test_bad_fraction_and_missing_validation_are_refused():
    x, y = _labelled()
    with pytest.raises(ValueError, match="val_fraction=1.5"):
        _detector().fit(x, y, val_fraction=1.5)
    with pytest.raises(ValueError, match="x_val=None"):
        _detector().fit(x[y == 1], x[y == 0])
