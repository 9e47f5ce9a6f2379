"""The demo heads as lasso problems, and any flipad-jax operator as an explicit sparse matrix."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import scipy.sparse

from benchmark_utils import _BENCHMARKS

WEIGHTS = _BENCHMARKS.parent / "converters" / "demo_weights"


def operator_matrix(op, chunk: int = 128) -> scipy.sparse.csr_matrix:
    """A as an ``(n_out, n_in)`` float64 CSR matrix: row i is Aᵀeᵢ (the adjoint applied to the
    output basis; outputs are the smaller side of a head). Entries are the layer's weights,
    each a single product, so float32 → float64 is exact; exact zeros are dropped.
    ``chunk``: output coordinates per adjoint call."""
    import jax.numpy as jnp

    n_out = int(np.prod(op.out_shape))
    rows = []
    for start in range(0, n_out, chunk):
        basis = np.zeros((min(chunk, n_out - start), n_out), op.dtype)
        basis[np.arange(len(basis)), start + np.arange(len(basis))] = 1
        rows_dense = np.asarray(op.T(jnp.asarray(basis.reshape((-1,) + op.out_shape))))
        rows.append(scipy.sparse.csr_matrix(rows_dense.reshape(len(basis), -1).astype(np.float64)))
    return scipy.sparse.vstack(rows, format="csr")


def demo_head_problem(name: str, batch: int, zbar_samples: int) -> dict:
    """The shipped demo generator ``name`` as a lasso problem: converted to a head bundle
    (z̄ over ``zbar_samples`` latents, seed 0, as ``flipad demo`` does) and targets σ⁻¹ of G's
    own first ``batch`` 8-bit validation samples (the demo's seed), through
    ``benchmarks/solver.py``'s :func:`head_problem`. Everything runs on the CPU in a temporary
    folder, removed afterwards."""
    from converters.convert import convert
    from converters.demo import SAMPLE_SEEDS
    from converters.demo_gans import GEN_OPTIONS, arch_of
    from converters.sampling import sample
    from solver import head_problem

    weights = WEIGHTS / f"{name}.safetensors"
    with tempfile.TemporaryDirectory() as tmp:
        bundle, images = Path(tmp) / "bundle", Path(tmp) / "images"
        convert(weights, bundle, arch=arch_of(name), arch_options=GEN_OPTIONS,
                samples=zbar_samples, seed=0, device="cpu", progress=False)
        sample(weights, batch, images, arch=arch_of(name), arch_options=GEN_OPTIONS,
               seed=SAMPLE_SEEDS["val"], device="cpu", progress=False)
        return head_problem(bundle, images, batch)
