"""Save and restore a pytree of arrays plus JSON metadata: the one place that touches orbax.

A checkpoint is a folder::

    PATH/
      meta.json     our metadata (any JSON-able dict; the caller versions its content)
      arrays/       orbax StandardCheckpointer output for the array pytree

Writes are atomic: everything goes to a temporary folder beside ``PATH`` and is moved into place
with ``os.replace`` only after orbax has finished (orbax saves asynchronously by default; we wait).
Restoring goes against an abstract target (shapes and dtypes, no values), so a file whose arrays
do not match what the caller expects fails instead of loading silently. Nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from flipad_jax._files import atomic_dir

META_FILE = "meta.json"
ARRAYS_DIR = "arrays"


def save(path, arrays, meta: dict, *, overwrite: bool = False,
         write_extra: Optional[Callable[[Path], None]] = None) -> Path:
    """Write ``arrays`` (a pytree of arrays) and ``meta`` (JSON-able) to the folder ``path``.

    Args:
      path: target folder; its parent is created if missing.
      arrays: pytree of ``jax.Array``/``np.ndarray`` leaves.
      meta: JSON-able dict.
      overwrite: replace an existing checkpoint at ``path`` (otherwise ValueError).
      write_extra: called with the temporary folder to add files of the caller's own (e.g. a
        subfolder), which then move into place atomically with the rest.

    Returns:
      the absolute path written.
    """
    path = Path(path).absolute()
    meta_text = json.dumps(meta, indent=2, sort_keys=True)  # fail before writing anything
    with atomic_dir(path, overwrite=overwrite) as tmp:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp / ARRAYS_DIR, jax.tree_util.tree_map(np.asarray, arrays))
        checkpointer.wait_until_finished()
        checkpointer.close()
        (tmp / META_FILE).write_text(meta_text)
        if write_extra is not None:
            write_extra(tmp)
    return path


def load_meta(path) -> dict:
    """The JSON metadata of the checkpoint folder ``path``."""
    path = Path(path)
    meta_file = path / META_FILE
    if not meta_file.is_file():
        raise ValueError(f"path={str(path)!r}: expected a checkpoint folder with {META_FILE}")
    try:
        return json.loads(meta_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{meta_file}: not valid JSON ({err})") from None


def load_arrays(path, target):
    """Restore the array pytree of ``path`` against ``target``.

    Args:
      target: pytree with the expected structure, whose leaves give shape and dtype
        (arrays or ``jax.ShapeDtypeStruct``).

    Returns:
      the pytree with array leaves of the target's shapes and dtypes.
    """
    path = Path(path).absolute()
    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype),
                                      target)
    checkpointer = ocp.StandardCheckpointer()
    try:
        restored = checkpointer.restore(path / ARRAYS_DIR, abstract)
    except Exception as err:  # orbax raises several types for missing/mismatched trees
        raise ValueError(f"path={str(path)!r}: the stored arrays do not match the expected "
                         f"structure ({type(err).__name__}: {err})") from None
    finally:
        checkpointer.close()
    for (kp, got), want in zip(jax.tree_util.tree_leaves_with_path(restored),
                               jax.tree_util.tree_leaves(abstract)):
        if got.shape != want.shape or got.dtype != want.dtype:
            raise ValueError(f"{jax.tree_util.keystr(kp)} in {path}: stored {got.shape} "
                             f"{got.dtype}, expected {want.shape} {want.dtype}")
    return restored
