"""Streaming, resumable scoring of image sets to CSV or JSONL (``flipad score``).

Images are read and scored one batch at a time (:func:`score_batches`), so memory is bounded by
the batch size whatever the number of inputs. Rows go to ``OUT.partial``; each batch is appended
with one write of complete lines, then flushed and fsynced. When every input is scored the file
is renamed to ``OUT``: a complete ``OUT`` is the only sign of a finished run, and a partial one
never looks complete.

``OUT.partial.json`` (the sidecar) records what the partial rows belong to: the detector's
digest, a hash of the input list, the format and the columns. A run that finds ``OUT.partial``
(a previous run was killed, or a write failed) checks the sidecar, drops a trailing incomplete
line, skips the inputs already scored and appends the rest, so a rerun after a kill yields every
input exactly once. A lock (``flock``) on the partial file keeps two runs from writing it at once.

Rows: CSV ``path,score,p_value,g_at_fnr_0.005,...`` (verdicts ``true``/``false``); JSONL
``{"path": ..., "score": ..., "p_value": ..., "verdict": {"0.005": true, ...}}``. A verdict is
True where the image is attributed to G (score ≤ τ(fnr)); the p-value is the split-conformal one
of :func:`flipad_jax.metrics.p_values`. Scores are written with ``repr`` of the float32 value,
so they read back exactly.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from flipad_jax._files import check_new_path, folder_digest
from flipad_jax._partial import PartialOutput, row_format
from flipad_jax.images import ImageRef, read_images
from flipad_jax.metrics import p_values

# -- inputs -----------------------------------------------------------------------------------

def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` → (K, N) with 0 ≤ K < N: part K of N (numbered from 0)."""
    k, sep, n = str(text).partition("/")
    try:
        k, n = int(k), int(n)
    except ValueError:
        k = n = -1
    if not sep or not 0 <= k < n:
        raise ValueError(f"--shard {text!r}: expected K/N with 0 <= K < N, e.g. 0/4 for the "
                         "first of four parts")
    return k, n


