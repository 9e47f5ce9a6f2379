"""Per-sample evidence reports (``flipad score --report``, ``flipad explain``) and their check
(``flipad verify``).

A report folder, written atomically (it appears whole or not at all)::

    DIR/report.json            schema, the command, and the record files in input order
    DIR/samples/NNNNNN.json    one record per input image (the schema below)
    DIR/index.html             one self-contained page for readers (:mod:`flipad_jax.evidence_page`)

A record (JSON schema ``flipad_jax/schemas/evidence.schema.json``) holds what a third party needs
to check the claim "made by G" or not:

* ``image``: its name, absolute path, row index (``.npy`` rows) and SHA-256. An image file's
  hash is that of its bytes; an ``.npy`` row's is SHA-256(row bytes ‖ the file's hex SHA-256 ‖
  the decimal row index), with the file's hash beside it (``file_sha256``).
* ``bundle`` (null without one): path, SHA-256 of ``head.safetensors`` and of ``head.json``, and
  the source model's identity that ``flipad convert`` recorded in ``head.json`` (``source``).
* ``detector``: path, :func:`flipad_jax.scoring.detector_digest` of its folder, and its settings
  (``FeatureConfig.to_json()``, ``DeepSADConfig.to_json()``, fnrs, number of validation scores).
* ``input``: the pixel range images were decoded to, the perturbation (if any) and batch size.
* ``score``, ``p_value`` (split-conformal, :func:`flipad_jax.metrics.p_values`) and, per fitted
  fnr, the threshold, the verdict ``made_by_g`` (score ≤ τ) and the fnr τ realises on G's
  validation scores.
* ``certificate`` (FLIPAD; null otherwise): λ and the lasso's objective, duality gap (an upper
  bound on the objective's distance to its minimum), KKT residual, iterations, status name and
  the number of pixels the target's clip moved.
* ``versions`` (:func:`flipad_jax.detector_io.versions`), ``command`` (``sys.argv``), ``created``.

:func:`verify` recomputes every record from the paths it names: the hashes, then the detector's
settings and the scores, p-values, verdicts and certificates (in the report's order and batch
size). Fields computed by the solver or network (``score`` and the certificate's objective, gap
and KKT residual) match within a relative ``FLOAT_RTOL`` (other hardware may round differently);
every other field must be equal. ``command``, ``created`` and ``versions`` are not compared
(different library versions are reported as a note). The HTML page is a rendering, not checked.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np

from flipad_jax._checks import check_fields
from flipad_jax._files import atomic_dir, check_new_path, sha256_file
from flipad_jax.bundle import META_FILE, WEIGHTS_FILE
from flipad_jax.images import ImageRef, _open_npy, read_images
from flipad_jax.lasso import Status
from flipad_jax.metrics import p_values, realised_fnr
from flipad_jax.scoring import detector_digest

SCHEMA = "flipad-jax evidence"
SCHEMA_VERSION = 1
REPORT_FILE = "report.json"
PAGE_FILE = "index.html"
FLOAT_RTOL = 1e-5
# Computed by the network or the solver: compared within FLOAT_RTOL, everything else exactly.
TOLERANT = ("score", "certificate.objective", "certificate.gap", "certificate.kkt")
NOT_COMPARED = ("command", "created", "versions")
RECORD_KEYS = ("schema", "schema_version", "image", "bundle", "detector", "input", "score",
               "p_value", "decisions", "certificate", "versions", "command", "created")


# -- identities ---------------------------------------------------------------------------------

def image_identity(ref: ImageRef) -> dict:
    """Name, absolute path, row index (None for an image file) and SHA-256 of one input."""
    path = Path(ref.path)
    file_hash = sha256_file(path)
    out = dict(name=ref.name, path=str(path.absolute()), index=None, sha256=file_hash,
               file_sha256=file_hash)
    if ref.index >= 0:
        arr = _open_npy(path)
        if ref.index >= len(arr):
            raise ValueError(f"{ref.name}: no such row, the array holds {len(arr)} images")
        h = hashlib.sha256(np.ascontiguousarray(arr[ref.index]).tobytes())
        h.update(file_hash.encode() + str(ref.index).encode())
        out.update(index=ref.index, sha256=h.hexdigest())
    return out


def bundle_identity(path) -> Optional[dict]:
    """Path, SHA-256 of the bundle's two files, and the source model's identity from head.json
    (None if head.json is not a JSON object); None without a bundle."""
    if path is None:
        return None
    root = Path(path)
    try:
        source = json.loads((root / META_FILE).read_text()).get("source")
    except (ValueError, AttributeError):  # not JSON, or not an object
        source = None
    return dict(path=str(root.absolute()), weights_sha256=sha256_file(root / WEIGHTS_FILE),
                meta_sha256=sha256_file(root / META_FILE), source=source)


def detector_identity(path, detector) -> dict:
    """Path, digest of the saved folder and the settings of the loaded ``detector``."""
    return dict(path=str(Path(path).absolute()), sha256=detector_digest(path),
                kind=detector.feature_config.kind, features=detector.feature_config.to_json(),
                training=detector.training.to_json(), fnrs=list(detector.fnrs),
                n_val=int(len(detector.val_scores_)))


def pixel_range(detector):
    """The range 8-bit pixels decode to: the head's output range, else [-1, 1] (as ``flipad
    fit`` and ``flipad score`` decode them)."""
    return (-1.0, 1.0) if detector.head is None else detector.head.output_range


def check_detector(detector) -> None:
    """Evidence covers :class:`~flipad_jax.Detector` kinds (FLIPAD, RawPAD, DCTPAD, SM-F)."""
    from flipad_jax.detector import Detector

    if not isinstance(detector, Detector):
        raise ValueError(f"--report: a {type(detector).__name__} detector: expected a FLIPAD, "
                         "RawPAD, DCTPAD or SM-F detector (evidence reports cover those)")


def load_detector(path, bundle):
    """A saved detector with its head (FLIPAD) loaded from ``bundle``; ValueError on a head
    that is not the detector's."""
    from flipad_jax.detector import Detector
    from flipad_jax.head import Head

    head = None if bundle is None else Head.load(bundle)
    return Detector.load(path, head=head, progress=False)


