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

Rows: CSV ``path,score,g_at_fnr_0.005,...`` (verdicts ``true``/``false``); JSONL
``{"path": ..., "score": ..., "verdict": {"0.005": true, ...}}``. A verdict is True where the
image is attributed to G (score ≤ τ(fnr)). Scores are written with ``repr`` of the float32 value,
so they read back exactly.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from flipad_jax._files import atomic_file
from flipad_jax.images import ImageRef, read_images

PARTIAL_SUFFIX = ".partial"
SIDECAR_SUFFIX = ".partial.json"
SIDECAR_FORMAT = "flipad-jax partial scores"
SIDECAR_VERSION = 1
# Sidecar fields a resumed run must match, and how a mismatch is named.
IDENTITY = {"format": "another program", "version": "another sidecar version",
            "detector_sha256": "another detector", "inputs_sha256": "another input list",
            "shard": "another --shard", "out_format": "another output format",
            "columns": "other columns (fitted fnrs)"}


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
                  batch_size: int = 256) -> Iterator[tuple[list[ImageRef], np.ndarray]]:
    """Yield ``(refs_batch, scores)`` for consecutive batches of ``refs``, reading only one batch
    of images at a time; images are checked against the detector's input shape. The arguments
    are checked at the call, before any image is read."""
    if not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
        raise ValueError(f"--batch-size {batch_size!r}: expected an int >= 1")
    shape = detector.input_shape_
    if shape is None:
        raise ValueError("the detector was fitted on precomputed features: expected one fitted "
                         "on images (flipad fit), whose input shape is known")

    def batches():
        for start in range(0, len(refs), batch_size):
            batch = list(refs[start:start + batch_size])
            images = read_images(batch, output_range, shape=shape,
                                 shape_from="(the detector's input shape)")
            yield batch, np.asarray(detector.score(images), np.float32)

    return batches()


def score_all(detector, refs: Sequence[ImageRef], *, output_range=(-1.0, 1.0),
              batch_size: int = 256, progress: bool = False, desc: str = "scoring") -> np.ndarray:
    """Scores of all ``refs`` (in order), computed batch by batch as in :func:`score_batches`."""
    out = []
    with tqdm(total=len(refs), disable=not progress, desc=desc, unit="img") as bar:
        for batch, scores in score_batches(detector, refs, output_range=output_range,
                                           batch_size=batch_size):
            out.append(scores)
            bar.update(len(batch))
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def detector_digest(path) -> str:
    """sha256 over the relative paths and bytes of every file of a saved detector folder."""
    root = Path(path)
    h = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(file.relative_to(root)).encode() + b"\0")
        h.update(file.read_bytes())
    return h.hexdigest()


def inputs_digest(names: Sequence[str]) -> str:
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()


# -- row formats ------------------------------------------------------------------------------

def fnr_key(fnr: float) -> str:
    return f"{fnr:g}"


class RowFormat:
    """How rows are written and read back: one line per input, ``\\n``-terminated."""

    suffix = ""

    def __init__(self, fnrs: Sequence[float]):
        self.fnrs = sorted(float(f) for f in fnrs)

    def header(self) -> Optional[str]:
        return None

    def lines(self, names, scores, thresholds: Mapping[float, float]) -> str:
        raise NotImplementedError

    def path_of(self, line: str) -> str:
        """The input name of a complete row; ValueError if the line is not such a row."""
        raise NotImplementedError

    def columns(self) -> list:
        return ["path", "score"] + [fnr_key(f) for f in self.fnrs]


class CsvRows(RowFormat):
    suffix = ".csv"

    def header(self) -> str:
        return self._line(["path", "score"] + [f"g_at_fnr_{fnr_key(f)}" for f in self.fnrs])

    @staticmethod
    def _line(fields) -> str:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(fields)
        return buf.getvalue()

    def lines(self, names, scores, thresholds) -> str:
        rows = []
        for name, s in zip(names, scores):
            if "\n" in name or "\r" in name:
                raise ValueError(f"{name!r}: a file name with a line break, which CSV rows "
                                 "cannot hold here: expected names without line breaks (or "
                                 "write .jsonl)")
            rows.append(self._line([name, repr(float(s))] + [
                "true" if s <= thresholds[f] else "false" for f in self.fnrs]))
        return "".join(rows)

    def path_of(self, line: str) -> str:
        fields = next(csv.reader([line]))
        if len(fields) != 2 + len(self.fnrs):
            raise ValueError(f"{len(fields)} fields, expected {2 + len(self.fnrs)}")
        float(fields[1])
        return fields[0]


