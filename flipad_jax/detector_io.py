"""The on-disk format of a fitted :class:`~flipad_jax.Detector` (as :mod:`flipad_jax.bundle` is
the head's).

A detector folder is a :mod:`flipad_jax.checkpoint`: ``meta.json`` holds the settings
(:class:`~flipad_jax.features.FeatureConfig`, :class:`~flipad_jax.deepsad.DeepSADConfig`, fnrs),
the non-array part of the :class:`~flipad_jax.detector.DetectorState` (network, thresholds,
shapes, channels, losses), the head's fingerprint and the library versions; ``arrays/`` holds the
network variables, the centre, the validation scores and the standardisation statistics.
Restoring goes against the abstract state (``jax.eval_shape`` of the network's init), so a file
whose arrays differ from what its metadata promises fails instead of loading.

A FLIPAD detector whose head came from a bundle (``Head.load``) carries that bundle in
``head/`` (:data:`HEAD_DIR`), so one folder is all a deployer ships; loading without a head
reads it and checks it against the fingerprint in ``meta.json``. A head built in Python (no
bundle metadata) is not embedded; such a detector needs ``head=`` to score images.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from flipad_jax import checkpoint
from flipad_jax._checks import check_fields
from flipad_jax.bundle import Bundle, write_bundle_files
from flipad_jax.deepsad import DeepSADConfig, DeepSADModel
from flipad_jax.detector import DetectorState, FingerprintModel
from flipad_jax.features import FeatureConfig, Standardizer

FORMAT = "flipad-jax detector"
FORMAT_VERSION = 2  # 2: settings as FeatureConfig / DeepSADConfig objects
REQUIRED = ("head", "features", "training", "fnrs", "network", "feature_shape", "input_shape",
            "channels", "losses", "thresholds", "rep_dim", "n_val", "standardizer")


HEAD_DIR = "head"


class HeadMismatchError(ValueError):
    """The head passed to :func:`load` is not the one the detector was fitted with."""


class SavedDetector(NamedTuple):
    features: FeatureConfig
    training: DeepSADConfig
    fnrs: tuple
    progress: bool
    state: DetectorState
    head: Optional[dict]  # the fitted head's fingerprint, shapes, activation and source
    head_object: object  # the Head passed to load, or the embedded one, or None


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


def versions() -> dict:
    out = {}
    for pkg in ("flipad-jax", "jax", "flax", "optax", "orbax-checkpoint"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _arrays(state: DetectorState) -> dict:
    arrays = dict(state.model._asdict(), val_scores=state.val_scores)
    if state.standardizer is not None:
        arrays["std_mean"], arrays["std_std"] = state.standardizer.mean, state.standardizer.std
    return arrays


def save(path, detector, *, overwrite: bool = False):
    """Write a fitted detector to the folder ``path`` (atomically); returns the path."""
    state, head = detector.state_, detector.head
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "versions": versions(),
        "features": detector.feature_config.to_json(), "training": detector.training.to_json(),
        "fnrs": list(detector.fnrs), "progress": detector.progress,
        "network": None if state.network is None else {"name": state.network[0],
                                                       "kwargs": state.network[1]},
        "thresholds": [[fnr, tau] for fnr, tau in sorted(state.thresholds.items())],
        "feature_shape": list(state.feature_shape),
        "input_shape": None if state.input_shape is None else list(state.input_shape),
        "channels": state.channels,
        "rep_dim": (int(state.model.center.shape[0]) if isinstance(state.model, DeepSADModel)
                    else None),
        "n_val": int(len(state.val_scores)),
        "standardizer": None if state.standardizer is None else {"eps": state.standardizer.eps},
        "losses": [float(v) for v in state.losses],
        "head": None if head is None else {
            "fingerprint": head_fingerprint(head), "in_shape": list(head.in_shape),
            "out_shape": list(head.out_shape), "activation": head.activation.name,
            "source": head.meta.get("source")},
    }
    embed = head is not None and "layer" in head.meta  # a head read from a bundle
    if meta["head"] is not None:
        # what the fingerprint leaves out but the solve uses: checked on the embedded copy
        meta["head"].update(embedded=embed, dtype=str(head.op.dtype), lipschitz=head.lipschitz,
                            output_range=None if head.output_range is None
                            else list(head.output_range))

    def write_head(folder):
        (folder / HEAD_DIR).mkdir()
        bias = None if head.bias is None else np.asarray(head.bias)
        write_bundle_files(folder / HEAD_DIR, Bundle(head.meta, np.asarray(head.op.weight), bias,
                                                     np.asarray(head.zbar)))

    return checkpoint.save(path, _arrays(state), meta, overwrite=overwrite,
                           write_extra=write_head if embed else None)


def _embedded_head(path, saved: dict):
    """The head a detector folder carries, checked against what ``meta.json`` recorded."""
    from flipad_jax.head import Head

    folder = embedded_bundle(path)
    if folder is None:
        raise HeadMismatchError(f"{path}: its meta.json says it carries its head in "
                                f"{HEAD_DIR}/, which is missing: expected the folder whole")
    head = Head.load(folder, dtype=jnp.dtype(saved.get("dtype", "float32")))
    found = (head.lipschitz, None if head.output_range is None else list(head.output_range))
    if found != (saved["lipschitz"], saved["output_range"]):
        raise HeadMismatchError(f"{folder}: lipschitz and output range {found}, fitted with "
                                f"{(saved['lipschitz'], saved['output_range'])}: expected the "
                                "head bundle the detector was fitted with")
    return head


def embedded_bundle(path):
    """The head bundle folder a detector at ``path`` carries, or None."""
    folder = Path(path) / HEAD_DIR
    return folder if folder.is_dir() else None


def read_meta(path) -> dict:
    """The checked metadata of a detector folder (format, version and required fields)."""
    meta = checkpoint.load_meta(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta.get('format_version')!r} (written by "
                         f"flipad-jax {meta.get('versions', {}).get('flipad-jax')}), expected "
                         f"{FORMAT_VERSION}; re-fit or load it with that version")
    return check_fields(f"{path}: its metadata", meta, REQUIRED,
                        "a complete detector checkpoint written by Detector.save")


def check_head(path, meta: dict, head) -> None:
    """Raise :class:`HeadMismatchError` unless ``head`` is the head the detector was fitted
    with (None always passes: precomputed features need no head)."""
    saved = meta["head"]
    if head is None:
        return
    if saved is None:
        raise HeadMismatchError(f"head: {path} was fitted without a head; pass head=None")
    if head_fingerprint(head) != saved["fingerprint"]:
        raise HeadMismatchError(f"head: its fingerprint {head_fingerprint(head)[:12]}… differs "
                                f"from the fitted head's {saved['fingerprint'][:12]}…: expected "
                                "the generator head the detector was fitted with")


def load(path, *, head=None) -> SavedDetector:
    """Read a detector folder written by :func:`save`, checking ``head`` against it; without
    one, the embedded head (if any) is read and checked (``SavedDetector.head_object``)."""
    from flipad_jax.networks import build_network

    meta = read_meta(path)
    if head is None and (meta["head"] or {}).get("embedded"):
        head = _embedded_head(path, meta["head"])
    check_head(path, meta, head)
    feature_shape = tuple(meta["feature_shape"])
    f32 = jnp.float32
    target = {"val_scores": jax.ShapeDtypeStruct((meta["n_val"],), f32)}
    if meta["network"] is None:  # SM-F
        network, model_type = None, FingerprintModel
        target["fingerprint"] = jax.ShapeDtypeStruct(feature_shape, f32)
    else:
        network, model_type = (meta["network"]["name"], meta["network"]["kwargs"]), DeepSADModel
        net = build_network(network[0], **network[1])
        target["variables"] = jax.eval_shape(net.init, jax.random.key(0),
                                             jnp.zeros((1,) + feature_shape, f32))
        target["center"] = jax.ShapeDtypeStruct((meta["rep_dim"],), f32)
    if meta["standardizer"] is not None:
        target["std_mean"] = target["std_std"] = jax.ShapeDtypeStruct(feature_shape, f32)
    arrays = jax.tree_util.tree_map(jnp.asarray, checkpoint.load_arrays(path, target))
    standardizer = None if meta["standardizer"] is None else Standardizer(
        arrays["std_mean"], arrays["std_std"], meta["standardizer"]["eps"])
    model = model_type(**{k: arrays[k] for k in model_type._fields})
    state = DetectorState(
        network=network, model=model,
        standardizer=standardizer, channels=meta["channels"],
        thresholds={float(f): float(t) for f, t in meta["thresholds"]},
        val_scores=np.asarray(arrays["val_scores"]), feature_shape=feature_shape,
        input_shape=None if meta["input_shape"] is None else tuple(meta["input_shape"]),
        losses=np.asarray(meta["losses"], np.float32))
    return SavedDetector(FeatureConfig(**meta["features"]), DeepSADConfig(**meta["training"]),
                         tuple(meta["fnrs"]), bool(meta["progress"]), state, meta["head"], head)
