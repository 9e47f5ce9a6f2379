"""``fj.Detector``: "made by G?" from FLIPAD, RawPAD or DCTPAD features with DeepSAD, or the
SM-F fingerprint baseline.

Polarity, in names that say it. G's samples are the inliers; everything else is an outlier.

* ``anomaly_score(x)``: higher = *less* likely made by G (DeepSAD's ‖φ(x) − c‖²; PyOD's
  ``decision_function`` direction; the ``score`` column of ``flipad score``).
* ``made_by_g(x, fnr)``: bool, True where x is attributed to G (:func:`flipad_jax.metrics.made_by_g`:
  anomaly score ≤ τ(fnr), τ the (1 − fnr) quantile of G's validation scores).
* scikit-learn's outlier-detector conventions: ``score_samples(x)`` = −anomaly score (lower =
  more abnormal), ``decision_function(x)`` = τ − anomaly score (≥ 0: made by G), ``predict(x)``
  = +1 made by G / −1 not, ``score(X, y)`` = accuracy of ``made_by_g`` against labels y (1 = G's
  sample, 0 = not), ``fit(X, y)`` with such labels, ``get_params``/``set_params`` (so
  ``sklearn.base.clone`` and ``cross_val_score`` work).
* PyOD's fitted attributes: ``threshold_`` (τ at the first fnr), ``decision_scores_`` (anomaly
  scores of G's validation samples, on which τ was set), ``labels_`` (1 where those exceed τ).

Fitted attributes end in ``_``.

Settings live in two objects with the paper's defaults: :class:`~flipad_jax.features.FeatureConfig`
(how images become features: kind, λ and solver, pooling, standardisation, top-k) and
:class:`~flipad_jax.deepsad.DeepSADConfig` (network and training). What ``fit`` learns is one
:class:`DetectorState`; :mod:`flipad_jax.detector_io` writes and reads it.

Pipeline (paper §4, METHOD.md §4): features (:mod:`flipad_jax.features`) → standardisation fitted
on the training data (``FeatureConfig.standardize``; by default FLIPAD: inliers, DCTPAD: all,
RawPAD: none) → optional top-k channel selection → DeepSAD (:mod:`flipad_jax.deepsad`) →
thresholds on G's validation scores. SM-F (paper App. E, ``features="sm_f"``) replaces the last
two steps by G's fingerprint, the mean noise residual of G's training images, and scores
s(x) = −⟨f_G, r̂(x)⟩ (:mod:`flipad_jax.prnu`); it needs no other samples and no training.

Every method takes images ``(B, C, H, W)`` or, with ``precomputed=True``, features already
extracted (``detector.features(images)``, e.g. pooled ``head.invert(images).z`` computed elsewhere);
the feature and standardisation steps after extraction are always the detector's.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import numpy as np

from flipad_jax._checks import check_floating, check_labels
from flipad_jax.deepsad import DeepSADConfig, DeepSADModel, fit_deepsad, score as deepsad_score
from flipad_jax.features import FeatureConfig, Standardizer, downsample, top_channels
from flipad_jax.metrics import (check_fnr, made_by_g, min_validation_samples, p_values,
                                threshold)
from flipad_jax.prnu import fingerprint as prnu_fingerprint, sm_f_scores

DEFAULT_FNRS = (0.005, 0.05)  # the paper's fnr (App. G.1) and its Table 13's looser one


class FingerprintModel(NamedTuple):
    """SM-F's fitted state: G's fingerprint ``(H, W)`` float32, zero-mean and unit-norm."""

    fingerprint: np.ndarray


class DetectorState(NamedTuple):
    """Everything ``Detector.fit`` learns (what a saved detector holds besides its settings).

    Attributes:
      network: ``(name, kwargs)`` of the DeepSAD network (kwargs include selected channels);
        None for SM-F.
      model: the trained :class:`~flipad_jax.deepsad.DeepSADModel` (variables, centre c), or
        SM-F's :class:`FingerprintModel`.
      standardizer: :class:`~flipad_jax.features.Standardizer` or None.
      channels: indices of the top-k channels, or None.
      thresholds: {fnr: τ} for the fitted fnrs.
      val_scores: ``(n_val,)`` float32, G's validation scores.
      feature_shape: per-sample feature shape; input_shape: image shape seen by ``fit`` (None for
        precomputed features).
      losses: ``(epochs,)`` mean training loss per epoch (empty for SM-F).
    """

    network: tuple
    model: Union[DeepSADModel, FingerprintModel]
    standardizer: Optional[Standardizer]
    channels: Optional[list]
    thresholds: dict
    val_scores: np.ndarray
    feature_shape: tuple
    input_shape: Optional[tuple]
    losses: np.ndarray


def check_fnrs(fnrs) -> tuple:
    """The fnrs as a sorted tuple of distinct floats in (0, 1), at least one."""
    fnrs = tuple(sorted({check_fnr(f) for f in fnrs}))
    if not fnrs:
        raise ValueError("fnrs=(): expected at least one false-negative rate")
    return fnrs


LABELS = {1: "G's sample", 0: "any other"}  # scikit-learn's fit(X, y) and score(X, y)


def split_labelled(x, y, x_val, val_fraction: float, seed: int) -> tuple:
    """``(x_model, x_other, x_val)`` from labelled samples (scikit-learn's ``fit(X, y)``): G's
    samples split at random into training and validation ones unless ``x_val`` is given."""
    y = check_labels("y", y, len(x), LABELS)
    x = np.asarray(x)
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction}: expected a fraction in (0, 1)")
    model, other = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if len(model) == 0 or len(other) == 0:
        raise ValueError(f"y has {len(model)} samples of G (1) and {len(other)} others (0): "
                         "expected both")
    if x_val is None:
        model = np.random.default_rng(seed).permutation(model)
        n_val = int(round(val_fraction * len(model)))
        if not 0 < n_val < len(model):
            raise ValueError(f"val_fraction={val_fraction} of {len(model)} samples of G leaves "
                             f"{n_val} for validation: expected at least one each way")
        x_val, model = x[model[:n_val]], model[n_val:]
    return x[model], x[other], x_val


class Detector:
    """Single-model attribution detector (FLIPAD, RawPAD or DCTPAD + DeepSAD; SM-F).

    Args:
      features: a :class:`~flipad_jax.features.FeatureConfig`, or its kind ("flipad", "raw",
        "dct", "sm_f") for the paper's defaults.
      training: :class:`~flipad_jax.deepsad.DeepSADConfig` (default: the paper's).
      head: the generator's :class:`~flipad_jax.Head` (FLIPAD).
      fnrs: false-negative rates whose thresholds are fitted (any other on request).
      progress: show progress bars.

    Fitted attributes (read from ``state_``, a :class:`DetectorState`): ``center_`` (rep_dim,),
    ``thresholds_`` {fnr: τ}, ``val_scores_`` (n_val,), ``model_``, ``standardizer_`` (or None),
    ``channels_`` (or None), ``feature_shape_``, ``input_shape_``, ``network_`` (name, kwargs),
    ``losses_``.
    """

    def __init__(self, features: Union[FeatureConfig, str] = "flipad", *,
                 training: Optional[DeepSADConfig] = None, head=None,
                 fnrs: Sequence[float] = DEFAULT_FNRS, progress: bool = True):
        self.feature_config = (features if isinstance(features, FeatureConfig)
                               else FeatureConfig(features))
        if self.feature_config.kind == "flipad" and head is None:
            raise ValueError("head=None: features='flipad' needs the generator's Head")
        self.training = training or DeepSADConfig()
        self.head = head
        checked = check_fnrs(fnrs)
        # kept as given when already canonical: sklearn's clone checks parameters by identity
        self.fnrs = fnrs if isinstance(fnrs, tuple) and fnrs == checked else checked
        self.progress = progress

    # -- scikit-learn parameters ---------------------------------------------------------------

    _PARAMS = {"features": "feature_config", "training": "training", "head": "head",
               "fnrs": "fnrs", "progress": "progress"}

    def get_params(self, deep: bool = True) -> dict:
        """The constructor's arguments (scikit-learn's protocol; ``deep`` has no nested
        estimators to expand)."""
        return {name: getattr(self, attr) for name, attr in self._PARAMS.items()}

    def __sklearn_tags__(self):
        """scikit-learn's estimator tags (only scikit-learn calls this, so it is installed then):
        an outlier detector whose ``fit`` takes labels."""
        from sklearn.utils import Tags, TargetTags

        return Tags(estimator_type="outlier_detector", target_tags=TargetTags(required=True))

    def set_params(self, **params) -> "Detector":
        """Re-run the constructor with some arguments changed; drops any fitted state."""
        unknown = sorted(set(params) - set(self._PARAMS))
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not a Detector parameter; expected "
                             f"{', '.join(self._PARAMS)}")
        self.__init__(**{**self.get_params(), **params})
        self._state = None
        return self

    @property
    def kind(self) -> str:
        """The method: the feature kind ("flipad", "raw", "dct", "sm_f")."""
        return self.feature_config.kind

    # -- fitted attributes ---------------------------------------------------------------------

    @property
    def state_(self) -> DetectorState:
        if getattr(self, "_state", None) is None:
            raise ValueError("this Detector is not fitted: call fit(...) or Detector.load(path)")
        return self._state

    center_ = property(lambda self: self.state_.model.center)
    model_ = property(lambda self: self.state_.model)
    thresholds_ = property(lambda self: self.state_.thresholds)
    val_scores_ = property(lambda self: self.state_.val_scores)
    standardizer_ = property(lambda self: self.state_.standardizer)
    channels_ = property(lambda self: self.state_.channels)
    feature_shape_ = property(lambda self: self.state_.feature_shape)
    input_shape_ = property(lambda self: self.state_.input_shape)
    network_ = property(lambda self: self.state_.network)
    losses_ = property(lambda self: self.state_.losses)
    threshold_ = property(lambda self: self.thresholds_[self.fnrs[0]])

    @property
    def image_shape_(self) -> Optional[tuple]:
        """The per-image shape this detector takes: the one it was fitted on, else (FLIPAD
        fitted on precomputed features) its head's output shape; None if neither is known."""
        if self.input_shape_ is not None:
            return tuple(self.input_shape_)
        return None if self.head is None else tuple(self.head.out_shape)
    decision_scores_ = property(lambda self: self.val_scores_)
    labels_ = property(lambda self: (self.val_scores_ > self.threshold_).astype(np.int32))

    # -- features ------------------------------------------------------------------------------

    def features(self, x):
        """Unstandardised features of images ``x`` ``(B, C, H, W)``: what ``precomputed=True``
        expects (FLIPAD: the pooled inverted activations)."""
        return np.array(self.feature_config.extract(x, self.head, progress=self.progress),
                        np.float32)

    def features_and_inversion(self, x):
        """``(features(x), inversion)``: for FLIPAD also the
        :class:`~flipad_jax.head.InversionResult` of the same solve (unpooled z, the lasso's
        certificate, clipped pixels), so evidence needs no second solve; None for other kinds."""
        fc = self.feature_config
        if fc.kind != "flipad":
            return self.features(x), None
        res = self.head.invert_batches(x, fc.lam, batch_size=fc.invert_batch_size,
                                       progress=self.progress, options=fc.lasso)
        return np.array(downsample(res.z, fc.pool_to, fc.downsample), np.float32), res

    def _inputs(self, name: str, x, precomputed: bool, *, fitting: bool = False):
        """Features of ``x`` checked for dtype, finiteness and shape; numpy float32."""
        if np.ndim(x) < 2 or len(x) == 0:
            raise ValueError(f"{name} has shape {np.shape(x)}: expected a non-empty batch")
        if not precomputed:
            shape = tuple(np.shape(x)[1:])
            expected = None if fitting else self.input_shape_
            if expected is not None and shape != expected:
                raise ValueError(f"{name} has per-sample shape {shape}: expected {expected}, "
                                 "the image shape the detector was fitted on")
            x = self.features(x)
        else:
            check_floating(name, x)
            x = np.asarray(x, np.float32)
        if not np.all(np.isfinite(x)):
            count = int(x.size - np.isfinite(x).sum())
            raise ValueError(f"{name} holds {count} NaN/inf feature value(s): expected finite "
                             "features")
        if not fitting and tuple(x.shape[1:]) != self.feature_shape_:
            raise ValueError(f"{name} gives features of shape {tuple(x.shape[1:])}: expected "
                             f"{self.feature_shape_} (channels/size as at fit time)")
        return x

    def _standardize(self, standardizer, f):
        return f if standardizer is None else np.asarray(standardizer(f))

    # -- fit / score / predict ----------------------------------------------------------------

    def fit(self, x_model, x_other, x_val=None, *, precomputed: bool = False,
            val_fraction: float = 0.2, seed: int = 0) -> "Detector":
        """Fit on G's samples ``x_model`` (+1), other samples ``x_other`` (−1) and G's held-out
        validation samples ``x_val`` (thresholds only). Images ``(n, C, H, W)``, or features with
        ``precomputed=True``. Returns self.

        scikit-learn's form ``fit(X, y)``: ``y`` a 1-D label vector (1 = G's sample, 0 = any
        other), told apart from ``x_other`` by its rank (samples have at least two axes); G's
        samples are split at random (``seed``) into ``1 − val_fraction`` for training and
        ``val_fraction`` for the thresholds, unless ``x_val`` is given.
        """
        if np.ndim(x_other) == 1:
            x_model, x_other, x_val = split_labelled(x_model, x_other, x_val, val_fraction, seed)
        elif x_val is None:
            raise ValueError("x_val=None: expected G's validation samples (or labels y as the "
                             "second argument, scikit-learn's fit(X, y))")
        fc = self.feature_config
        for fnr in self.fnrs:
            if len(x_val) < min_validation_samples(fnr):
                raise ValueError(f"x_val has {len(x_val)} samples: expected at least "
                                 f"{min_validation_samples(fnr)} for fnr={fnr}")
        f_model = self._inputs("x_model", x_model, precomputed, fitting=True)
        f_other = self._inputs("x_other", x_other, precomputed, fitting=True)
        f_val = self._inputs("x_val", x_val, precomputed, fitting=True)
        shape = f_model.shape[1:]
        for name, f in (("x_other", f_other), ("x_val", f_val)):
            if f.shape[1:] != shape:
                raise ValueError(f"{name} gives features of shape {f.shape[1:]}: expected "
                                 f"{shape}, the shape of x_model's features")

        on = fc.standardize_on
        standardizer = None if on is None else Standardizer.fit(
            f_model if on == "inliers" else np.concatenate([f_model, f_other]), fc.std_eps)
        f_model, f_other, f_val = (self._standardize(standardizer, f)
                                   for f in (f_model, f_other, f_val))
        channels = (None if fc.top_k is None
                    else top_channels(f_model, f_other, fc.top_k).tolist())
        if fc.kind == "sm_f":
            self._net, network, losses = None, None, np.zeros((0,), np.float32)
            model = FingerprintModel(prnu_fingerprint(f_model))
        else:
            x = np.concatenate([f_model, f_other])
            y = np.r_[np.ones(len(f_model), np.int32), -np.ones(len(f_other), np.int32)]
            fitted = fit_deepsad(x, y, self.training, progress=self.progress,
                                 extra_network_kwargs=None if channels is None
                                 else {"channels": channels})
            self._net, network, model, losses = (fitted.net, fitted.network, fitted.model,
                                                 fitted.log.loss)
        val_scores = self._scores(model, f_val)
        self._state = DetectorState(
            network=network, model=model, standardizer=standardizer, channels=channels,
            thresholds={fnr: threshold(val_scores, fnr) for fnr in self.fnrs},
            val_scores=val_scores, feature_shape=tuple(shape),
            input_shape=None if precomputed else tuple(np.shape(x_model)[1:]), losses=losses)
        return self

    def _scores(self, model, f):
        if isinstance(model, FingerprintModel):
            return sm_f_scores(model.fingerprint, f)
        return deepsad_score(self._net, model, f, batch_size=self.training.score_batch_size,
                             progress=self.progress)

    def anomaly_score(self, x, *, precomputed: bool = False) -> np.ndarray:
        """Anomaly scores ``(n,)`` float32, higher = less likely made by G: ‖φ(x) − c‖²
        (DeepSAD) or −⟨f_G, r̂(x)⟩ (SM-F)."""
        state = self.state_
        f = self._standardize(state.standardizer, self._inputs("x", x, precomputed))
        return self._scores(state.model, f)

    def score_samples(self, x, *, precomputed: bool = False) -> np.ndarray:
        """scikit-learn's sign: −anomaly score ``(n,)``, lower = less likely made by G."""
        return -self.anomaly_score(x, precomputed=precomputed)

    def decision_function(self, x, fnr: Optional[float] = None, *,
                          precomputed: bool = False) -> np.ndarray:
        """scikit-learn's sign: τ(fnr) − anomaly score ``(n,)``; ≥ 0 where x is attributed to
        G, < 0 where not (fnr: as in :meth:`made_by_g`)."""
        tau = self.threshold(self.fnrs[0] if fnr is None else fnr)
        return (tau - self.anomaly_score(x, precomputed=precomputed)).astype(np.float32)

    def p_value(self, x, *, precomputed: bool = False) -> np.ndarray:
        """Split-conformal p-values of "made by G" from the validation scores, ``(n,)``
        (:func:`flipad_jax.metrics.p_values`): rejecting where p ≤ α has false-negative rate
        ≤ α for samples of G exchangeable with the validation set."""
        return p_values(self.val_scores_, self.anomaly_score(x, precomputed=precomputed))

    def threshold(self, fnr: float) -> float:
        """τ(fnr): fitted value, or the (1 − fnr) quantile of ``val_scores_`` for another fnr."""
        fnr = check_fnr(fnr)
        fitted = self.thresholds_
        return fitted[fnr] if fnr in fitted else threshold(self.val_scores_, fnr)

    def made_by_g(self, x, fnr: Optional[float] = None, *, precomputed: bool = False
                  ) -> np.ndarray:
        """``(n,)`` bool, True where x is attributed to G (anomaly score ≤ τ(fnr)); fnr
        defaults to the smallest fitted one (the paper's 0.005 with the default ``fnrs``)."""
        tau = self.threshold(self.fnrs[0] if fnr is None else fnr)
        return made_by_g(self.anomaly_score(x, precomputed=precomputed), tau)

    def predict(self, x, fnr: Optional[float] = None, *, precomputed: bool = False
                ) -> np.ndarray:
        """scikit-learn's outlier labels ``(n,)`` int32: +1 made by G (inlier), −1 not."""
        return np.where(self.made_by_g(x, fnr, precomputed=precomputed), 1, -1).astype(np.int32)

    def score(self, x, y, *, precomputed: bool = False) -> float:
        """scikit-learn's ``score(X, y)``: accuracy of :meth:`made_by_g` at the first fnr
        against labels y (1 = G's sample, 0 = not); what ``cross_val_score`` maximises."""
        y = check_labels("y", y, len(x), LABELS)
        return float(np.mean(self.made_by_g(x, precomputed=precomputed) == (y == 1)))

    # -- persistence ---------------------------------------------------------------------------

    def save(self, path, *, overwrite: bool = False):
        """Write the fitted detector to the folder ``path`` (atomically); returns the path."""
        from flipad_jax import detector_io

        return detector_io.save(path, self, overwrite=overwrite)

    @classmethod
    def load(cls, path, *, head=None, progress: Optional[bool] = None) -> "Detector":
        """Read a detector written by :meth:`save`.

        Args:
          head: the generator's Head, needed to score *images* with FLIPAD features; it must be
            the head the detector was fitted with (checked by fingerprint; a mismatch raises
            :class:`~flipad_jax.detector_io.HeadMismatchError`). None: the head the folder
            carries (a detector fitted on a bundle's head embeds it), checked the same way.
            Precomputed features need no head.
          progress: override the saved progress setting.
        """
        from flipad_jax import detector_io
        from flipad_jax.networks import build_network

        saved = detector_io.load(path, head=head)
        det = cls.__new__(cls)
        det.feature_config, det.training, det.fnrs = saved.features, saved.training, saved.fnrs
        det.progress = saved.progress if progress is None else progress
        det.head = saved.head_object
        network = saved.state.network
        det._net = None if network is None else build_network(network[0], **network[1])
        det._state = saved.state
        return det

    def __repr__(self):
        state = "fitted" if getattr(self, "_state", None) is not None else "not fitted"
        return f"Detector(features={self.feature_config.kind!r}, {state})"
