"""The settings objects (LassoOptions, FeatureConfig, DeepSADConfig): presets, validation, the
behaviour each setting controls, and their round trip through a saved detector."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flipad_jax as fj
from flipad_jax.detector_io import HeadMismatchError

TINY = fj.DeepSADConfig(epochs=1, batch_size=16, network_kwargs=dict(hidden=(8,), rep_dim=4))


def _op():
    w = jax.random.normal(jax.random.key(0), (2, 1, 4, 4)) * 0.3
    return fj.ConvTranspose2d(w, stride=2, padding=1, in_size=(4, 4))


def test_paper_preset_is_the_reference_solver():
    conv = fj.LassoOptions.paper(_op())
    assert (conv.step, conv.tol, conv.stop, conv.restart, conv.start, conv.max_iter) == \
        (0.025, 1e-5, "reference", False, "reference", 10000)
    linear = fj.LassoOptions.paper(fj.Linear(jnp.ones((3, 2))))
    assert (linear.step, linear.tol) == (0.001, 1e-4)
    assert fj.LassoOptions.paper(_op(), max_iter=7).max_iter == 7


def test_reference_start_is_twice_the_anchor():
    """The reference starts its shifted problem at δ₀ = z̄, i.e. z₀ = 2z̄; ours at z₀ = z̄."""
    op = _op()
    zbar = jnp.full(op.in_shape, 0.3)
    o = jnp.zeros((2,) + op.out_shape)
    ref = fj.solve_lasso(op, o, 1e-3, anchor=zbar, options=fj.LassoOptions.paper(op),
                         max_iter=0)
    ours = fj.solve_lasso(op, o, 1e-3, anchor=zbar, stop="change", max_iter=0)
    np.testing.assert_allclose(ref.z, np.broadcast_to(2 * 0.3, ref.z.shape), rtol=1e-6)
    np.testing.assert_allclose(ours.z, np.broadcast_to(0.3, ours.z.shape), rtol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(stop="slow"), "stop='slow'"), (dict(start="zero"), "start='zero'"),
    (dict(max_iter=-1), "max_iter=-1"), (dict(step=0.0), "step=0.0"),
    (dict(tol=float("nan")), "tol=nan")])
def test_lasso_options_refuse_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fj.LassoOptions(**kwargs)


def test_growing_step_and_lambda_path_defaults_follow_the_stop_rule():
    """The certified rule takes both levers, the heuristic rules neither (their tolerance is
    in step lengths); a rule changed by replace() re-derives them, a value set explicitly is
    kept (and checked)."""
    ours = fj.LassoOptions()
    assert (ours.continuation, ours.step_growth) == (0.2, 1.02)
    change = ours.replace(stop="change")
    assert (change.continuation, change.step_growth) == (None, None)
    assert change.replace(stop="gap") == ours
    reference = ours.replace(stop="reference")
    assert (reference.continuation, reference.step_growth) == (None, None)
    assert fj.LassoOptions(step_growth=1.05).replace(stop="change").step_growth == 1.05
    with pytest.raises(ValueError, match="step_growth=1.05 with stop='reference'"):
        fj.LassoOptions(step_growth=1.05).replace(stop="reference")


def test_solver_records_written_before_the_levers_existed_read_as_off(tmp_path):
    """A sidecar or detector whose solver record predates continuation and step_growth was
    solved without them: reading it must not switch on today's defaults."""
    assert fj.LassoOptions.from_json(fj.LassoOptions().to_json()) == fj.LassoOptions()
    # read back, the defaults still follow a change of stop rule
    read = fj.LassoOptions.from_json(fj.LassoOptions().to_json())
    assert read.replace(stop="reference") == fj.LassoOptions(stop="reference")
    legacy = {k: v for k, v in fj.LassoOptions().to_json().items()
              if k not in ("continuation", "step_growth")}
    old = fj.LassoOptions.from_json(legacy)
    assert (old.continuation, old.step_growth) == (None, None)
    assert fj.FeatureConfig("flipad", lasso=legacy).lasso == old


def test_unknown_solver_setting_is_named():
    with pytest.raises(ValueError, match="mode: not a solver setting"):
        fj.LassoOptions().replace(mode="paper")


def test_status_values_have_messages():
    assert [s.message for s in fj.Status] == ["stopped by the stop rule",
                                               "reached max_iter before the stop rule held",
                                               "the objective went non-finite (NaN or inf)"]


