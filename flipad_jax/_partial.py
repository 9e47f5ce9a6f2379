"""The resumable row writer behind ``flipad score`` (see :mod:`flipad_jax.scoring`): CSV / JSONL
row formats and ``OUT.partial`` with its sidecar, appended in whole fsynced batches, locked, and
renamed to ``OUT`` when complete."""

from __future__ import annotations

import csv
import errno
import fcntl
import io
import json
import os
from pathlib import Path
from typing import Mapping, Optional, Sequence


from flipad_jax._files import atomic_file
from flipad_jax.metrics import made_by_g

PARTIAL_SUFFIX = ".partial"
SIDECAR_SUFFIX = ".partial.json"
SIDECAR_FORMAT = "flipad-jax partial scores"
SIDECAR_VERSION = 1
# Sidecar fields a resumed run must match, and how a mismatch is named.
IDENTITY = {"format": "another program", "version": "another sidecar version",
            "detector_sha256": "another detector", "inputs_sha256": "another input list",
            "shard": "another --shard", "out_format": "another output format",
            "columns": "other columns (fitted fnrs)", "perturb": "another --perturb"}



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

    def lines(self, names, scores, p_values, thresholds: Mapping[float, float]) -> str:
        raise NotImplementedError

    def path_of(self, line: str) -> str:
        """The input name of a complete row; ValueError if the line is not such a row."""
        raise NotImplementedError

    def columns(self) -> list:
        return ["path", "score", "p_value"] + [fnr_key(f) for f in self.fnrs]


class CsvRows(RowFormat):
    suffix = ".csv"

    def header(self) -> str:
        return self._line(["path", "score", "p_value"] +
                          [f"g_at_fnr_{fnr_key(f)}" for f in self.fnrs])

    @staticmethod
    def _line(fields) -> str:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(fields)
        return buf.getvalue()

    def lines(self, names, scores, p_values, thresholds) -> str:
        rows = []
        for name, s, p in zip(names, scores, p_values):
            if "\n" in name or "\r" in name:
                raise ValueError(f"{name!r}: a file name with a line break, which CSV rows "
                                 "cannot hold here: expected names without line breaks (or "
                                 "write .jsonl)")
            rows.append(self._line([name, repr(float(s)), repr(float(p))] + [
                "true" if made_by_g(s, thresholds[f]) else "false" for f in self.fnrs]))
        return "".join(rows)

    def path_of(self, line: str) -> str:
        fields = next(csv.reader([line]))
        if len(fields) != 3 + len(self.fnrs):
            raise ValueError(f"{len(fields)} fields, expected {3 + len(self.fnrs)}")
        float(fields[1]), float(fields[2])
        return fields[0]


class JsonlRows(RowFormat):
    suffix = ".jsonl"

    def lines(self, names, scores, p_values, thresholds) -> str:
        return "".join(json.dumps({"path": name, "score": float(s), "p_value": float(p),
                                   "verdict": {fnr_key(f): bool(made_by_g(s, thresholds[f]))
                                               for f in self.fnrs}}) + "\n"
                       for name, s, p in zip(names, scores, p_values))

    def path_of(self, line: str) -> str:
        row = json.loads(line)
        if not (isinstance(row, dict) and isinstance(row.get("path"), str) and "score" in row):
            raise ValueError("expected an object with 'path' and 'score'")
        return row["path"]


FORMATS = {cls.suffix: cls for cls in (CsvRows, JsonlRows)}


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

    def remaining(self, refs) -> list:
        """The refs (anything with a ``.name``) this run has still to write, in order; refuses a
        partial file with repeated rows or rows of inputs not in ``refs``."""
        done = set(self.done)
        if len(done) != len(self.done) or not done <= {r.name for r in refs}:
            self.refuse("holds repeated rows or rows of inputs not in this run")
        return [r for r in refs if r.name not in done]

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