# -- values -------------------------------------------------------------------------------------

class Evidence(NamedTuple):
    """A batch's values: ``records`` (the per-sample value fields) and, for the page, the
    FLIPAD inverted activations ``z`` ``(B, *in_shape)`` (None otherwise)."""

    records: list
    z: Optional[np.ndarray]


def batch_values(detector, x) -> Evidence:
    """Score, p-value, decisions and certificate of images ``x`` ``(B, C, H, W)`` (decoded)."""
    features, inv = detector.features_and_inversion(x)
    scores = np.asarray(detector.anomaly_score(features, precomputed=True), np.float32)
    p = p_values(detector.val_scores_, scores)
    records = []
    for i, s in enumerate(scores):
        decisions = [dict(fnr=fnr, threshold=tau, made_by_g=bool(s <= tau),
                          realised_fnr=realised_fnr(detector.val_scores_, tau))
                     for fnr, tau in sorted(detector.thresholds_.items())]
        certificate = None if inv is None else dict(
            lam=float(detector.feature_config.lam), objective=float(inv.objective[i]),
            gap=float(inv.gap[i]), kkt=float(inv.kkt[i]), iterations=int(inv.iterations[i]),
            status=Status(int(inv.status[i])).name, clipped=int(inv.clipped[i]))
        records.append(dict(score=float(s), p_value=float(p[i]), decisions=decisions,
                            certificate=certificate))
    return Evidence(records, None if inv is None else np.asarray(inv.z))


def _input_section(detector, batch_size, perturbation, seed) -> dict:
    low_high = pixel_range(detector)
    return dict(output_range=None if low_high is None else [float(v) for v in low_high],
                perturb=None if perturbation is None else dict(name=str(perturbation),
                                                               seed=int(seed)),
                batch_size=int(batch_size))


# -- writing ------------------------------------------------------------------------------------