def test_verdict_rule_includes_the_threshold():
    """Paper eq. 7: made by G iff s(x) ≤ τ."""
    assert fj.metrics.made_by_g(np.array([0.5, 1.0, 1.5]), 1.0).tolist() == [True, True, False]


def _two_classes(n=48, d=6):
    rng = np.random.default_rng(0)
    return (rng.normal(1.0, 1.0, (n, 1, d, d)).astype(np.float32),
            rng.normal(-1.0, 3.0, (n, 1, d, d)).astype(np.float32))


@pytest.mark.parametrize("standardize", ["inliers", "all", None])
def test_standardisation_statistics_come_from_the_chosen_samples(standardize):
    x_model, x_other = _two_classes()
    flat = lambda x: x.reshape(len(x), -1)  # noqa: E731
    det = fj.Detector(fj.FeatureConfig("raw", size=None, standardize=standardize),
                      training=TINY, fnrs=(0.1,), progress=False)
    det.fit(flat(x_model), flat(x_other), flat(x_model[:20]), precomputed=True)
    if standardize is None:
        assert det.standardizer_ is None
        return
    pool = flat(x_model) if standardize == "inliers" else np.concatenate([flat(x_model),
                                                                        flat(x_other)])
    np.testing.assert_allclose(det.standardizer_.mean, pool.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(det.standardizer_.std, pool.std(0, ddof=1), rtol=1e-5)


def test_auto_standardisation_follows_the_kind():
    assert [fj.FeatureConfig(k).standardize_on for k in ("flipad", "raw", "dct")] == \
        ["inliers", None, "all"]
    with pytest.raises(ValueError, match="standardize='mean'"):
        fj.FeatureConfig("raw", standardize="mean")


def test_settings_round_trip_through_a_saved_detector(tmp_path):
    x_model, x_other = _two_classes()
    flat = x_model.reshape(len(x_model), -1), x_other.reshape(len(x_other), -1)
    features = fj.FeatureConfig("raw", size=None, standardize=None, top_k=5,
                                lasso=fj.LassoOptions(max_iter=7, tol=1e-2))
    det = fj.Detector(features, training=TINY.replace(lr=1e-3, lr_milestones=(3,)),
                      fnrs=(0.1,), progress=False).fit(*flat, flat[0][:20], precomputed=True)
    det.save(tmp_path / "det")
    back = fj.Detector.load(tmp_path / "det")
    assert back.feature_config == features and back.training == det.training
    assert back.channels_ == det.channels_ and len(back.channels_) == 5
    np.testing.assert_array_equal(back.anomaly_score(flat[1], precomputed=True),
                                  det.anomaly_score(flat[1], precomputed=True))


@pytest.mark.parametrize("kind", ["raw", "dct"])
def test_integer_pixels_are_refused_not_misread(kind):
    """uint8 pixels read as 0-255 floats would be ~127x off the scale detectors are fitted on."""
    x = np.zeros((2, 1, 8, 8), np.uint8)
    with pytest.raises(ValueError, match="dtype uint8: expected floating images"):
        fj.FeatureConfig(kind, size=None, crop=8).extract(x)


def test_loading_with_another_head_is_a_typed_error(tmp_path):
    op = _op()
    head = fj.Head(op, "tanh", jnp.zeros(op.in_shape))
    other = fj.Head(op, "tanh", jnp.full(op.in_shape, 0.1))
    # The head is saved (by fingerprint) whatever the inputs: precomputed features spare the solve.
    f = np.random.default_rng(0).normal(0, 0.5, (40,) + op.in_shape).astype(np.float32)
    det = fj.Detector(fj.FeatureConfig("flipad", pool_to=None),
                      training=fj.DeepSADConfig(epochs=1, batch_size=16,
                                                network_kwargs=dict(widths=(2, 2), rep_dim=4)),
                      head=head, fnrs=(0.1,), progress=False)
    det.fit(f[:20], -f[20:], f[:10], precomputed=True).save(tmp_path / "det")
    with pytest.raises(HeadMismatchError, match="fingerprint"):
        fj.Detector.load(tmp_path / "det", head=other)
    assert fj.Detector.load(tmp_path / "det", head=head).thresholds_ == det.thresholds_
