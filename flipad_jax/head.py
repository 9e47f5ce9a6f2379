"""A generator's last step, σ(A z + b), loaded from a head bundle: forward, target, inversion.

``Head.load(path)`` reads a bundle written by ``flipad convert`` (see :mod:`flipad_jax.bundle`)
and gives the linear operator A (with its bias b), the final activation σ, the mean activation
z̄ and the generator's output range. Then

* ``head.forward(z)``  = σ(A z + b), the generator's last step;
* ``head.target(x)``   = σ⁻¹ of the images x (after mapping them to the output range and
  clipping, see :mod:`flipad_jax.activations`): the lasso's target o;
* ``head.invert(x)``   = ``solve_lasso(A, o, λ, anchor=z̄)``: the FLIPAD features.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import NamedTuple, Optional

from tqdm.auto import tqdm

import jax
import jax.numpy as jnp
import numpy as np

from flipad_jax._checks import check_batch, check_finite, check_int
from flipad_jax.activations import (DEFAULT_CLIP, check_clip, clipped_inverse, get_activation,
                                    resolve_output_range)
from flipad_jax.bundle import build_operator, read_bundle
from flipad_jax.lasso import LassoOptions, LassoResult, solve_lasso
from flipad_jax.sharding import device_batches

DEFAULT_LAM = 5e-4  # the paper's λ for the small GANs and Redwine; FeatureConfig.lam's default
# Bytes of z per solve on a CPU, where the solver is bound by memory traffic: chunks this size
# ran 2.67× (demo LSGAN head) and 1.82× (64×64×3 DCGAN head) faster per image than batches of
# 1000 and 400, 1.14× on the small demo DCGAN head (benchmarks/solve_rows.py; 2-core EPYC,
# 2 MiB L2 a core, 32 MiB L3).
CPU_SOLVE_BYTES = 2 << 20


class InversionResult(NamedTuple):
    """A lasso solve of images and how many pixel values its target clipped.

    Attributes:
      lasso: the :class:`~flipad_jax.LassoResult`; its fields (``z``, ``iterations``,
        ``objective``, ``gap``, ``kkt``, ``status``, ``converged``, ...) read through as
        attributes of this result.
      clipped: ``(B,)`` int32, values of each image the target's clip moved (see
        :func:`flipad_jax.activations.clipped_inverse`).
    """

    lasso: LassoResult
    clipped: jax.Array

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.lasso, name)


@functools.partial(jax.jit, static_argnames=("activation",))
def _forward(op, z, *, activation):
    return get_activation(activation).forward(op.affine(z))


@functools.partial(jax.jit, static_argnames=("activation",))
def _target(x, scale, shift, clip, *, activation):
    return clipped_inverse(get_activation(activation), x * scale + shift, clip)


class Head:
    """The inverted layer of a generator and what FLIPAD needs around it.

    Attributes:
      op: :class:`~flipad_jax.Conv2d`, :class:`~flipad_jax.ConvTranspose2d` or
        :class:`~flipad_jax.Linear` (A, with ``op.bias`` = b).
      activation: :class:`~flipad_jax.activations.Activation` (σ).
      zbar: ``in_shape`` array, the mean input activation of the layer (z̄).
      output_range: ``(low, high)`` of the generator's images, or None (unbounded).
      lipschitz: ‖A‖² stored in the bundle (reused by :meth:`invert`), or None.
      meta: the bundle's head.json as a dict (source, versions, z̄ provenance, self-check).
    """

    def __init__(self, op, activation: str, zbar, *, output_range=None,
                 lipschitz: Optional[float] = None, meta: Optional[dict] = None):
        self.op = op
        self.activation = get_activation(activation)
        zbar = jnp.asarray(zbar, op.dtype)
        if tuple(zbar.shape) != tuple(op.in_shape):
            raise ValueError(f"zbar has shape {zbar.shape}: expected the operator's input shape "
                             f"{tuple(op.in_shape)}")
        check_finite("zbar", zbar)
        self.zbar = zbar
        self.output_range = resolve_output_range(self.activation, output_range)
        self.lipschitz = lipschitz
        self.meta = {} if meta is None else meta

    @classmethod
    def load(cls, path, *, dtype=jnp.float32, precision="highest") -> "Head":
        """Read and validate the bundle folder ``path`` (see :mod:`flipad_jax.bundle`).

        Args:
          path: the folder written by ``flipad convert``.
          dtype: dtype of the operator and z̄ (float32 default; float64 needs
            ``jax_enable_x64``).
          precision: convolution/matmul precision passed to the operator.
        """
        dtype = jnp.dtype(dtype)
        if dtype not in (jnp.float32, jnp.float64):
            raise ValueError(f"dtype={dtype}: expected float32 or float64")
        if jax.dtypes.canonicalize_dtype(dtype) != dtype:
            raise ValueError(f"dtype={dtype}: JAX runs without 64-bit types; enable "
                             "jax_enable_x64 (e.g. `with jax.enable_x64(True):`) first")
        bundle = read_bundle(Path(path))
        meta = bundle.meta
        op = build_operator(bundle, dtype=np.dtype(dtype), precision=precision)
        return cls(op, meta["activation"], bundle.zbar.astype(dtype),
                   output_range=meta["output_range"], lipschitz=meta["lipschitz"], meta=meta)

    @property
    def bias(self):
        """b, the layer's bias (``(C_out,)`` or ``(out,)``), or None."""
        return self.op.bias

    @property
    def in_shape(self):
        return tuple(self.op.in_shape)

    @property
    def out_shape(self):
        return tuple(self.op.out_shape)

    def forward(self, z):
        """σ(A z + b): ``(B, *in_shape)`` activations → ``(B, *out_shape)`` images."""
        z = check_batch("z", z, self.in_shape, "the head's input")
        return _forward(self.op, jnp.asarray(z, self.op.dtype), activation=self.activation.name)

    def target(self, x, *, x_range=None, clip: Optional[float] = None,
               return_clipped: bool = False):
        """o = σ⁻¹(x): the pre-activation outputs the images ask for.

        Args:
          x: ``(B, *out_shape)`` images (floating, or integers such as uint8 pixels).
          x_range: ``(low, high)`` of the scale x is given in, mapped linearly onto the head's
            ``output_range`` first (e.g. ``(0, 255)`` for 8-bit pixels); default: x is already
            in the output range.
          clip: values are clipped to ``[low + clip, high − clip]`` of σ's range before σ⁻¹
            (tanh and sigmoid); None: the reference's 1e-4, and floating x outside the output
            range is refused unless ``x_range`` is given (clipping 0–255 floats for a tanh head
            would hide a wrong scale). Pass ``clip`` to clip such values on purpose.
          return_clipped: also return the ``(B,)`` int32 count of clipped values per image.

        Returns:
          o with x's shape in the head's dtype, or ``(o, clipped)``.
        """
        x = jnp.asarray(x)
        if jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == jnp.bool_:
            if x_range is None:
                # Pixels read as if already in the output range would be clipped to ±1 almost
                # everywhere; the scale must be stated.
                raise ValueError(f"x has dtype {x.dtype}: integer pixels need their scale, e.g. "
                                 "x_range=(0, 255); or pass floats in the head's output range "
                                 f"{self.output_range}")
            x = x.astype(self.op.dtype)
        x = check_batch("x", x, self.out_shape, "images of the head's output shape")
        check_finite("x", x)
        if clip is None and x_range is None and self.output_range is not None:
            low, high = float(jnp.min(x)), float(jnp.max(x))
            if low < self.output_range[0] or high > self.output_range[1]:
                raise ValueError(f"x spans [{low:.6g}, {high:.6g}]: expected the head's output "
                                 f"range {self.output_range}; pass x_range=(low, high) for the "
                                 "scale x is in (e.g. (0, 255)), or clip= to clip it on purpose")
        clip = check_clip(DEFAULT_CLIP if clip is None else clip)
        scale, shift = 1.0, 0.0
        if x_range is not None:
            if self.output_range is None:
                raise ValueError(f"x_range={x_range!r}: this {self.activation.name} head has no "
                                 "output range to map onto; pass x_range=None")
            lo, hi = (float(v) for v in x_range)
            if not lo < hi:
                raise ValueError(f"x_range={x_range!r}: expected (low, high) with low < high")
            out_lo, out_hi = self.output_range
            scale = (out_hi - out_lo) / (hi - lo)
            shift = out_lo - lo * scale
        o, clipped = _target(x.astype(self.op.dtype), scale, shift, clip,
                             activation=self.activation.name)
        return (o, clipped) if return_clipped else o

    def invert(self, x, lam=DEFAULT_LAM, *, x_range=None, clip: Optional[float] = None,
               **solver_kwargs) -> InversionResult:
        """FLIPAD features of images: ``solve_lasso(op, target(x), lam, anchor=zbar)``.

        Minimises ½‖A z + b − o‖² + λ‖z − z̄‖₁ per image (see :func:`flipad_jax.solve_lasso`),
        with the bundle's Lipschitz estimate unless ``lipschitz=`` or a fixed step is given.

        Args:
          x: ``(B, *out_shape)`` images; ``x_range`` and ``clip`` as in :meth:`target`.
          lam: λ, scalar or ``(B,)`` (paper: 5e-4 small GANs and Redwine, 1e-5 Stable
            Diffusion, 1e-3 medical).
          **solver_kwargs: passed to :func:`~flipad_jax.solve_lasso` (``options=`` a
            :class:`~flipad_jax.LassoOptions`, ``lipschitz=``, or single fields such as
            max_iter, tol, stop, step).

        Returns:
          :class:`InversionResult`: ``z`` ``(B, *in_shape)`` are the features; per-image
          diagnostics of the solve and the clip count.
        """
        if "anchor" in solver_kwargs:
            raise ValueError("anchor: the head's anchor is its zbar; build a Head with another "
                             "zbar instead of passing anchor=")
        o, clipped = self.target(x, x_range=x_range, clip=clip, return_clipped=True)
        solver_kwargs.setdefault("lipschitz", self.lipschitz)  # unused under a fixed step
        return InversionResult(solve_lasso(self.op, o, lam, anchor=self.zbar, **solver_kwargs),
                               clipped)

    def solve_rows(self) -> int:
        """Images per lasso solve on this backend under a per-sample stop rule: as many as keep
        z within :data:`CPU_SOLVE_BYTES` on a CPU (at least 1), unbounded elsewhere."""
        if jax.default_backend() != "cpu":
            return np.iinfo(np.int32).max
        return max(1, CPU_SOLVE_BYTES // (self.zbar.dtype.itemsize * int(np.prod(self.in_shape))))

    def invert_batches(self, x, lam=DEFAULT_LAM, *, batch_size: int = 1000,
                       progress: bool = False, **invert_kwargs) -> InversionResult:
        """:meth:`invert` over a data set in batches, each sharded over the local devices.

        Bounds device memory (the solver keeps several arrays of the activations' size per
        batch) and keeps the reference's batch-wide stop rule per batch of 1000 in paper mode.
        Each batch holds exactly ``batch_size`` images (the last fewer), padded to a multiple of
        the device count with copies of its last image, which leave that rule unchanged and are
        dropped from all outputs (:func:`flipad_jax.sharding.device_batches`). On a CPU, under a
        per-sample stop rule ("gap", "change"), a batch is solved in chunks of at most
        :data:`CPU_SOLVE_BYTES` of z (:meth:`solve_rows`); samples stop independently there, so
        the chunks change the time, not the result.

        Args:
          x: ``(N, *out_shape)`` images, any dtype :meth:`invert` accepts (NumPy or JAX).
          lam: λ (scalar); batch_size: images per solve; progress: show a progress bar.
          **invert_kwargs: passed to :meth:`invert` (x_range, clip, options, max_iter, ...).

        Returns:
          :class:`InversionResult` of NumPy arrays over all N images (``lipschitz`` and
          ``step`` of the last batch).
        """
        check_int("batch_size", batch_size)
        options = invert_kwargs.get("options") or LassoOptions()
        if invert_kwargs.get("stop", options.stop) != "reference":
            batch_size = min(batch_size, self.solve_rows())
        parts = []
        batches = tqdm(device_batches(x, batch_size), total=-(-len(x) // batch_size),
                       disable=not progress, desc="inverting", unit="batch", leave=False)
        for xb, size in batches:
            res = self.invert(xb, lam, **invert_kwargs)
            parts.append(jax.tree_util.tree_map(lambda a: np.asarray(a)[:size],
                                                (res.lasso[:6], res.clipped)))
        arrays, clipped = (jax.tree_util.tree_map(lambda *a: np.concatenate(a), *parts))
        return InversionResult(LassoResult(*arrays, res.lipschitz, res.step), clipped)

    def __repr__(self):
        return (f"Head({self.op!r}, activation={self.activation.name!r}, "
                f"output_range={self.output_range}, in_shape={self.in_shape})")