def write_report(out, detector, refs: Sequence[ImageRef], *, detector_path, bundle_path=None,
                 batch_size: int = 256, perturbation=None, seed: int = 0,
                 overwrite: bool = False, command: Optional[Sequence[str]] = None,
                 progress: bool = False) -> tuple[Path, list]:
    """Write the evidence report of ``refs`` to the new folder ``out`` (module doc), atomically.

    Args:
      detector: the loaded detector of ``detector_path`` (with the head of ``bundle_path``).
      refs: the inputs (:func:`flipad_jax.images.list_images`), in record order.
      perturbation, seed: as in :func:`flipad_jax.scoring.score_batches` (recorded).
      command: recorded as the exact command (default ``sys.argv``).

    Returns:
      ``(out, records)``.
    """
    from tqdm.auto import tqdm

    from flipad_jax.detector_io import versions
    from flipad_jax.evidence_page import render_page

    out = check_new_path(out, overwrite=overwrite)
    check_detector(detector)
    if not refs:
        raise ValueError("inputs: no images, expected at least one to report on")
    if not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
        raise ValueError(f"--batch-size {batch_size!r}: expected an int >= 1")
    common = dict(schema=SCHEMA, schema_version=SCHEMA_VERSION,
                  created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  bundle=bundle_identity(bundle_path),
                  detector=detector_identity(detector_path, detector),
                  input=_input_section(detector, batch_size, perturbation, seed),
                  versions=versions(), command=list(sys.argv if command is None else command))
    records, panels = [], []
    shape = detector.input_shape_
    for start in tqdm(range(0, len(refs), batch_size), disable=not progress, desc="evidence",
                      unit="batch"):
        batch = list(refs[start:start + batch_size])
        x = read_images(batch, pixel_range(detector), shape=shape,
                        shape_from="(the detector's input shape)", perturbation=perturbation,
                        seed=seed)
        ev = batch_values(detector, x)
        for i, (ref, values) in enumerate(zip(batch, ev.records)):
            records.append(dict(common, image=image_identity(ref), **values))
            panels.append((x[i], None if ev.z is None else ev.z[i]))
    page = render_page(records, panels, detector)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / "samples").mkdir()
        names = [f"samples/{i:06d}.json" for i in range(len(records))]
        for name, rec in zip(names, records):
            (tmp / name).write_text(json.dumps(rec, indent=2, sort_keys=True) + "\n")
        (tmp / REPORT_FILE).write_text(json.dumps(
            dict(schema=SCHEMA, schema_version=SCHEMA_VERSION, command=common["command"],
                 records=names), indent=2) + "\n")
        (tmp / PAGE_FILE).write_text(page)
    return out, records


# -- verification -------------------------------------------------------------------------------

class Check(NamedTuple):
    """The verdict of :func:`verify` on one record: ``differences`` lists ``field: recorded …,
    recomputed …`` (empty: the record matches); ``notes`` what differs without failing."""

    name: str
    differences: list
    notes: list

    @property
    def ok(self) -> bool:
        return not self.differences


def read_report(path) -> list[dict]:
    """The records of a report folder, checked to hold every field verify needs."""
    root = Path(path)
    if not (root / REPORT_FILE).is_file():
        raise ValueError(f"{root}: no {REPORT_FILE}: expected a report folder written by "
                         "`flipad score --report` or `flipad explain`")
    try:
        index = json.loads((root / REPORT_FILE).read_text())
        names = index["records"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{root / REPORT_FILE}: not a report index ({error})") from None
    if index.get("schema") != SCHEMA or index.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{root / REPORT_FILE}: schema {index.get('schema')!r} version "
                         f"{index.get('schema_version')!r}, expected {SCHEMA!r} version "
                         f"{SCHEMA_VERSION}")
    records = []
    for name in names:
        try:
            rec = json.loads((root / name).read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"{root / name}: unreadable record ({error})") from None
        records.append(check_fields(root / name, rec, RECORD_KEYS,
                                    "a record of the evidence schema"))
    if not records:
        raise ValueError(f"{root / REPORT_FILE}: lists no records")
    return records


def _flatten(obj, prefix="") -> dict:
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, list) and any(isinstance(e, (dict, list)) for e in obj):
        items = ((str(i), e) for i, e in enumerate(obj))
    else:
        return {prefix: obj}
    out = {}
    for key, value in items:
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _same(field: str, a, b) -> bool:
    general = field.split(".")
    general = ".".join(p for p in general if not p.isdigit())
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
    if numbers and general in TOLERANT:
        return math.isclose(a, b, rel_tol=FLOAT_RTOL, abs_tol=0.0)
    return a == b and type(a) is type(b)