def shard(refs: Sequence[ImageRef], k: int, n: int) -> list[ImageRef]:
    """Part ``k`` of ``n`` contiguous parts of ``refs`` (sizes differ by at most one), so the
    parts 0 … n−1 concatenated give ``refs`` back."""
    return list(refs[k * len(refs) // n:(k + 1) * len(refs) // n])


def score_batches(detector, refs: Sequence[ImageRef], *, output_range=(-1.0, 1.0),
                  batch_size: int = 256, perturbation=None, seed: int = 0, x_range=None,
                  clip: bool = False, features_from: bool = False
                  ) -> Iterator[tuple[list[ImageRef], np.ndarray]]:
    """Yield ``(refs_batch, scores)`` for consecutive batches of ``refs``, reading only one batch
    of images at a time; images are checked against the detector's input shape, and perturbed
    first if ``perturbation`` is given, float arrays mapped from ``x_range`` or clipped with
    ``clip`` (:func:`flipad_jax.images.read_images`). With ``features_from`` the refs are rows
    of FLIPAD feature files (:func:`flipad_jax.feature_files.read_feature_rows`). The arguments
    are checked at the call, before any image is read."""
    if not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
        raise ValueError(f"--batch-size {batch_size!r}: expected an int >= 1")
    if features_from:
        from flipad_jax.feature_files import check_files, read_feature_rows

        if perturbation is not None or x_range is not None or clip:
            raise ValueError("--features-from: the features are computed already; expected no "
                             "--perturb, --x-range or --clip")
        check_files(refs, detector)  # every file's sidecar, before anything is read or written

        def read(batch):
            return read_feature_rows(batch, detector)
    else:
        shape = detector.image_shape_
        if shape is None:
            raise ValueError("the detector was fitted on precomputed features without a head: "
                             "expected one fitted on images (flipad fit), whose input shape is "
                             "known")

        def read(batch):
            return read_images(batch, output_range, shape=shape,
                               shape_from="(the detector's input shape)",
                               perturbation=perturbation, seed=seed, x_range=x_range, clip=clip)

    def batches():
        for start in range(0, len(refs), batch_size):
            batch = list(refs[start:start + batch_size])
            x = read(batch)
            scores = (detector.anomaly_score(x, precomputed=True) if features_from
                      else detector.anomaly_score(x))
            yield batch, np.asarray(scores, np.float32)

    return batches()


def score_all(detector, refs: Sequence[ImageRef], *, output_range=(-1.0, 1.0),
              batch_size: int = 256, progress: bool = False, desc: str = "scoring",
              perturbation=None, seed: int = 0, x_range=None, clip: bool = False,
              features_from: bool = False) -> np.ndarray:
    """Scores of all ``refs`` (in order), computed batch by batch as in :func:`score_batches`."""
    out = []
    with tqdm(total=len(refs), disable=not progress, desc=desc, unit="img") as bar:
        for batch, scores in score_batches(detector, refs, output_range=output_range,
                                           batch_size=batch_size, perturbation=perturbation,
                                           seed=seed, x_range=x_range, clip=clip,
                                           features_from=features_from):
            out.append(scores)
            bar.update(len(batch))
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def detector_digest(path) -> str:
    """sha256 over the relative paths and bytes of every file of a saved detector folder."""
    return folder_digest(path)


def inputs_digest(names: Sequence[str]) -> str:
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()


def check_output(out, *, overwrite: bool = False) -> Path:
    """``out`` as a Path, checked early: a .csv/.jsonl suffix, and no finished ``out`` unless
    ``overwrite``."""
    row_format(out, ())
    return check_new_path(out, overwrite=overwrite)


def write_scores(detector, refs: Sequence[ImageRef], out, *, sidecar: dict,
                 output_range=(-1.0, 1.0), batch_size: int = 256, overwrite: bool = False,
                 progress: bool = False, perturbation=None, seed: int = 0, x_range=None,
                 clip: bool = False, features_from: bool = False) -> tuple[Path, int]:
    """Score ``refs`` with ``detector`` into ``out`` (.csv or .jsonl), resumably (module doc).

    Args:
      detector: a fitted :class:`~flipad_jax.Detector` (its ``thresholds_`` give the verdicts).
      refs: the inputs (:func:`flipad_jax.images.list_images`), in output order.
      sidecar: what identifies this run besides the inputs and format, e.g.
        ``{"detector": path, "detector_sha256": detector_digest(path), "shard": "0/1"}``.
      overwrite: replace an existing ``out``; discard a partial file of another run.
      perturbation, seed: perturb the 8-bit inputs first (recorded in the sidecar, so a resumed
        run must use the same).
      x_range, clip: the scale of float inputs, or clip them (:func:`score_batches`; recorded in
        the sidecar like ``perturbation``).
      features_from: the refs are rows of FLIPAD feature files (:func:`score_batches`).

    Returns:
      ``(out, resumed)``: the path written and how many rows came from an earlier run.
    """
    out = check_output(out, overwrite=overwrite)
    fmt = row_format(out, detector.thresholds_)
    names = [r.name for r in refs]
    sidecar = dict(sidecar, inputs_sha256=inputs_digest(names), n_inputs=len(names),
                   perturb=None if perturbation is None else [str(perturbation), seed],
                   x_range=None if x_range is None else [float(v) for v in x_range],
                   clip=bool(clip), features_from=bool(features_from))
    score_batches(detector, refs, batch_size=batch_size, perturbation=perturbation,
                  x_range=x_range, clip=clip, features_from=features_from)  # checks the arguments
    with PartialOutput(out, fmt, sidecar, overwrite=overwrite) as sink:
        todo = sink.remaining(refs)
        with tqdm(total=len(refs), initial=len(refs) - len(todo), disable=not progress,
                  desc="scoring", unit="img") as bar:
            for batch, scores in score_batches(detector, todo, output_range=output_range,
                                               batch_size=batch_size, perturbation=perturbation,
                                               seed=seed, x_range=x_range, clip=clip,
                                               features_from=features_from):
                sink.append(fmt.lines([r.name for r in batch], scores,
                                      p_values(detector.val_scores_, scores),
                                      detector.thresholds_), len(batch))
                bar.update(len(batch))
        return sink.finish(len(refs)), len(refs) - len(todo)
