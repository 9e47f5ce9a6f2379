"""FLIPAD features on disk: what ``flipad invert`` writes and ``fit``/``score --features-from``
read, so the costly inversion can be sharded over machines, cached, and trained on once.

A feature file is ``NAME.npy`` (float32 ``(B, C, h, w)``: the lasso solutions z, max-pooled to
``pooled_to`` or not) with its sidecar ``NAME.json``: the head's fingerprint
(:func:`flipad_jax.detector_io.head_fingerprint`), λ, the solver's :class:`LassoOptions`, the
pooling, and per-sample diagnostics. Reading checks each file's sidecar against the detector it
is for (same head, same λ and solver settings, a pooling it can use), so features of another
head or another solve are refused rather than scored.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from flipad_jax._checks import check_fields
from flipad_jax._files import atomic_file

FORMAT = "flipad-jax features"
REQUIRED = ("head_fingerprint", "lam", "lasso", "pooled_to", "shape", "samples")


def sidecar_path(npy) -> Path:
    return Path(npy).with_suffix(".json")


def write_feature_file(out, z, *, head, lam: float, options, pooled_to: Optional[int],
                       samples: list) -> Path:
    """Write features ``z`` ``(B, C, h, w)`` and their sidecar beside each other, atomically
    (both are written whole before either is moved into place); returns the .npy path."""
    from flipad_jax.detector_io import head_fingerprint

    out = Path(out)
    meta = {"format": FORMAT, "head_fingerprint": head_fingerprint(head), "lam": float(lam),
            "lasso": options.to_json(), "pooled_to": pooled_to,
            "shape": list(np.shape(z)[1:]), "samples": samples}
    with atomic_file(sidecar_path(out)) as tmp_json, atomic_file(out, suffix=".npy") as tmp_npy:
        np.save(tmp_npy, np.asarray(z, np.float32))
        tmp_json.write_text(json.dumps(meta))
    return out


def read_sidecar(npy) -> dict:
    """The checked sidecar of the feature file ``npy``, parsed once per version of the file
    (scoring reads it again for every batch; its per-sample list grows with the file)."""
    path = sidecar_path(npy)
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise ValueError(f"{npy}: no sidecar {path}: expected a feature file written by "
                         "`flipad invert`") from None
    return _parsed_sidecar(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _parsed_sidecar(path: str, mtime_ns: int, size: int) -> dict:
    try:
        meta = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format') if isinstance(meta, dict) else meta!r},"
                         f" expected {FORMAT!r} (a sidecar written by `flipad invert`)")
    return check_fields(path, meta, REQUIRED, "a complete sidecar written by `flipad invert`")


def _solver_options(path, meta: dict):
    """The sidecar's solver settings as :class:`LassoOptions`: compared as options, not dicts,
    so a sidecar written before a field existed holds the value that field's behaviour had
    then (:meth:`LassoOptions.from_json`)."""
    from flipad_jax.lasso import LassoOptions

    try:
        return LassoOptions.from_json(meta["lasso"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: solver settings {meta['lasso']!r} are not LassoOptions "
                         f"({error}): expected a sidecar written by `flipad invert`") from None


def solve_settings(paths: Sequence) -> tuple:
    """``(head_fingerprint, lam, LassoOptions)`` the feature files ``paths`` share; a ValueError
    naming the first file that differs."""
    first = None
    for path in paths:
        meta = read_sidecar(path)
        settings = (meta["head_fingerprint"], meta["lam"], _solver_options(path, meta))
        if first is None:
            first = (path, settings)
        elif settings != first[1]:
            raise ValueError(f"{path}: features of another head or solve than {first[0]} "
                             "(head fingerprint, λ or solver settings differ): expected one "
                             "inversion's features")
    return first[1]


def check_for_detector(meta: dict, path, detector) -> None:
    """Refuse features that ``detector`` did not (or could not) make itself."""
    from flipad_jax.detector_io import head_fingerprint

    fc = detector.feature_config
    if fc.kind != "flipad":
        raise ValueError(f"{path}: FLIPAD features, but the detector is {fc.kind!r}: expected a "
                         "FLIPAD detector")
    if detector.head is None:
        raise ValueError(f"{path}: the detector has no head to check the features' head "
                         "against: expected it loaded with its head (head=, or the one it "
                         "carries)")
    if meta["head_fingerprint"] != head_fingerprint(detector.head):
        raise ValueError(f"{path}: inverted with another head (fingerprint "
                         f"{meta['head_fingerprint'][:12]}…): expected the detector's head")
    if meta["lam"] != fc.lam or _solver_options(path, meta) != fc.lasso:
        raise ValueError(f"{path}: solved with λ={meta['lam']:g} and {meta['lasso']}, the "
                         f"detector's features use λ={fc.lam:g} and {fc.lasso.to_json()}: "
                         "expected the same solve")
    if meta["pooled_to"] is not None and (meta["pooled_to"], "maxpool") != (fc.pool_to,
                                                                           fc.downsample):
        raise ValueError(f"{path}: max-pooled to {meta['pooled_to']}, the detector reduces by "
                         f"{fc.downsample} to {fc.pool_to}: expected unpooled features or the "
                         "same pooling")


def check_files(refs, detector) -> None:
    """Check the sidecar of every feature file ``refs`` name against ``detector``, before
    anything is read or written."""
    for path in sorted({r.path for r in refs}):
        check_for_detector(read_sidecar(path), path, detector)


def read_feature_rows(refs, detector) -> np.ndarray:
    """The detector's (unstandardised) features of ``refs`` (rows of feature files, from
    :func:`flipad_jax.images.list_images`), float32, reduced as the detector reduces
    (``FeatureConfig.downsample`` to ``pool_to``)."""
    from flipad_jax.features import check_solved, downsample
    from flipad_jax.images import group_refs

    parts = []
    for path, rows in group_refs(refs):
        meta = read_sidecar(path)
        check_for_detector(meta, path, detector)
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as error:
            raise ValueError(f"{path}: not a readable .npy array ({error})") from None
        if len(arr) != len(meta["samples"]) or list(arr.shape[1:]) != meta["shape"]:
            raise ValueError(f"{path}: array of shape {arr.shape}, its sidecar describes "
                             f"{len(meta['samples'])} rows of {meta['shape']}: expected the "
                             "file `flipad invert` wrote")
        if rows[0] < 0 or rows[-1] >= len(arr):
            raise ValueError(f"{path}: rows {rows[0]}..{rows[-1]} are not rows of its "
                             f"{len(arr)} features")
        check_solved(np.asarray([meta["samples"][i]["status"] for i in rows]), path=path)
        z = np.asarray(arr[rows], np.float32)
        fc = detector.feature_config
        if meta["pooled_to"] is None and fc.pool_to is not None:
            z = np.asarray(downsample(z, fc.pool_to, fc.downsample))
        parts.append(z)
    if not parts:
        raise ValueError("refs=[]: expected at least one feature row")
    return np.concatenate(parts)