def compare(recorded: dict, recomputed: dict, *, partial: bool = False) -> tuple[list, list]:
    """``(differences, notes)`` between a record and its recomputation (module doc);
    ``partial``: fields the recomputation lacks are not listed (an input failed, said
    elsewhere)."""
    # Through JSON, so tuples compare as the lists a record holds.
    rec, new = (_flatten(json.loads(json.dumps({k: v for k, v in r.items()
                                                if k not in NOT_COMPARED})))
                for r in (recorded, recomputed))
    differences = []
    for field in sorted(set(rec) | set(new)):
        if field not in new:
            if not partial:
                differences.append(f"{field}: recorded {rec[field]!r}, not recomputed")
        elif field not in rec:
            differences.append(f"{field}: not recorded, recomputed {new[field]!r}")
        elif not _same(field, rec[field], new[field]):
            differences.append(f"{field}: recorded {rec[field]!r}, recomputed {new[field]!r}")
    notes = [f"versions.{k}: recorded {v!r}, now {recomputed['versions'].get(k)!r}"
             for k, v in sorted(recorded["versions"].items())
             if recomputed.get("versions", {}).get(k) != v]
    return differences, notes


def _try(fn, *args):
    """``(value, None)`` or ``(None, "cannot recompute: ...")`` for an input that fails."""
    try:
        return fn(*args), None
    except (ValueError, OSError) as error:
        return None, f"cannot recompute: {error}"


def verify(path, *, progress: bool = False) -> list[Check]:
    """Recompute every record of the report folder ``path`` from the inputs it names and
    compare (module doc). Inputs that cannot be read or loaded (a changed bundle no longer
    fits its detector, an image is gone) make their records fail with the reason."""
    from tqdm.auto import tqdm

    from flipad_jax.detector_io import versions
    from flipad_jax.perturbations import Perturbation

    records = read_report(path)
    first = records[0]
    bundle_path = None if first["bundle"] is None else first["bundle"]["path"]
    detector_path = first["detector"]["path"]
    if any((None if r["bundle"] is None else r["bundle"]["path"]) != bundle_path
           or r["detector"]["path"] != detector_path or r["input"] != first["input"]
           for r in records):
        raise ValueError(f"{path}: records name different detectors, bundles or input settings: "
                         "expected one report of one run")
    settings = first["input"]
    perturb = settings["perturb"]
    perturbation, seed = ((None, 0) if perturb is None
                          else (Perturbation.parse(perturb["name"]), perturb["seed"]))
    common = dict(schema=SCHEMA, schema_version=SCHEMA_VERSION, versions=versions())
    bundle, bundle_error = _try(bundle_identity, bundle_path)
    detector, load_error = _try(load_detector, detector_path, bundle_path)
    if detector is not None:
        common.update(detector=detector_identity(detector_path, detector),
                      input=_input_section(detector, settings["batch_size"], perturbation, seed))
    else:
        digest, _ = _try(detector_digest, detector_path)
        common["detector"] = dict(path=str(Path(detector_path).absolute()),
                                  **({} if digest is None else {"sha256": digest}))
    common["bundle"] = bundle
    recomputed, errors, images = [], [], []
    for rec in records:
        ref = ImageRef(rec["image"]["path"], -1 if rec["image"]["index"] is None
                       else rec["image"]["index"])
        identity, error = _try(image_identity, ref)
        if identity is not None:
            identity["name"] = rec["image"]["name"]  # a label (relative as given), not evidence
        x = None
        if detector is not None and error is None:
            x, error = _try(lambda r: read_images(
                [r], pixel_range(detector), shape=detector.input_shape_,
                shape_from="(the detector's input shape)", perturbation=perturbation,
                seed=seed)[0], ref)
        recomputed.append(dict(common, image=identity or {}))
        errors.append([e for e in (bundle_error, load_error, error) if e])
        images.append(x)
    good = [i for i, x in enumerate(images) if x is not None]
    step = settings["batch_size"]
    for start in tqdm(range(0, len(good), step), disable=not progress, desc="verifying",
                      unit="batch"):
        idx = good[start:start + step]
        for i, values in zip(idx, batch_values(detector, np.stack([images[i] for i in idx]))
                             .records):
            recomputed[i].update(values)
    checks = []
    for rec, new, errs in zip(records, recomputed, errors):
        differences, notes = compare(rec, new, partial=bool(errs))
        checks.append(Check(rec["image"]["name"], errs + differences, notes))
    return checks