class JsonlRows(RowFormat):
    suffix = ".jsonl"

    def lines(self, names, scores, thresholds) -> str:
        return "".join(json.dumps({"path": name, "score": float(s), "verdict": {
            fnr_key(f): bool(s <= thresholds[f]) for f in self.fnrs}}) + "\n"
            for name, s in zip(names, scores))

    def path_of(self, line: str) -> str:
        row = json.loads(line)
        if not (isinstance(row, dict) and isinstance(row.get("path"), str) and "score" in row):
            raise ValueError("expected an object with 'path' and 'score'")
        return row["path"]


FORMATS = {cls.suffix: cls for cls in (CsvRows, JsonlRows)}


def check_output(out, *, overwrite: bool = False) -> Path:
    """``out`` as a Path, checked early: a .csv/.jsonl suffix, and no finished ``out`` unless
    ``overwrite``."""
    out = Path(out)
    row_format(out, ())
    if out.exists() and not overwrite:
        raise ValueError(f"{out} already exists (a finished run): expected a new path, or pass "
                         "--overwrite to score again")
    return out


def row_format(out, fnrs: Sequence[float]) -> RowFormat:
    suffix = Path(out).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"--out {out}: suffix {suffix or '(none)'!r}, expected "
                         f"{' or '.join(FORMATS)}")
    return FORMATS[suffix](fnrs)


# -- the resumable output ---------------------------------------------------------------------

def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written (a regular file may take fewer at once)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PartialOutput:
    """``OUT.partial`` with its sidecar: opened (resuming where it is valid), appended to in whole
    batches, renamed to ``OUT`` by :meth:`finish`. Use as a context manager."""

    def __init__(self, out, fmt: RowFormat, sidecar: dict, *, overwrite: bool = False):
        self.out = Path(out)
        self.partial = self.out.with_name(self.out.name + PARTIAL_SUFFIX)
        self.sidecar_path = self.out.with_name(self.out.name + SIDECAR_SUFFIX)
        self.fmt = fmt
        self.sidecar = dict(sidecar, format=SIDECAR_FORMAT, version=SIDECAR_VERSION,
                            out_format=fmt.suffix, columns=fmt.columns())
        self.overwrite = overwrite
        self.fd: Optional[int] = None
        self.rows = 0

    def __enter__(self) -> "PartialOutput":
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.partial, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            raise ValueError(f"{self.partial}: another `flipad score` is writing it now: expected "
                             "one run per output file") from None
        try:
            self.done = self._resume()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the lock
            self.fd = None

    def refuse(self, why: str):
        raise ValueError(f"{self.partial}: {why}; delete it and {self.sidecar_path.name} (or pass "
                         "--overwrite) to start over")

    def _resume(self) -> list[str]:
        """Check the sidecar against this run, drop a trailing incomplete line, and return the
        names already scored (in file order)."""
        size = os.fstat(self.fd).st_size
        saved = None
        if self.sidecar_path.exists():
            try:
                saved = json.loads(self.sidecar_path.read_text())
            except (OSError, ValueError):
                saved = None  # a sidecar write cut short
        same = saved is not None and all(saved.get(k) == self.sidecar.get(k) for k in IDENTITY)
        if size and not same:
            if not self.overwrite:
                if saved is None:
                    self.refuse(f"holds rows but {self.sidecar_path.name} is missing or "
                                "unreadable, so they cannot be matched to this run")
                self._check_sidecar(saved)
            os.ftruncate(self.fd, 0)  # --overwrite: another run's rows are discarded
            size = 0
        if saved != self.sidecar:
            with atomic_file(self.sidecar_path) as tmp:
                tmp.write_text(json.dumps(self.sidecar, indent=1, sort_keys=True))
            _fsync_dir(self.partial.parent)
        header = self.fmt.header()
        names, keep = [], 0
        with open(self.partial, "rb") as rows:
            for number, raw in enumerate(rows, start=1):
                if not raw.endswith(b"\n"):
                    break  # a line cut by a kill or a failed write: dropped, its input rescored
                keep += len(raw)
                line = raw.decode("utf-8", "surrogateescape")
                if header is not None and number == 1:
                    if line != header:
                        self.refuse(f"its first line {line.strip()!r} is not the header "
                                    f"{header.strip()!r} that this run writes")
                    continue
                try:
                    names.append(self.fmt.path_of(line))
                except (ValueError, StopIteration) as error:
                    self.refuse(f"line {number} is not a complete row ({error}): expected rows "
                                "written by `flipad score`")
        if keep < size:
            os.ftruncate(self.fd, keep)
            os.fsync(self.fd)
        if header is not None and keep == 0:
            self._append(header)
        self.rows = len(names)
        return names

    def _check_sidecar(self, saved: dict) -> None:
        for key, label in IDENTITY.items():
            was, now = saved.get(key), self.sidecar.get(key)
            if was == now:
                continue
            extra = ""
            if key == "detector_sha256":
                extra = (f" ({saved.get('detector')}, sha256 {str(was)[:12]}…; now "
                         f"{self.sidecar.get('detector')}, sha256 {str(now)[:12]}…)")
            elif key == "inputs_sha256":
                extra = f" ({saved.get('n_inputs')} inputs then, {self.sidecar['n_inputs']} now)"
            elif key in ("shard", "out_format"):
                extra = f" ({was} then, {now} now)"
            self.refuse(f"was started with {label}{extra}: expected the same detector, inputs, "
                        "--shard and output format to resume it")

    def _append(self, text: str) -> None:
        size = os.fstat(self.fd).st_size
        try:
            _write_all(self.fd, text.encode("utf-8", "surrogateescape"))
            os.fsync(self.fd)
        except OSError as error:
            try:  # best effort: drop what part of the batch got written
                os.ftruncate(self.fd, size)
            except OSError:
                pass
            full = " (the disk is full)" if error.errno == errno.ENOSPC else ""
            raise OSError(f"writing {self.partial} failed{full}: {error.strerror or error}. "
                          f"Its {self.rows} complete row(s) are kept: fix the cause and rerun the "
                          f"same command to resume; {self.out} is written only when every input "
                          "is scored") from error

    def append(self, text: str, count: int) -> None:
        """Append ``count`` complete rows (``text``) in one write, then fsync."""
        self._append(text)
        self.rows += count

    def finish(self, expected_rows: int) -> Path:
        """Rename ``OUT.partial`` to ``OUT`` (replacing it) once all ``expected_rows`` are in."""
        if self.rows != expected_rows:
            raise ValueError(f"{self.partial}: {self.rows} rows, expected {expected_rows}")
        try:
            os.replace(self.partial, self.out)
            _fsync_dir(self.out.parent)
            self.sidecar_path.unlink(missing_ok=True)
        except OSError as error:
            raise OSError(f"renaming {self.partial} to {self.out} failed: {error}") from error
        return self.out


