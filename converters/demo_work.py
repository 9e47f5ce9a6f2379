"""The work folder of a demo run: settings checked against an earlier run, stages reused.

A demo writes each stage atomically under ``OUT/work`` and, when rerun into the same folder with
the same settings, reuses what is there. :func:`open_work` is that contract's first step.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

SETTINGS_FILE = "settings.json"


def open_work(out, wanted: dict, *, overwrite: bool = False) -> Path:
    """Create or reopen ``out/work`` for a run with settings ``wanted`` (JSON-able).

    A folder holding a run with other settings is refused unless ``overwrite`` (which discards
    its work folder); so is a non-empty folder that is not a demo folder. Returns the work folder,
    with ``wanted`` written to its ``settings.json``.
    """
    from flipad_jax.report import write_json

    wanted = json.loads(json.dumps(wanted))  # tuples as lists, as read back
    out = Path(out)
    work = out / "work"
    settings_file = work / SETTINGS_FILE
    if settings_file.exists():
        if json.loads(settings_file.read_text()) != wanted and not overwrite:
            raise ValueError(f"{out}: holds a demo run with other settings "
                             f"({settings_file}); expected a new folder, or pass --overwrite")
        if overwrite:
            shutil.rmtree(work)
    elif out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ValueError(f"out={str(out)!r} exists and is not a demo folder: expected a new or "
                         "empty folder (or pass --overwrite)")
    work.mkdir(parents=True, exist_ok=True)
    write_json(settings_file, wanted)
    return work
