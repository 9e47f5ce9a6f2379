"""Batch-axis sharding over this process's devices, for inversion and scoring.

One process drives all its local accelerators: a 1-D :class:`~jax.sharding.Mesh` named
``"batch"`` over ``jax.local_devices()``, and host batches placed on it with
``NamedSharding(mesh, PartitionSpec("batch"))``, so each device holds a contiguous slice of the
rows. The jitted solvers and networks then run sharded; their outputs keep the sharding.
Under ``jax.distributed`` each process builds its mesh from its own devices (hence
``local_devices``, not ``devices``) and works on its own part of the inputs.

Batches are padded to few sizes (:func:`bucket_size`), each a multiple of the device count, so that
few shapes are ever compiled and every device gets the same number of rows.
"""

from __future__ import annotations

import numpy as np
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

BATCH_AXIS = "batch"


def batch_mesh() -> Mesh:
    """A 1-D mesh over ``jax.local_devices()`` with axis ``"batch"`` (one device: a 1-mesh)."""
    return Mesh(np.asarray(jax.local_devices()), (BATCH_AXIS,))


def batch_sharding(mesh: Mesh | None = None) -> NamedSharding:
    """Axis 0 split over ``mesh`` (default :func:`batch_mesh`), other axes whole per device."""
    return NamedSharding(batch_mesh() if mesh is None else mesh, PartitionSpec(BATCH_AXIS))


def bucket_size(size: int, batch_size: int, n_devices: int) -> int:
    """Rows a batch of ``size`` real rows (1 ≤ size ≤ batch_size) is padded to.

    The next power of two ≥ max(size, 8), capped at ``batch_size``, then rounded up to a multiple
    of ``n_devices``: full batches stay at (about) ``batch_size`` and a short tail compiles one of
    few shapes instead of a new one per data-set size.
    """
    if not 1 <= size <= batch_size:
        raise ValueError(f"size={size}: expected 1 <= size <= batch_size={batch_size}")
    rows = min(batch_size, 1 << (max(size, 8) - 1).bit_length())
    return -(-rows // n_devices) * n_devices


def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """``(n, ...)`` → ``(rows, ...)``, same dtype, by repeating the last row (n ≥ 1).

    Copies of a real row are valid inputs whatever the caller accepts (pixel range, integer
    pixels), and leave batch-wide reductions such as the paper's stop rule (max over samples)
    unchanged, where zeros might not.
    """
    n = len(x)
    if not 1 <= n <= rows:
        raise ValueError(f"x has {n} rows: expected 1 to rows={rows}")
    return x if n == rows else np.concatenate([x, np.repeat(x[-1:], rows - n, axis=0)])


def device_batches(x, batch_size: int, *, sharding: NamedSharding | None = None):
    """Yield ``(batch, size)`` for ``x[i:i + batch_size]``, i = 0, batch_size, ...

    Args:
      x: ``(n, ...)`` array (NumPy, JAX or anything sliceable into NumPy), any dtype.
      batch_size: real rows per batch; the rows themselves are not regrouped.
      sharding: where batches go (default :func:`batch_sharding`).

    Yields:
      ``batch``: ``(bucket_size(size, batch_size, devices), ...)`` jax.Array of ``x``'s dtype,
      sharded on axis 0, its rows after ``size`` copies of row ``size - 1``; ``size``: the
      number of real rows, to cut outputs back to.
    """
    sharding = batch_sharding() if sharding is None else sharding
    k = sharding.mesh.size
    for start in range(0, len(x), batch_size):
        xb = np.asarray(x[start:start + batch_size])
        yield jax.device_put(pad_rows(xb, bucket_size(len(xb), batch_size, k)), sharding), len(xb)


def map_batches(fn, x, batch_size: int, *, progress: bool = False, desc: str = ""):
    """Apply a jitted row-wise ``fn`` to ``x`` in sharded batches; concatenate the outputs.

    Args:
      fn: ``(B, ...)`` → ``(B, ...)``, each output row depending on its input row only.
      x: ``(n, ...)`` inputs; batch_size: rows per batch, rounded up to a multiple of the device
        count (rows are independent, so every device is kept full).
      progress, desc: progress bar.

    Returns:
      ``(n, ...)`` NumPy array of ``fn``'s output dtype (``(0,)`` float32 for empty ``x``).
    """
    sharding = batch_sharding()
    k = sharding.mesh.size
    batch_size = -(-batch_size // k) * k
    batches = tqdm(device_batches(x, batch_size, sharding=sharding), total=-(-len(x) // batch_size),
                   desc=desc, disable=not progress, leave=False)
    outputs = [np.asarray(fn(xb))[:size] for xb, size in batches]
    return np.concatenate(outputs) if outputs else np.zeros((0,), np.float32)