def write_scores(detector, refs: Sequence[ImageRef], out, *, sidecar: dict,
                 output_range=(-1.0, 1.0), batch_size: int = 256, overwrite: bool = False,
                 progress: bool = False) -> tuple[Path, int]:
    """Score ``refs`` with ``detector`` into ``out`` (.csv or .jsonl), resumably (module doc).

    Args:
      detector: a fitted :class:`~flipad_jax.Detector` (its ``thresholds_`` give the verdicts).
      refs: the inputs (:func:`flipad_jax.images.list_images`), in output order.
      sidecar: what identifies this run besides the inputs and format, e.g.
        ``{"detector": path, "detector_sha256": detector_digest(path), "shard": "0/1"}``.
      overwrite: replace an existing ``out``; discard a partial file of another run.

    Returns:
      ``(out, resumed)``: the path written and how many rows came from an earlier run.
    """
    out = check_output(out, overwrite=overwrite)
    fmt = row_format(out, detector.thresholds_)
    names = [r.name for r in refs]
    sidecar = dict(sidecar, inputs_sha256=inputs_digest(names), n_inputs=len(names))
    score_batches(detector, [], batch_size=batch_size)  # checks the arguments
    with PartialOutput(out, fmt, sidecar, overwrite=overwrite) as sink:
        done = set(sink.done)
        if len(done) != len(sink.done) or not done <= set(names):
            sink.refuse("holds repeated rows or rows of inputs not in this run")
        todo = [r for r in refs if r.name not in done]
        with tqdm(total=len(refs), initial=len(done), disable=not progress, desc="scoring",
                  unit="img") as bar:
            for batch, scores in score_batches(detector, todo, output_range=output_range,
                                               batch_size=batch_size):
                sink.append(fmt.lines([r.name for r in batch], scores, detector.thresholds_),
                            len(batch))
                bar.update(len(batch))
        return sink.finish(len(refs)), len(done)
