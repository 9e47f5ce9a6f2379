"""``fj.Detector``: "made by G?" from FLIPAD, RawPAD or DCTPAD features with DeepSAD.

PyOD's vocabulary: ``fit`` learns from G's samples (inliers, +1) and other samples (real data or
another model's, outliers, −1); ``score(x)`` is higher for samples *less* likely made by G;
``predict(x, fnr=...)`` is True where x is attributed to G, i.e. score ≤ τ(fnr), with τ the
(1 − fnr) quantile of G's validation scores. Fitted attributes end in ``_``.

Pipeline (paper §4, METHOD.md §4): features (:mod:`flipad_jax.features`) → standardisation fitted
on the training data (FLIPAD: inliers; DCTPAD: all; RawPAD: none) → optional top-k channel
selection → DeepSAD (:mod:`flipad_jax.deepsad`) → thresholds on G's validation scores.

Every method takes images ``(B, C, H, W)`` or, with ``precomputed=True``, features already
extracted (``detector.features(images)``, e.g. pooled ``head.invert(images).z`` computed elsewhere);
the feature and standardisation steps after extraction are always the detector's.

``save(path)`` writes orbax arrays and a JSON of config, thresholds, feature settings, head
fingerprint and versions (:mod:`flipad_jax.checkpoint`); ``Detector.load(path)`` scores
bit-identically.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flipad_jax import checkpoint
from flipad_jax._checks import check_floating
from flipad_jax.deepsad import DeepSAD, DeepSADModel, score as deepsad_score
from flipad_jax.features import STANDARDIZE_ON, STD_EPS, FeatureConfig, Standardizer, top_channels
from flipad_jax.metrics import check_fnr, min_validation_samples, threshold
from flipad_jax.networks import build_network

FORMAT = "flipad-jax detector"
FORMAT_VERSION = 1
DEFAULT_FNRS = (0.005, 0.05)


def head_fingerprint(head) -> str:
    """sha256 of a head's operator arrays, geometry, activation and z̄ (identifies G's layer)."""
    h = hashlib.sha256()
    h.update(repr(head.op).encode())
    h.update(head.activation.name.encode())
    for leaf in jax.tree_util.tree_leaves(head.op) + [head.zbar]:
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _versions() -> dict:
    out = {}
    for pkg in ("flipad-jax", "jax", "flax", "optax", "orbax-checkpoint"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


class Detector:
    """Single-model attribution detector (FLIPAD, RawPAD or DCTPAD + DeepSAD).

    Args:
      features: "flipad" (needs ``head``), "raw" or "dct".
      head: the generator's :class:`~flipad_jax.Head` (FLIPAD).
      network: a name of :data:`flipad_jax.networks.ARCHITECTURES`; default chosen from the
        feature shape (:func:`~flipad_jax.networks.default_network`).
      network_kwargs: overrides for the network (e.g. ``rep_dim``, ``widths``).
      top_k: keep the k channels whose inlier/outlier means differ most (None: all).
      fnrs: false-negative rates whose thresholds are fitted (any other on request).
      epochs, lr, lr_milestones, lr_gamma, weight_decay, batch_size, eta, center_eps: DeepSAD
        training (paper defaults; see :func:`~flipad_jax.deepsad.train_deepsad`).
      std_eps: the +0.05 of the standardisation.
      lam, pool_to, invert_kwargs: FLIPAD's λ, max-pool size and extra ``head.invert`` arguments.
      size: RawPAD's resize target. crop: DCTPAD's centre crop.
      seed: seed of the network initialisation and the shuffling.
      score_batch_size: batch size of scoring (sharded over local devices).
      progress: show progress bars.

    Fitted attributes: ``center_`` (rep_dim,), ``thresholds_`` {fnr: τ}, ``val_scores_`` (n_val,),
    ``model_`` (:class:`~flipad_jax.deepsad.DeepSADModel`), ``standardizer_`` (or None),
    ``channels_`` (selected channel indices or None), ``feature_shape_``, ``input_shape_``
    (image shape seen by ``fit``, None for precomputed features), ``network_`` (name, kwargs),
    ``losses_`` (per-epoch training loss).
    """

    def __init__(self, features: str = "flipad", *, head=None, network: Optional[str] = None,
                 network_kwargs: Optional[dict] = None, top_k: Optional[int] = None,
                 fnrs: Sequence[float] = DEFAULT_FNRS, epochs: int = 50, lr: float = 5e-4,
                 lr_milestones: Sequence[int] = (25, 50, 100), lr_gamma: float = 0.1,
                 weight_decay: float = 5e-7, batch_size: int = 128, eta: float = 1.0,
                 center_eps: float = 0.1, std_eps: float = STD_EPS, lam: float = 5e-4,
                 pool_to: Optional[int] = 32, size: Optional[int] = 32,
                 crop: Optional[int] = 32, invert_kwargs: Optional[dict] = None, seed: int = 0,
                 score_batch_size: int = 1024, progress: bool = True):
        self.feature_config = FeatureConfig(features, lam=lam, pool_to=pool_to, size=size,
                                            crop=crop, invert_kwargs=dict(invert_kwargs or {}))
        if features == "flipad" and head is None:
            raise ValueError("head=None: features='flipad' needs the generator's Head")
        self.head = head
        fnrs = tuple(sorted({check_fnr(f) for f in fnrs}))
        if not fnrs:
            raise ValueError("fnrs=(): expected at least one false-negative rate")
        if top_k is not None and not (isinstance(top_k, (int, np.integer)) and top_k >= 1):
            raise ValueError(f"top_k={top_k!r}: expected None or an int >= 1")
        self.config = dict(network=network, network_kwargs=dict(network_kwargs or {}),
                           top_k=top_k, fnrs=list(fnrs), epochs=epochs, lr=lr,
                           lr_milestones=list(lr_milestones), lr_gamma=lr_gamma,
                           weight_decay=weight_decay, batch_size=batch_size, eta=eta,
                           center_eps=center_eps, std_eps=std_eps, seed=seed,
                           score_batch_size=score_batch_size, progress=progress)

    # -- features ------------------------------------------------------------------------------

    def features(self, x):
        """Unstandardised features of images ``x`` ``(B, C, H, W)``: what ``precomputed=True``
        expects (FLIPAD: the pooled inverted activations)."""
        return np.array(self.feature_config.extract(x, self.head,
                                                    progress=self.config["progress"]),
                        np.float32)

    def _inputs(self, name: str, x, precomputed: bool, *, fitting: bool = False):
        """Features of ``x`` checked for dtype, finiteness and shape; numpy float32."""
        if np.ndim(x) < 2 or len(x) == 0:
            raise ValueError(f"{name} has shape {np.shape(x)}: expected a non-empty batch")
        if not precomputed:
            shape = tuple(np.shape(x)[1:])
            expected = getattr(self, "input_shape_", None)
            if not fitting and expected is not None and shape != expected:
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
        expected = getattr(self, "feature_shape_", None)
        if not fitting and tuple(x.shape[1:]) != expected:
            raise ValueError(f"{name} gives features of shape {tuple(x.shape[1:])}: expected "
                             f"{expected} (channels/size as at fit time)")
        return x

    def _standardize(self, f):
        return f if self.standardizer_ is None else np.asarray(self.standardizer_(f))

    # -- fit / score / predict ----------------------------------------------------------------

    def fit(self, x_model, x_other, x_val, *, precomputed: bool = False) -> "Detector":
        """Fit on G's samples ``x_model`` (+1), other samples ``x_other`` (−1) and G's held-out
        validation samples ``x_val`` (thresholds only). Images ``(n, C, H, W)``, or features with
        ``precomputed=True``. Returns self."""
        cfg = self.config
        n_val = len(x_val)
        for fnr in cfg["fnrs"]:
            if n_val < min_validation_samples(fnr):
                raise ValueError(f"x_val has {n_val} samples: expected at least "
                                 f"{min_validation_samples(fnr)} for fnr={fnr}")
        f_model = self._inputs("x_model", x_model, precomputed, fitting=True)
        f_other = self._inputs("x_other", x_other, precomputed, fitting=True)
        f_val = self._inputs("x_val", x_val, precomputed, fitting=True)
        shape = f_model.shape[1:]
        for name, f in (("x_other", f_other), ("x_val", f_val)):
            if f.shape[1:] != shape:
                raise ValueError(f"{name} gives features of shape {f.shape[1:]}: expected "
                                 f"{shape}, the shape of x_model's features")
        self.input_shape_ = None if precomputed else tuple(np.shape(x_model)[1:])
        self.feature_shape_ = tuple(shape)

        on = STANDARDIZE_ON[self.feature_config.kind]
        self.standardizer_ = None if on is None else Standardizer.fit(
            f_model if on == "inliers" else np.concatenate([f_model, f_other]), cfg["std_eps"])
        f_model, f_other, f_val = map(self._standardize, (f_model, f_other, f_val))

        self.channels_ = None
        if cfg["top_k"] is not None:
            self.channels_ = top_channels(f_model, f_other, cfg["top_k"]).tolist()
        kwargs = dict(cfg["network_kwargs"])
        if self.channels_ is not None:
            kwargs["channels"] = self.channels_
        sad = DeepSAD(cfg["network"], kwargs, seed=cfg["seed"],
                      score_batch_size=cfg["score_batch_size"], epochs=cfg["epochs"],
                      lr=cfg["lr"], lr_milestones=cfg["lr_milestones"],
                      lr_gamma=cfg["lr_gamma"], weight_decay=cfg["weight_decay"],
                      batch_size=cfg["batch_size"], eta=cfg["eta"],
                      center_eps=cfg["center_eps"], progress=cfg["progress"])
        x = np.concatenate([f_model, f_other])
        y = np.r_[np.ones(len(f_model), np.int32), -np.ones(len(f_other), np.int32)]
        sad.fit(x, semi_targets=y)
        self.network_, self._net, self.model_, self.losses_ = (sad.network_, sad.net_,
                                                               sad.model_, sad.losses_)
        self.val_scores_ = self._score_features(f_val)
        self.thresholds_ = {fnr: threshold(self.val_scores_, fnr) for fnr in cfg["fnrs"]}
        return self

    @property
    def center_(self):
        self._check_fitted()
        return self.model_.center

    def _check_fitted(self):
        if not hasattr(self, "model_"):
            raise ValueError("this Detector is not fitted: call fit(...) or Detector.load(path)")

    def _score_features(self, f):
        return deepsad_score(self._net, self.model_, f, batch_size=self.config["score_batch_size"],
                             progress=self.config["progress"])

    def score(self, x, *, precomputed: bool = False) -> np.ndarray:
        """Anomaly scores ‖φ(x) − c‖², ``(n,)`` float32: higher = less likely made by G."""
        self._check_fitted()
        return self._score_features(self._standardize(self._inputs("x", x, precomputed)))

    decision_function = score  # PyOD's name

    def threshold(self, fnr: float) -> float:
        """τ(fnr): fitted value, or the (1 − fnr) quantile of ``val_scores_`` for another fnr."""
        self._check_fitted()
        fnr = check_fnr(fnr)
        if fnr in self.thresholds_:
            return self.thresholds_[fnr]
        return threshold(self.val_scores_, fnr)

    def predict(self, x, fnr: Optional[float] = None, *, precomputed: bool = False
                ) -> np.ndarray:
        """``(n,)`` bool, True where x is attributed to G (score ≤ τ(fnr)); fnr defaults to the
        smallest fitted one (the paper's 0.005 with the default ``fnrs``)."""
        tau = self.threshold(self.config["fnrs"][0] if fnr is None else fnr)
        return self.score(x, precomputed=precomputed) <= tau

    # -- persistence ---------------------------------------------------------------------------

    def _arrays(self):
        arrays = {"variables": self.model_.variables, "center": self.model_.center,
                  "val_scores": self.val_scores_}
        if self.standardizer_ is not None:
            arrays["std_mean"] = self.standardizer_.mean
            arrays["std_std"] = self.standardizer_.std
        return arrays

    def save(self, path, *, overwrite: bool = False):
        """Write the fitted detector to the folder ``path`` (atomically); returns the path."""
        self._check_fitted()
        meta = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "versions": _versions(),
            "config": self.config, "features": self.feature_config.to_json(),
            "network": {"name": self.network_[0], "kwargs": self.network_[1]},
            "thresholds": [[fnr, tau] for fnr, tau in sorted(self.thresholds_.items())],
            "feature_shape": list(self.feature_shape_),
            "input_shape": None if self.input_shape_ is None else list(self.input_shape_),
            "channels": self.channels_,
            "rep_dim": int(self.model_.center.shape[0]), "n_val": int(len(self.val_scores_)),
            "standardizer": None if self.standardizer_ is None else
            {"eps": self.standardizer_.eps},
            "losses": [float(v) for v in self.losses_],
            "head": None if self.head is None else {
                "fingerprint": head_fingerprint(self.head), "in_shape": list(self.head.in_shape),
                "out_shape": list(self.head.out_shape), "activation": self.head.activation.name,
                "source": self.head.meta.get("source")},
        }
        return checkpoint.save(path, self._arrays(), meta, overwrite=overwrite)

    @classmethod
    def load(cls, path, *, head=None, progress: Optional[bool] = None) -> "Detector":
        """Read a detector written by :meth:`save`.

        Args:
          head: the generator's Head, needed to score *images* with FLIPAD features; it must be
            the head the detector was fitted with (checked by fingerprint). Precomputed features
            need no head.
          progress: override the saved progress setting.
        """
        meta = checkpoint.load_meta(path)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: format_version {meta.get('format_version')!r} (written by "
                             f"flipad-jax {meta.get('versions', {}).get('flipad-jax')}), expected "
                             f"{FORMAT_VERSION}; re-fit or load it with that version")
        required = ("head", "config", "features", "network", "feature_shape", "input_shape",
                    "channels", "losses", "thresholds", "rep_dim")
        missing = [key for key in required if key not in meta]
        if missing:
            raise ValueError(f"{path}: metadata lacks the field(s) {', '.join(missing)}: expected "
                             "a complete detector checkpoint written by Detector.save")
        saved_head = meta["head"]
        if head is not None:
            if saved_head is None:
                raise ValueError(f"head: {path} was fitted without a head; pass head=None")
            if head_fingerprint(head) != saved_head["fingerprint"]:
                raise ValueError(f"head: its fingerprint {head_fingerprint(head)[:12]}… differs "
                                 f"from the fitted head's {saved_head['fingerprint'][:12]}…: "
                                 "expected the generator head the detector was fitted with")
        config = dict(meta["config"])
        if progress is not None:
            config["progress"] = progress
        features = meta["features"]
        det = cls.__new__(cls)
        det.feature_config = FeatureConfig(**features)
        det.head = head
        det.config = config
        det.network_ = (meta["network"]["name"], meta["network"]["kwargs"])
        det._net = build_network(det.network_[0], **det.network_[1])
        det.feature_shape_ = tuple(meta["feature_shape"])
        det.input_shape_ = None if meta["input_shape"] is None else tuple(meta["input_shape"])
        det.channels_ = meta["channels"]
        det.losses_ = np.asarray(meta["losses"], np.float32)
        det.thresholds_ = {float(f): float(t) for f, t in meta["thresholds"]}

        variables = jax.eval_shape(det._net.init, jax.random.key(0),
                                   jnp.zeros((1,) + det.feature_shape_, jnp.float32))
        target = {"variables": variables,
                  "center": jax.ShapeDtypeStruct((meta["rep_dim"],), jnp.float32),
                  "val_scores": jax.ShapeDtypeStruct((meta["n_val"],), jnp.float32)}
        if meta["standardizer"] is not None:
            target["std_mean"] = jax.ShapeDtypeStruct(det.feature_shape_, jnp.float32)
            target["std_std"] = jax.ShapeDtypeStruct(det.feature_shape_, jnp.float32)
        arrays = checkpoint.load_arrays(path, target)
        det.model_ = DeepSADModel(jax.tree_util.tree_map(jnp.asarray, arrays["variables"]),
                                  jnp.asarray(arrays["center"]))
        det.val_scores_ = np.asarray(arrays["val_scores"])
        det.standardizer_ = None if meta["standardizer"] is None else Standardizer(
            jnp.asarray(arrays["std_mean"]), jnp.asarray(arrays["std_std"]),
            meta["standardizer"]["eps"])
        return det

    def __repr__(self):
        state = "fitted" if hasattr(self, "model_") else "not fitted"
        return f"Detector(features={self.feature_config.kind!r}, {state})"

