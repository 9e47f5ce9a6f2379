"""A generator's last linear layer as a JAX linear operator: forward, exact adjoint, ‖A‖².

Three operators mirror PyTorch's layers, built from weights in PyTorch layout:

* :class:`Conv2d`           weight ``(C_out, C_in // groups, kh, kw)``
* :class:`ConvTranspose2d`  weight ``(C_in, C_out // groups, kh, kw)``
* :class:`Linear`           weight ``(out, in)``

Each is a frozen dataclass registered as a pytree: the weight and bias are its leaves, the
geometry (``in_size``, stride, padding, …, precision, layout) is static, so it passes through
``jit``, ``vmap`` and sharding, and a jitted function of an operator compiles once per geometry.
A convolution knows its input size (``in_size`` is required), hence ``in_shape`` and
``out_shape``. ``op(z)`` is the *linear* map only; the layer's bias is kept apart in ``op.bias``
(``op.affine(z)`` adds it). ``op.T(y)`` is the exact adjoint.

Layout. The public arrays are channel-first, batch first, ``(B, C, H, W)``. Internally the
convolutions run channel-last (NHWC, ``layout=``): it measured fastest on both backends we have —
18× faster than NCHW for the DCGAN last layer on XLA:CPU, and on an H100 at batch 1000 the
forward+adjoint pair took 1.38 ms in NHWC vs 1.66 ms in NCHW (DCGAN) and 2.71 vs 4.00 ms (LSGAN)
(``benchmarks/conv_layouts.py``). The solver converts once per solve with
``to_internal``/``from_internal`` and iterates with ``apply``/``adjoint`` on internal arrays.

Precision. The default is ``"highest"``: true float32 convolutions. GPUs otherwise run float32
convolutions in TF32, whose rounding (about 1e-3 relative) exceeds the accuracy the lasso's
certificates need at λ = 5e-4; on an H100 "highest" cost 8% more per solver iteration on the
DCGAN layer and 2× on the LSGAN layer. ``precision=None`` selects the backend's default.

Geometry arithmetic, per spatial dimension (PyTorch's definitions, k the kernel size):

* Conv2d:          ``H_out = floor((H + 2p - d(k-1) - 1) / s) + 1``
* ConvTranspose2d: ``H_out = (H - 1) s - 2p + d(k-1) + output_padding + 1``

The transposed convolution is the adjoint of ``conv2d(·; W)`` with the weight exactly as stored,
so both operators are built from two kernels of the same weight: a *direct* kernel (the conv) and
a *transposed* kernel (spatially flipped, in/out swapped within each group, run with input
dilation ``s`` and padding ``d(k-1) - p`` — negative padding crops). ``ConvTranspose2d(method=
"polyphase")`` computes the same two maps with stride-1 convolutions only (the sub-pixel form).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flipad_jax._checks import as_pair, check_batch, check_finite, check_floating

_PRECISIONS = {None: None, "default": lax.Precision.DEFAULT, "high": lax.Precision.HIGH,
               "highest": lax.Precision.HIGHEST}


def _static(**kwargs):
    """A geometry field: part of the pytree's structure (so of jit's cache key), not a leaf."""
    return dataclasses.field(metadata={"static": True}, **kwargs)


def _operator(cls):
    """A frozen dataclass registered as a pytree: array fields are leaves, ``_static`` ones not.
    Equality and hashing stay by identity (the fields hold arrays)."""
    cls = dataclasses.dataclass(frozen=True, eq=False, repr=False)(cls)
    return jax.tree_util.register_dataclass(cls)


def _set(op, **fields):
    """Normalised field values, written from ``__post_init__`` past the frozen dataclass."""
    for name, value in fields.items():
        object.__setattr__(op, name, value)


def _is_data(x) -> bool:
    """Whether ``x`` is an array (or tracer) to check. JAX also rebuilds operators through the
    constructor from placeholders (abstract values when it traces outputs, sentinel leaves on
    its error paths); those pass through as they are."""
    return isinstance(x, (jax.Array, np.ndarray, np.generic, list, tuple, int, float))


def _check_precision(precision):
    if precision not in _PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {list(_PRECISIONS)}")
    return precision


def _check_weight(weight, ndim: int):
    """The weight as a JAX array of ``ndim`` dimensions, floating and (when concrete) finite."""
    check_floating("weight", weight)
    if jnp.ndim(weight) != ndim:
        raise ValueError(f"weight has shape {jnp.shape(weight)}: expected {ndim} dimensions "
                         "(PyTorch layout)")
    if not isinstance(weight, jax.core.Tracer):
        check_finite("weight", weight)
    return jnp.asarray(weight)


def _check_bias(bias, channels: int, dtype):
    if bias is None:
        return None
    check_floating("bias", bias)
    if jnp.shape(bias) != (channels,):
        raise ValueError(f"bias has shape {jnp.shape(bias)}: expected ({channels},)")
    if not isinstance(bias, jax.core.Tracer):
        check_finite("bias", bias)
    return jnp.asarray(bias, dtype)


_LAYOUTS = {  # internal layout → (dimension numbers, kernel permutation from OIHW)
    "NHWC": (("NHWC", "HWIO", "NHWC"), (2, 3, 1, 0)),
    "NCHW": (("NCHW", "OIHW", "NCHW"), (0, 1, 2, 3)),
}


_KERNEL_BATCHINGS = ("grouped", "block_diagonal")


def _check_layout(layout):
    if layout not in _LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected 'NHWC' or 'NCHW'")
    return layout


def _transposed_oihw(w_oihw, groups: int):
    """OIHW kernel of the adjoint of ``conv2d(·; w_oihw)``: per group swap in/out, flip space."""
    o, i_g, kh, kw = w_oihw.shape
    w = w_oihw.reshape(groups, o // groups, i_g, kh, kw)
    w = jnp.swapaxes(w, 1, 2).reshape(groups * i_g, o // groups, kh, kw)
    return w[:, :, ::-1, ::-1]


def _conv(x, kernel, layout, *, stride, padding, lhs_dilation, rhs_dilation, groups, precision,
          kernel_batching="grouped"):
    conv = functools.partial(
        lax.conv_general_dilated, window_strides=stride, padding=padding,
        lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=_LAYOUTS[layout][0], precision=_PRECISIONS[precision])
    if kernel_batching == "grouped":
        return conv(x, kernel, feature_group_count=groups)
    return _block_diagonal_batching(conv, layout, groups)(x, kernel)


def _block_diagonal_batching(conv, layout, groups):
    """``conv(x, kernel)`` whose ``vmap`` over a batch of M kernels runs one ungrouped
    convolution with the M kernels on the diagonal of a dense (M·C_in, M·C_out) kernel, the M
    inputs side by side along the channels. XLA lowers the default batching rule to a grouped
    convolution, which XLA:CPU runs far slower than the dense one despite its M× fewer
    multiply-adds (``benchmarks/attribute.py``). A sample with a non-finite input value comes out
    all NaN (comment below). Not reverse-differentiable (``custom_vmap``: ``jax.grad`` fails)."""
    @jax.custom_batching.custom_vmap
    def one(x, kernel):
        return conv(x, kernel, feature_group_count=groups)

    @one.def_vmap
    def stacked(m, in_batched, x, kernel):
        x_batched, kernel_batched = in_batched
        if not kernel_batched:  # one kernel (so x is the batched one): a longer batch
            out = one(x.reshape((-1,) + x.shape[2:]), kernel)
            return out.reshape(x.shape[:2] + out.shape[1:]), True
        x = x if x_batched else jnp.broadcast_to(x, (m,) + x.shape)
        # The zero blocks multiply the other models' inputs, and 0 · NaN would carry one model's
        # non-finite values into every model's output: they enter the product as 0, and the
        # samples they belong to come out all NaN, for that model only.
        finite = jnp.isfinite(x)
        bad = ~jnp.all(finite, axis=tuple(range(2, x.ndim)), keepdims=True)  # (M, B, 1, 1, 1)
        x = jnp.where(finite, x, 0)
        kernel = _block_diagonal_kernel(kernel, groups, layout)
        if layout == "NHWC":  # (M, B, H, W, C) → (B, H, W, M·C): model m's channels are block m
            out = conv(jnp.moveaxis(x, 0, -2).reshape(x.shape[1:-1] + (-1,)), kernel)
            out = jnp.moveaxis(out.reshape(out.shape[:-1] + (m, -1)), -2, 0)
        else:
            out = conv(jnp.moveaxis(x, 0, 1).reshape((x.shape[1], -1) + x.shape[3:]), kernel)
            out = jnp.moveaxis(out.reshape((out.shape[0], m, -1) + out.shape[2:]), 1, 0)
        return jnp.where(bad, jnp.nan, out), True

    return one


def _block_diagonal_kernel(kernels, groups, layout):
    """M kernels ``(M, *kernel)`` (HWIO or OIHW, ``groups`` groups) → one ungrouped kernel
    whose M·groups diagonal blocks are the groups' kernels, zeros elsewhere."""
    if layout == "NCHW":  # OIHW → HWIO and back
        hwio = jnp.transpose(kernels, (0, 3, 4, 2, 1))
        return jnp.transpose(_block_diagonal_kernel(hwio, groups, "NHWC"), (3, 2, 0, 1))
    m, kh, kw, i_g, o = kernels.shape
    blocks = kernels.reshape(m, kh, kw, i_g, groups, o // groups)
    blocks = jnp.moveaxis(blocks, 4, 1).reshape(m * groups, kh, kw, i_g, o // groups)
    eye = jnp.eye(m * groups, dtype=kernels.dtype)  # a product, not a dot: exact on any backend
    dense = jnp.moveaxis(blocks, 0, 2)[:, :, :, :, None, :] * eye[None, None, :, None, :, None]
    return dense.reshape(kh, kw, m * groups * i_g, m * o)


class _LinearOperator:
    """Shared public surface; subclasses provide the internal maps and shapes."""

    weight: jax.Array
    bias: Optional[jax.Array]

    # -- internal protocol used by the solver ---------------------------------------------------
    def to_internal(self, x):
        """Input-space array (B, *in_shape) → internal layout."""
        return x

    def from_internal(self, x):
        return x

    out_to_internal = to_internal
    out_from_internal = from_internal

    # -- public ---------------------------------------------------------------------------------
    @property
    def dtype(self):
        return self.weight.dtype

    def __call__(self, z):
        """A z: (B, *in_shape) → (B, *out_shape), without the bias."""
        z = check_batch("z", z, self.in_shape, "the operator's input")
        return self.out_from_internal(self.apply(self.to_internal(z)))

    def affine(self, z):
        """A z + b, the layer's full output before its activation."""
        y = self(z)
        return y if self.bias is None else y + self.bias.reshape((1, -1) + (1,) * (y.ndim - 2))

    def T(self, y):
        """Aᵀ y: (B, *out_shape) → (B, *in_shape), the exact adjoint of ``op(z)``."""
        y = check_batch("y", y, self.out_shape, "the operator's output")
        return self.from_internal(self.adjoint(self.out_to_internal(y)))

    def as_lineax(self):
        """The linear map A (one sample, no bias) as a ``lineax.FunctionLinearOperator``:
        ``mv`` maps ``in_shape`` → ``out_shape``, ``transpose()`` is the adjoint (by JAX's
        linear transposition of the same map), ``in_structure()`` the input's shape and dtype.
        Needs lineax (``pip install flipad-jax[lineax]``)."""
        try:
            import lineax
        except ImportError as err:  # an optional extra
            raise ImportError("as_lineax() needs lineax: pip install 'flipad-jax[lineax]'") \
                from err
        structure = jax.ShapeDtypeStruct(self.in_shape, self.dtype)
        return lineax.FunctionLinearOperator(lambda z: self(z[None])[0], structure)

    def lipschitz(self, *, rtol: float = 1e-6, max_steps: int = 1024, seed: int = 0) -> float:
        """‖A‖₂² = λ_max(AᵀA), the Lipschitz constant of ∇½‖Az − o‖², by Lanczos iteration.

        A power iteration accelerated by Krylov subspaces: from a Gaussian start (NumPy's
        generator with ``seed``, which needs no compile, unlike ``jax.random``) Lanczos on AᵀA
        builds a tridiagonal matrix whose largest eigenvalue (a Ritz value, a lower bound that
        increases to ‖A‖²) is returned once it changes by less than ``rtol`` (relative) over the
        last 8 steps, or after ``max_steps``.
        Convolution spectra are nearly continuous near the top, where plain power iteration
        stalls (0.4% short after 2000 steps on a small test conv); Lanczos was within 1e-12 of
        the dense matrix's largest squared singular value after 32 steps on the same operator.
        The solver adds a safety margin on top (``solve_lasso(lipschitz_margin=...)``).
        """
        if not 0 < rtol < 1:
            raise ValueError(f"rtol={rtol!r}: expected 0 < rtol < 1")
        v = np.random.default_rng(seed).standard_normal((1,) + self.in_shape)
        v = self.to_internal(jnp.asarray(v, self.dtype))
        carry = (jnp.zeros_like(v), v / jnp.linalg.norm(v), jnp.zeros((), self.dtype))
        alphas, betas = [], []
        while True:
            # Chunks of one compiled length continue the same recurrence, so a longer run
            # costs no new compile.
            carry, (a, b) = _lanczos(self, carry, min(_LANCZOS_CHUNK, max_steps - len(alphas)))
            alphas.extend(np.asarray(a))
            betas.extend(np.asarray(b))
            k = len(alphas)
            top, earlier = (_top_ritz_value(alphas, betas, j) for j in (k, k - min(8, k - 1)))
            if abs(top - earlier) <= rtol * top or k >= max_steps:
                return float(top)


@_operator
class Linear(_LinearOperator):
    """y = z Wᵀ, as ``torch.nn.Linear`` without its bias; weight ``(out, in)``.

    Args:
      weight: ``(out, in)`` floating array.
      bias: optional ``(out,)``, kept apart from the map (see ``affine``).
      precision: matmul precision ("highest" by default; "high", "default", or None).
    """

    weight: jax.Array
    bias: Optional[jax.Array] = None
    _: dataclasses.KW_ONLY
    precision: Optional[str] = _static(default="highest")

    def __post_init__(self):
        _set(self, precision=_check_precision(self.precision))
        if _is_data(self.weight):
            weight = _check_weight(self.weight, 2)
            _set(self, weight=weight, bias=_check_bias(self.bias, weight.shape[0], weight.dtype))

    @property
    def in_shape(self):
        return (self.weight.shape[1],)

    @property
    def out_shape(self):
        return (self.weight.shape[0],)

    def apply(self, z):
        return jnp.matmul(z, self.weight.T, precision=_PRECISIONS[self.precision])

    def adjoint(self, y):
        return jnp.matmul(y, self.weight, precision=_PRECISIONS[self.precision])

    def __repr__(self):
        return f"Linear(in={self.in_shape[0]}, out={self.out_shape[0]}, bias={self.bias is not None})"


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class _Conv(_LinearOperator):
    """Geometry shared by the two convolutions (fields normalised to pairs on construction)."""

    weight: jax.Array
    bias: Optional[jax.Array] = None
    _: dataclasses.KW_ONLY
    in_size: tuple[int, int] = _static()
    stride: tuple[int, int] = _static(default=1)
    padding: tuple[int, int] = _static(default=0)
    dilation: tuple[int, int] = _static(default=1)
    groups: int = _static(default=1)
    precision: Optional[str] = _static(default="highest")
    layout: str = _static(default="NHWC")
    kernel_batching: str = _static(default="grouped")

    transposed: ClassVar[bool]  # the subclasses also define output_padding

    def __post_init__(self):
        groups = self.groups
        if not isinstance(groups, (int, np.integer)) or isinstance(groups, bool) or groups < 1:
            raise ValueError(f"groups={groups!r}: expected a positive int")
        _set(self, in_size=as_pair("in_size", self.in_size, minimum=1),
             stride=as_pair("stride", self.stride, minimum=1),
             padding=as_pair("padding", self.padding, minimum=0),
             dilation=as_pair("dilation", self.dilation, minimum=1), groups=int(groups),
             precision=_check_precision(self.precision), layout=_check_layout(self.layout))
        if self.kernel_batching not in _KERNEL_BATCHINGS:
            raise ValueError(f"kernel_batching={self.kernel_batching!r}: expected one of "
                             f"{list(_KERNEL_BATCHINGS)}")
        if self.transposed:
            output_padding = as_pair("output_padding", self.output_padding, minimum=0)
            for s, d, e in zip(self.stride, self.dilation, output_padding):
                if e >= max(s, d):
                    raise ValueError(f"output_padding={self.output_padding!r}: expected each "
                                     f"value < max(stride, dilation) = {max(s, d)}")
            _set(self, output_padding=output_padding)
        if not _is_data(self.weight):
            return
        weight = _check_weight(self.weight, 4)
        if weight.shape[0] % self.groups:
            raise ValueError(f"groups={groups}: expected it to divide the weight's first dimension "
                             f"{weight.shape[0]} (weight shape {weight.shape})")
        _set(self, weight=weight)  # before the bias: out_channels reads the stored weight
        _set(self, bias=_check_bias(self.bias, self.out_channels, weight.dtype))
        size = self.out_shape[1:]
        if min(size) < 1:
            raise ValueError(f"input spatial size {self.in_size} gives an empty output "
                             f"{size} for kernel {self.kernel_size}, stride {self.stride}, "
                             f"padding {self.padding}, dilation {self.dilation}")

    # -- shapes (channels in PyTorch's terms) ---------------------------------------------------
    @property
    def in_channels(self) -> int:
        return self.weight.shape[0] if self.transposed else self.weight.shape[1] * self.groups

    @property
    def out_channels(self) -> int:
        return self.weight.shape[1] * self.groups if self.transposed else self.weight.shape[0]

    @property
    def kernel_size(self) -> tuple[int, int]:
        return tuple(self.weight.shape[2:])

    @property
    def in_shape(self):
        return (self.in_channels,) + self.in_size

    @property
    def out_shape(self):
        return (self.out_channels,) + tuple(self._size_out(n, i)
                                            for i, n in enumerate(self.in_size))

    def _size_out(self, size_in, i):
        k, s, p, d = self.kernel_size[i], self.stride[i], self.padding[i], self.dilation[i]
        if self.transposed:
            return (size_in - 1) * s - 2 * p + d * (k - 1) + self.output_padding[i] + 1
        return (size_in + 2 * p - d * (k - 1) - 1) // s + 1

    # -- internal maps (in ``self.layout``) ------------------------------------------------------
    def to_internal(self, x):
        return jnp.moveaxis(x, -3, -1) if self.layout == "NHWC" else x

    def from_internal(self, x):
        return jnp.moveaxis(x, -1, -3) if self.layout == "NHWC" else x

    out_to_internal = to_internal
    out_from_internal = from_internal

    # The kernels are derived from the PyTorch-layout weight inside the traced computation, not
    # stored pre-flipped: XLA:GPU recognises an input-dilated convolution of a *reversed* kernel
    # as cuDNN's backward-data convolution, and falls back to a dense convolution over the
    # inserted zeros otherwise (3.7 vs 1.6 ms for the DCGAN pair at batch 1000 on an H100,
    # benchmarks/conv_variants.py). Inside the solver loop the transform is loop-invariant.
    def _conv(self, x, kernel, *, stride, padding, lhs_dilation, rhs_dilation):
        """:func:`_conv` with this operator's layout, groups, precision and kernel batching."""
        return _conv(x, kernel, self.layout, stride=stride, padding=padding,
                     lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation, groups=self.groups,
                     precision=self.precision, kernel_batching=self.kernel_batching)

    def _direct(self, x):
        """conv2d(x; W) with the stored weight, stride, padding, dilation and groups."""
        kernel = jnp.transpose(self.weight, _LAYOUTS[self.layout][1])
        return self._conv(x, kernel, stride=self.stride, padding=[(p, p) for p in self.padding],
                          lhs_dilation=(1, 1), rhs_dilation=self.dilation)

    def _transposed(self, x, extra):
        """conv_transpose2d(x; W) with ``extra`` rows/cols appended (PyTorch's output_padding)."""
        pad = [(d * (k - 1) - p, d * (k - 1) - p + e) for k, p, d, e in
               zip(self.kernel_size, self.padding, self.dilation, extra)]
        kernel = jnp.transpose(_transposed_oihw(self.weight, self.groups),
                               _LAYOUTS[self.layout][1])
        return self._conv(x, kernel, stride=(1, 1), padding=pad, lhs_dilation=self.stride,
                          rhs_dilation=self.dilation)

    def __repr__(self):
        return (f"{type(self).__name__}({self.in_channels}→{self.out_channels}, "
                f"kernel={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"output_padding={self.output_padding}, dilation={self.dilation}, "
                f"groups={self.groups}, in_size={self.in_size}, bias={self.bias is not None})")


@_operator
class Conv2d(_Conv):
    """``torch.nn.functional.conv2d`` as a linear operator; weight ``(C_out, C_in/groups, kh, kw)``.

    Args:
      weight: PyTorch-layout kernel. bias: optional ``(C_out,)``, kept apart from the map.
      in_size: ``(H, W)`` of the input (required: a strided conv maps several input sizes to
        one output size, so the adjoint needs it).
      stride, padding, dilation: ints or pairs, as PyTorch defines them. groups: int dividing
        both channel counts.
      precision: convolution precision: "highest" (default, true float32), "high", "default",
        or None for the backend's default (TF32 on recent NVIDIA GPUs).
      layout: internal layout, "NHWC" (default, see the module docstring) or "NCHW".
      kernel_batching: how ``jax.vmap`` over a stack of these operators (batched weights)
        convolves: "grouped" (default, JAX's rule: one grouped convolution, differentiable) or
        "block_diagonal" (one dense convolution with the M kernels on a block diagonal: M× the
        multiply-adds, but far faster than grouped on XLA:CPU; not reverse-differentiable).
        What one unbatched operator computes is the same either way.
    """

    transposed: ClassVar[bool] = False
    output_padding: ClassVar[tuple[int, int]] = (0, 0)

    def apply(self, z):
        return self._direct(z)

    def adjoint(self, y):
        # Rows of the input that no output reads (floor in the size formula) come back as zeros.
        extra = [n_in - ((n - 1) * s - 2 * p + d * (k - 1) + 1) for n_in, n, s, p, d, k in
                 zip(self.in_size, self.out_shape[1:], self.stride, self.padding, self.dilation,
                     self.kernel_size)]
        return self._transposed(y, extra)


_METHODS = ("direct", "polyphase")


@_operator
class ConvTranspose2d(_Conv):
    """``torch.nn.functional.conv_transpose2d`` as a linear operator; weight
    ``(C_in, C_out/groups, kh, kw)``.

    Args: as :class:`Conv2d`, plus ``output_padding`` (int or pair, each < max(stride,
      dilation)), the extra rows/cols PyTorch appends to the output, and ``method``:

      * ``"direct"`` (default): the input-dilated convolution, and the strided one as adjoint;
      * ``"polyphase"``: the sub-pixel form (see the comment above ``_phases``): only stride-1
        convolutions, for the map and its adjoint; needs ``dilation == (1, 1)``.

    Why direct is the default: on XLA:CPU the direct pair (forward + adjoint) was 1.2–1.6×
    faster than polyphase on both DCGAN heads and a k3 s2 layer at batch 16 and 256, and the
    FISTA iteration no slower beyond noise (``benchmarks/conv_variants.py --heads``). XLA:CPU
    evidently skips the inserted zeros of the input-dilated conv, and the polyphase adjoint's
    stride-1 conv ran slower than the strided one. On a GPU this implementation is unmeasured;
    an H100 prototype of the sub-pixel pair took 1.08 ms against 1.38 ms direct (DCGAN, batch
    1000), so ``method="polyphase"`` is the one to try there.
    """

    transposed: ClassVar[bool] = True
    output_padding: tuple[int, int] = _static(default=0, kw_only=True)
    method: str = _static(default="direct", kw_only=True)

    def __post_init__(self):
        super().__post_init__()
        if self.method not in _METHODS:
            raise ValueError(f"method={self.method!r}: expected one of {list(_METHODS)}")
        if self.method == "polyphase" and self.dilation != (1, 1):
            raise ValueError(f"method='polyphase' with dilation={self.dilation}: the polyphase "
                             "form needs dilation (1, 1); use method='direct'")

    def apply(self, z):
        if self.method == "polyphase":
            return self._polyphase_apply(z)
        return self._transposed(z, self.output_padding)

    def adjoint(self, y):
        if self.method == "polyphase":
            return self._polyphase_adjoint(y)
        # With output_padding ≥ stride (possible when dilation > stride) the conv yields more
        # rows than the input has; the extra ones are not part of the adjoint.
        x = self._direct(y)
        h, w = self.in_size
        return x[:, :h, :w, :] if self.layout == "NHWC" else x[:, :, :h, :w]

    # -- polyphase form --------------------------------------------------------------------------
    # Output row o reads input rows i with o + p = i·s + t (t the tap). Writing o + p = q·s + φ
    # splits the output into s phases φ, and phase φ is a stride-1 convolution of the input with
    # the taps t = m·s + φ (m = 0 … n−1, n = ⌈k/s⌉): out_φ[q] = Σ_m z[q − m] w[m·s + φ]. One
    # stride-1 conv with s_y·s_x times the output channels computes every phase; interleaving
    # them (depth to space) and cropping gives the transposed conv, with no multiply by the
    # zeros an input-dilated conv inserts. The adjoint runs the same steps backwards: pad, space
    # to depth, the stride-1 conv's adjoint (a stride-1 conv with the flipped kernel).
    def _phases(self):
        """Per spatial dimension: (n taps per phase, first phase row q0, end Q, input size,
        crop offset, output size), with phase rows q0 … Q−1 covering output rows 0 … size−1."""
        rows = []
        for k, s, p, e, h in zip(self.kernel_size, self.stride, self.padding,
                                 self.output_padding, self.in_size):
            size = (h - 1) * s - 2 * p + k + e
            rows.append((-(-k // s), p // s, -(-(size + p) // s), h, p % s, size))
        return rows

    def _phase_kernel(self):
        """OIHW kernel of the phase conv: output channels ordered (group, φ_y, φ_x, C_out/groups),
        taps m reversed (a correlation), zero taps where m·s + φ ≥ k."""
        (sy, sx), g = self.stride, self.groups
        c_in, c_g, kh, kw = self.weight.shape
        ny, nx = -(-kh // sy), -(-kw // sx)
        w = jnp.pad(self.weight, ((0, 0), (0, 0), (0, ny * sy - kh), (0, nx * sx - kw)))
        w = w.reshape(g, c_in // g, c_g, ny, sy, nx, sx)[:, :, :, ::-1, :, ::-1, :]
        return jnp.transpose(w, (0, 4, 6, 2, 1, 3, 5)).reshape(g * sy * sx * c_g, c_in // g,
                                                                ny, nx)

    def _phase_conv(self, x, kernel_oihw, padding):
        kernel = jnp.transpose(kernel_oihw, _LAYOUTS[self.layout][1])
        return self._conv(x, kernel, stride=(1, 1), padding=padding, lhs_dilation=(1, 1),
                          rhs_dilation=(1, 1))

    def _channels_last(self, x, inverse=False):
        """The NHWC view the interleaving works in (a transpose XLA fuses into it for NCHW)."""
        if self.layout == "NHWC":
            return x
        return jnp.moveaxis(x, -1, 1) if inverse else jnp.moveaxis(x, 1, -1)

    def _polyphase_apply(self, z):
        (ny, qy0, qy, hy, ry, oy), (nx, qx0, qx, hx, rx, ox) = self._phases()
        phases = self._phase_conv(z, self._phase_kernel(),
                                  [(ny - 1 - qy0, qy - hy), (nx - 1 - qx0, qx - hx)])
        phases = self._channels_last(phases)
        (sy, sx), g, (b, my, mx, _) = self.stride, self.groups, phases.shape
        y = phases.reshape(b, my, mx, g, sy, sx, -1)
        y = jnp.transpose(y, (0, 1, 4, 2, 5, 3, 6)).reshape(b, my * sy, mx * sx, -1)
        return self._channels_last(y[:, ry:ry + oy, rx:rx + ox, :], inverse=True)

    def _polyphase_adjoint(self, y):
        (ny, qy0, qy, hy, ry, oy), (nx, qx0, qx, hx, rx, ox) = self._phases()
        (sy, sx), g, (my, mx) = self.stride, self.groups, (qy - qy0, qx - qx0)
        y = self._channels_last(y)
        y = jnp.pad(y, ((0, 0), (ry, my * sy - ry - oy), (rx, mx * sx - rx - ox), (0, 0)))
        b = y.shape[0]
        y = y.reshape(b, my, sy, mx, sx, g, -1)
        phases = jnp.transpose(y, (0, 1, 3, 5, 2, 4, 6)).reshape(b, my, mx, -1)
        return self._phase_conv(self._channels_last(phases, inverse=True),
                                _transposed_oihw(self._phase_kernel(), self.groups),
                                [(qy0, ny - 1 - qy + hy), (qx0, nx - 1 - qx + hx)])


_LANCZOS_CHUNK = 32


@functools.partial(jax.jit, static_argnums=2)
def _lanczos(op, carry, steps):
    """``steps`` Lanczos steps on AᵀA from ``carry`` = (previous vector, current unit vector,
    β): the new carry and the tridiagonal's (α, β) of these steps."""
    tiny = jnp.finfo(op.dtype).tiny

    def step(carry, _):
        v_prev, v, beta = carry
        w = op.adjoint(op.apply(v)) - beta * v_prev
        alpha = jnp.vdot(v, w).real
        w = w - alpha * v
        beta = jnp.linalg.norm(w)
        # An exhausted Krylov space (small operators) leaves zeros, i.e. eigenvalue-0 padding.
        v_next = jnp.where(beta > tiny, w / jnp.maximum(beta, tiny), 0)
        return (v, v_next, beta), (alpha, beta)

    return lax.scan(step, carry, None, length=steps)


def _top_ritz_value(alphas, betas, k):
    """Largest eigenvalue of the leading k×k block of the tridiagonal (α on the diagonal, β
    beside it)."""
    a, b = np.asarray(alphas[:k], np.float64), np.asarray(betas[:k - 1], np.float64)
    return np.linalg.eigvalsh(np.diag(a) + np.diag(b, 1) + np.diag(b, -1))[-1]
