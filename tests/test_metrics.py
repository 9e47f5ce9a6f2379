"""Metrics against closed-form and torch quantiles, scikit-learn's AUC and hand counts."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from flipad_jax import metrics
from flipad_jax.metrics import (accuracy, attribution_table, evaluate, min_validation_samples,
                                rates, realised_fnr, roc_auc, threshold)


@pytest.mark.parametrize("fnr", [0.005, 0.05, 0.1, 0.37])
def test_threshold_is_the_interpolated_quantile(fnr):
    # Scores 0, 1, …, n − 1 in any order: the linearly interpolated (1 − fnr) quantile sits at
    # position (n − 1)(1 − fnr), which is its own value.
    n = 1001
    s = np.random.default_rng(0).permutation(n).astype(np.float64)
    assert threshold(s, fnr) == pytest.approx((n - 1) * (1 - fnr), rel=1e-12)
    g = np.random.default_rng(1).gamma(2.0, size=1000)
    assert abs(realised_fnr(g, threshold(g, fnr)) - fnr) <= 1 / 1000 + 1e-12


@pytest.mark.torch
def test_threshold_equals_the_references_torch_quantile():
    torch = pytest.importorskip("torch")
    s = np.random.default_rng(2).gamma(2.0, size=999)
    for fnr in (0.005, 0.05, 0.3):
        assert threshold(s, fnr) == pytest.approx(
            float(torch.quantile(torch.from_numpy(s), 1 - fnr)), rel=1e-12)


def test_threshold_bad_input():
    s = np.arange(100.0)
    for bad in (0, 1, 0.0, 1.0, -0.1, 1.5, np.nan, True):
        with pytest.raises(ValueError, match="open interval"):
            threshold(s, bad)
    with pytest.raises(ValueError, match="expected at least 200"):
        threshold(s, 0.005)
    assert min_validation_samples(0.05) == 20 and min_validation_samples(0.005) == 200
    with pytest.raises(ValueError, match="NaN"):
        threshold(np.r_[s, np.nan], 0.1)


def test_rates_and_accuracy_hand_counted():
    sg = np.array([0.1, 0.2, 0.3, 0.9])     # 3 of 4 ≤ 0.5
    so = np.array([0.4, 0.6, 0.7, 0.8])     # 3 of 4 > 0.5
    assert rates(sg, so, 0.5) == {"tpr": 0.75, "fnr": 0.25, "tnr": 0.75, "fpr": 0.25}
    assert accuracy(sg, so, 0.5) == 0.75
    assert accuracy(sg, so, 0.3) == pytest.approx(0.5 * (3 / 4 + 1))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=30),
       st.lists(st.integers(0, 5), min_size=1, max_size=30))
def test_auc_matches_sklearn_with_ties(sg, so):
    metrics = pytest.importorskip("sklearn.metrics")
    y = np.r_[np.ones(len(sg)), np.zeros(len(so))]
    expected = metrics.roc_auc_score(y, -np.r_[sg, so].astype(float))
    assert roc_auc(np.asarray(sg, float), np.asarray(so, float)) == pytest.approx(expected)


def test_evaluate_and_tables():
    rng = np.random.default_rng(1)
    sg = rng.normal(0, 1, 200)
    recs = evaluate(sg, {"real": rng.normal(3, 1, 200), "wgan": rng.normal(1, 1, 200)},
                    {0.05: threshold(sg, 0.05)})
    assert [r["other"] for r in recs] == ["real", "wgan"]
    assert recs[0]["acc@fnr=0.05"] > recs[1]["acc@fnr=0.05"]
    rows = [dict(r, method="FLIPAD", model="DCGAN") for r in recs] + \
           [{"method": "RawPAD", "model": "DCGAN", "other": "real", "acc@fnr=0.05": 0.5}]
    t1 = attribution_table(rows, value="acc@fnr=0.05")
    mean = 100 * np.mean([r["acc@fnr=0.05"] for r in recs])
    assert t1.splitlines()[2] == f"| FLIPAD | {mean:.2f} |"
    assert t1.splitlines()[3] == "| RawPAD | 50.00 |"
    t8 = attribution_table(rows, value="acc@fnr=0.05", per_other=True)
    assert "DCGAN vs wgan" in t8 and t8.splitlines()[3].endswith("| 50.00 | – |")
    with pytest.raises(ValueError, match="expected a key 'method'"):
        attribution_table([{"model": "x"}])


def test_conformal_p_values_have_their_closed_form_null_distribution():
    """For continuous exchangeable scores, p = (1 + #{v ≥ s})/(n + 1) is uniform on
    {1/(n+1), …, 1}: P(p ≤ α) = ⌊α(n+1)⌋/(n+1) exactly. 20 000 draws of (n = 19 validation
    scores, one test score), so the empirical rate of each α is within 4.5 binomial standard
    deviations of its exact value (a false alarm about once in 10⁵ runs per α; the seed is
    fixed)."""
    rng = np.random.default_rng(0)
    n, reps = 19, 20000
    draws = rng.standard_normal((reps, n + 1))
    p = np.array([metrics.p_values(row[:n], row[n:])[0] for row in draws])
    for alpha in (0.05, 0.1, 0.25, 0.5):
        exact = np.floor(alpha * (n + 1)) / (n + 1)
        bound = 4.5 * np.sqrt(exact * (1 - exact) / reps)
        assert abs(np.mean(p <= alpha) - exact) <= bound, (alpha, np.mean(p <= alpha), exact)


@pytest.mark.slow
def test_a_detector_s_p_values_are_calibrated_on_fresh_samples_of_g():
    """End to end: an SM-F detector (no training, so it is cheap) thresholded on 400 of G's
    images; on 1500 fresh ones the rate of p ≤ α stays within a binomial bound of α (4
    standard deviations of the test draw plus 4 of the calibration draw: a false alarm about
    once in 10⁴ runs per α, seed fixed)."""
    import flipad_jax as fj

    rng = np.random.default_rng(3)
    pattern = 4.0 * np.sign(rng.normal(size=(1, 1, 32, 32)))

    def images(n, with_pattern=True):
        x = np.kron(rng.uniform(40, 215, (n, 1, 4, 4)), np.ones((1, 1, 8, 8)))
        x = x + rng.normal(0, 2.0, x.shape) + (pattern if with_pattern else 0)
        return (np.clip(np.round(x), 0, 255) / 127.5 - 1).astype(np.float32)

    det = fj.Detector("sm_f", fnrs=(0.05,), progress=False)
    det.fit(images(100), images(100, False), images(400))
    p = det.p_value(images(1500))
    for alpha in (0.02, 0.05, 0.1, 0.2):
        sd = np.sqrt(alpha * (1 - alpha) / 1500) + np.sqrt(alpha * (1 - alpha) / 400)
        assert abs(np.mean(p <= alpha) - alpha) <= 4 * sd, (alpha, np.mean(p <= alpha))
