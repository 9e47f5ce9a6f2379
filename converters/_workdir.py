"""The report folder of a resumable run (``flipad demo``, ``flipad robustness``): ``OUT/work`` holds each stage's
result and the settings that made them, so a rerun with the same settings reuses the stages."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def prepare_work(out, wanted: dict, *, what: str, overwrite: bool = False) -> Path:
    """``OUT/work`` ready for a run with the settings ``wanted`` (JSON-able; saved as
    ``OUT/work/settings.json``); returns it.

    Raises ValueError if ``out`` holds a run of other settings, or is a non-empty folder that
    holds no such run, unless ``overwrite``, which discards an earlier run's stages.
    ``what`` names the run in errors ("robustness").
    """
    from flipad_jax import report

    out = Path(out)
    work = out / "work"
    settings_file = work / "settings.json"
    if settings_file.exists():
        if json.loads(settings_file.read_text()) != wanted and not overwrite:
            raise ValueError(f"{out}: holds a {what} run with other settings "
                             f"({settings_file}); expected a new folder, or pass --overwrite")
        if overwrite:
            shutil.rmtree(work)
    elif out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ValueError(f"out={str(out)!r} exists and is not a {what} folder: expected a new "
                         "or empty folder (or pass --overwrite)")
    work.mkdir(parents=True, exist_ok=True)
    report.write_json(settings_file, wanted)
    return work
