"""A generator's last linear layer as a JAX linear operator: forward, exact adjoint, ‖A‖².

Three operators mirror PyTorch's layers, built from weights in PyTorch layout:

* :class:`Conv2d`           weight ``(C_out, C_in // groups, kh, kw)``
* :class:`ConvTranspose2d`  weight ``(C_in, C_out // groups, kh, kw)``
* :class:`Linear`           weight ``(out, in)``

Each is a pytree (weights are leaves, geometry is static), so it passes through ``jit``, ``vmap``
and sharding. ``op(z)`` is the *linear* map only; the layer's bias is kept apart in ``op.bias``
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
dilation ``s`` and padding ``d(k-1) - p`` — negative padding crops).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flipad_jax._checks import as_pair, check_batch, check_finite, check_floating

_PRECISIONS = {None: None, "default": lax.Precision.DEFAULT, "high": lax.Precision.HIGH,
               "highest": lax.Precision.HIGHEST}


def _check_precision(precision):
    if precision not in _PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {list(_PRECISIONS)}")
    return precision


def _check_weight(weight, ndim: int):
    check_floating("weight", weight)
    if jnp.ndim(weight) != ndim:
        raise ValueError(f"weight has shape {jnp.shape(weight)}: expected {ndim} dimensions "
                         "(PyTorch layout)")
    if not isinstance(weight, jax.core.Tracer):
        check_finite("weight", weight)


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


def _conv(x, kernel, layout, *, stride, padding, lhs_dilation, rhs_dilation, groups, precision):
    return lax.conv_general_dilated(
        x, kernel, window_strides=stride, padding=padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=_LAYOUTS[layout][0],
        feature_group_count=groups, precision=_PRECISIONS[precision])


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
        z = check_batch("z", z, self._in_shape_of_input(z), "the operator's input")
        return self.out_from_internal(self.apply(self.to_internal(z)))

    def affine(self, z):
        """A z + b, the layer's full output before its activation."""
        y = self(z)
        return y if self.bias is None else y + self.bias.reshape((-1,) + (1,) * (y.ndim - 2))

    def T(self, y):
        """Aᵀ y: (B, *out_shape) → (B, *in_shape), the exact adjoint of ``op(z)``."""
        in_shape = self._in_shape_of_output(y)
        y = check_batch("y", y, self.out_shape_for(in_shape), "the operator's output")
        return self.from_internal(self.adjoint(self.out_to_internal(y), in_shape))

    def lipschitz(self, *, rtol: float = 1e-6, max_steps: int = 1024, key=None) -> float:
        """‖A‖₂² = λ_max(AᵀA), the Lipschitz constant of ∇½‖Az − o‖², by Lanczos iteration.

        A power iteration accelerated by Krylov subspaces: from a Gaussian start (``key``,
        default ``PRNGKey(0)``) Lanczos on AᵀA builds a tridiagonal matrix whose largest
        eigenvalue (a Ritz value, a lower bound that increases to ‖A‖²) is returned once it
        changes by less than ``rtol`` (relative) over the last 8 steps, or after ``max_steps``.
        Convolution spectra are nearly continuous near the top, where plain power iteration
        stalls (0.4% short after 2000 steps on a small test conv); Lanczos was within 1e-12 of
        the dense matrix's largest squared singular value after 32 steps on the same operator.
        The solver adds a safety margin on top (``solve_lasso(lipschitz_margin=...)``).
        """
        return lipschitz_constant(self, self.in_shape, rtol=rtol, max_steps=max_steps, key=key)

    # Tree flattening: weights are children, geometry is static auxiliary data.
    def tree_flatten(self):
        return self._children(), self._static()

    @classmethod
    def tree_unflatten(cls, static, children):
        op = object.__new__(cls)
        op._restore(static, children)
        return op


@jax.tree_util.register_pytree_node_class
class Linear(_LinearOperator):
    """y = z Wᵀ, as ``torch.nn.Linear`` without its bias; weight ``(out, in)``.

    Args:
      weight: ``(out, in)`` floating array.
      bias: optional ``(out,)``, kept apart from the map (see ``affine``).
      precision: matmul precision ("highest" by default; "high", "default", or None).
    """

    def __init__(self, weight, bias=None, *, precision="highest"):
        _check_weight(weight, 2)
        self.weight = jnp.asarray(weight)
        self.bias = _check_bias(bias, self.weight.shape[0], self.weight.dtype)
        self.precision = _check_precision(precision)

    @property
    def in_shape(self):
        return (self.weight.shape[1],)

    @property
    def out_shape(self):
        return (self.weight.shape[0],)

    def out_shape_for(self, in_shape):
        return self.out_shape

    def _in_shape_of_input(self, z):
        return self.in_shape

    def _in_shape_of_output(self, y):
        return self.in_shape

    def apply(self, z):
        return jnp.matmul(z, self.weight.T, precision=_PRECISIONS[self.precision])

    def adjoint(self, y, in_shape=None):
        return jnp.matmul(y, self.weight, precision=_PRECISIONS[self.precision])

    def _children(self):
        return (self.weight, self.bias)

    def _static(self):
        return (self.precision,)

    def _restore(self, static, children):
        self.weight, self.bias = children
        (self.precision,) = static

    def __repr__(self):
        return f"Linear(in={self.in_shape[0]}, out={self.out_shape[0]}, bias={self.bias is not None})"


class _Conv(_LinearOperator):
    """Geometry shared by the two convolutions."""

    transposed: bool

    def __init__(self, weight, bias=None, *, stride=1, padding=0, output_padding=0, dilation=1,
                 groups=1, in_size=None, precision="highest", layout="NHWC"):
        _check_weight(weight, 4)
        self.layout = _check_layout(layout)
        weight = jnp.asarray(weight)
        self.stride = as_pair("stride", stride, minimum=1)
        self.padding = as_pair("padding", padding, minimum=0)
        self.dilation = as_pair("dilation", dilation, minimum=1)
        self.output_padding = as_pair("output_padding", output_padding, minimum=0)
        if not isinstance(groups, (int, np.integer)) or isinstance(groups, bool) or groups < 1:
            raise ValueError(f"groups={groups!r}: expected a positive int")
        self.groups = int(groups)
        self.precision = _check_precision(precision)
        self.in_size = None if in_size is None else as_pair("in_size", in_size, minimum=1)
        # Channel bookkeeping in PyTorch's terms.
        lead, per_group = weight.shape[0], weight.shape[1]
        if lead % self.groups:
            raise ValueError(f"groups={groups}: expected it to divide the weight's first dimension "
                             f"{lead} (weight shape {weight.shape})")
        if self.transposed:
            self.in_channels, self.out_channels = lead, per_group * self.groups
            for i in range(2):
                if self.output_padding[i] >= max(self.stride[i], self.dilation[i]):
                    raise ValueError(
                        f"output_padding={output_padding!r}: expected each value < "
                        f"max(stride, dilation) = {max(self.stride[i], self.dilation[i])}")
        else:
            self.in_channels, self.out_channels = per_group * self.groups, lead
            if self.output_padding != (0, 0):
                raise ValueError(f"output_padding={output_padding!r}: Conv2d has none; expected 0")
        self.kernel_size = tuple(weight.shape[2:])
        self.weight = weight
        self.bias = _check_bias(bias, self.out_channels, weight.dtype)
        if self.in_size is not None:
            self.out_shape_for(self.in_shape)  # validates that the geometry yields an output

    # -- shapes ---------------------------------------------------------------------------------
    @property
    def in_shape(self):
        if self.in_size is None:
            raise ValueError(f"{type(self).__name__} was built without in_size: pass "
                             "in_size=(H, W) of the input activation to know in_shape")
        return (self.in_channels,) + self.in_size

    @property
    def out_shape(self):
        return self.out_shape_for(self.in_shape)

    def _size_out(self, size_in, i):
        k, s, p, d = self.kernel_size[i], self.stride[i], self.padding[i], self.dilation[i]
        if self.transposed:
            return (size_in - 1) * s - 2 * p + d * (k - 1) + self.output_padding[i] + 1
        return (size_in + 2 * p - d * (k - 1) - 1) // s + 1

    def out_shape_for(self, in_shape):
        if len(in_shape) != 3 or in_shape[0] != self.in_channels:
            raise ValueError(f"input shape {tuple(in_shape)}: expected ({self.in_channels}, H, W)")
        size = tuple(self._size_out(in_shape[1 + i], i) for i in range(2))
        if min(size) < 1:
            raise ValueError(f"input spatial size {tuple(in_shape[1:])} gives an empty output "
                             f"{size} for kernel {self.kernel_size}, stride {self.stride}, "
                             f"padding {self.padding}, dilation {self.dilation}")
        return (self.out_channels,) + size

    def _in_shape_of_input(self, z):
        if self.in_size is not None:
            return self.in_shape
        if jnp.ndim(z) != 4:
            raise ValueError(f"z has shape {jnp.shape(z)}: expected (B, C, H, W)")
        return (self.in_channels,) + tuple(jnp.shape(z)[2:])

    def _in_shape_of_output(self, y):
        """The input shape whose image has y's shape (unique, or from ``in_size``)."""
        if self.in_size is not None:
            return self.in_shape
        if jnp.ndim(y) != 4:
            raise ValueError(f"y has shape {jnp.shape(y)}: expected (B, C, H, W)")
        size = []
        for i, n_out in enumerate(jnp.shape(y)[2:]):
            k, s, p, d = self.kernel_size[i], self.stride[i], self.padding[i], self.dilation[i]
            if self.transposed:
                num = n_out + 2 * p - d * (k - 1) - self.output_padding[i] - 1
                n_in = num // s + 1 if num % s == 0 else 0
            elif s == 1:
                n_in = n_out - 2 * p + d * (k - 1)
            else:
                raise ValueError(f"{type(self).__name__} with stride {self.stride} and no in_size:"
                                 " the input size of the adjoint is ambiguous; pass in_size=(H, W)")
            if n_in < 1:
                raise ValueError(f"y has spatial size {tuple(jnp.shape(y)[2:])}: no input size "
                                 f"maps to it under this {type(self).__name__}")
            size.append(n_in)
        return (self.in_channels,) + tuple(size)

    # -- internal maps (in ``self.layout``) ------------------------------------------------------
    def to_internal(self, x):
        return jnp.moveaxis(x, -3, -1) if self.layout == "NHWC" else x

    def from_internal(self, x):
        return jnp.moveaxis(x, -1, -3) if self.layout == "NHWC" else x

    def _spatial(self, x):
        """(H, W) of an internal-layout batch."""
        return x.shape[1:3] if self.layout == "NHWC" else x.shape[2:4]

    out_to_internal = to_internal
    out_from_internal = from_internal

    # The kernels are derived from the PyTorch-layout weight inside the traced computation, not
    # stored pre-flipped: XLA:GPU recognises an input-dilated convolution of a *reversed* kernel
    # as cuDNN's backward-data convolution, and falls back to a dense convolution over the
    # inserted zeros otherwise (3.7 vs 1.6 ms for the DCGAN pair at batch 1000 on an H100,
    # benchmarks/conv_variants.py). Inside the solver loop the transform is loop-invariant.
    def _direct(self, x):
        """conv2d(x; W) with the stored weight, stride, padding, dilation and groups."""
        kernel = jnp.transpose(self.weight, _LAYOUTS[self.layout][1])
        return _conv(x, kernel, self.layout, stride=self.stride,
                          padding=[(p, p) for p in self.padding], lhs_dilation=(1, 1),
                          rhs_dilation=self.dilation, groups=self.groups,
                          precision=self.precision)

    def _transposed(self, x, extra):
        """conv_transpose2d(x; W) with ``extra`` rows/cols appended (PyTorch's output_padding)."""
        pad = [(d * (k - 1) - p, d * (k - 1) - p + e) for k, p, d, e in
               zip(self.kernel_size, self.padding, self.dilation, extra)]
        kernel = jnp.transpose(_transposed_oihw(self.weight, self.groups),
                               _LAYOUTS[self.layout][1])
        return _conv(x, kernel, self.layout, stride=(1, 1), padding=pad,
                          lhs_dilation=self.stride, rhs_dilation=self.dilation,
                          groups=self.groups, precision=self.precision)

    def _children(self):
        return (self.weight, self.bias)

    def _static(self):
        return (self.stride, self.padding, self.output_padding, self.dilation, self.groups,
                self.in_size, self.precision, self.in_channels, self.out_channels,
                self.kernel_size, self.layout)

    def _restore(self, static, children):
        self.weight, self.bias = children
        (self.stride, self.padding, self.output_padding, self.dilation, self.groups,
         self.in_size, self.precision, self.in_channels, self.out_channels,
         self.kernel_size, self.layout) = static

    def __repr__(self):
        return (f"{type(self).__name__}({self.in_channels}→{self.out_channels}, "
                f"kernel={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"output_padding={self.output_padding}, dilation={self.dilation}, "
                f"groups={self.groups}, in_size={self.in_size}, bias={self.bias is not None})")


@jax.tree_util.register_pytree_node_class
class Conv2d(_Conv):
    """``torch.nn.functional.conv2d`` as a linear operator; weight ``(C_out, C_in/groups, kh, kw)``.

    Args:
      weight: PyTorch-layout kernel. bias: optional ``(C_out,)``, kept apart from the map.
      stride, padding, dilation: ints or pairs, as PyTorch defines them. groups: int dividing
        both channel counts.
      in_size: ``(H, W)`` of the input; needed for ``in_shape``, ``lipschitz`` and for the
        adjoint of a strided conv (several input sizes share one output size).
      precision: convolution precision: "highest" (default, true float32), "high", "default",
        or None for the backend's default (TF32 on recent NVIDIA GPUs).
      layout: internal layout, "NHWC" (default, see the module docstring) or "NCHW".
    """

    transposed = False

    def __init__(self, weight, bias=None, *, stride=1, padding=0, dilation=1, groups=1,
                 in_size=None, precision="highest", layout="NHWC"):
        super().__init__(weight, bias, stride=stride, padding=padding, dilation=dilation,
                         groups=groups, in_size=in_size, precision=precision, layout=layout)

    def apply(self, z):
        return self._direct(z)

    def adjoint(self, y, in_shape):
        # Rows of the input that no output reads (floor in the size formula) come back as zeros.
        extra = [in_shape[1 + i] - ((n - 1) * self.stride[i] - 2 * self.padding[i]
                                    + self.dilation[i] * (self.kernel_size[i] - 1) + 1)
                 for i, n in enumerate(self._spatial(y))]
        return self._transposed(y, extra)


@jax.tree_util.register_pytree_node_class
class ConvTranspose2d(_Conv):
    """``torch.nn.functional.conv_transpose2d`` as a linear operator; weight
    ``(C_in, C_out/groups, kh, kw)``.

    Args: as :class:`Conv2d`, plus ``output_padding`` (int or pair, each < max(stride,
      dilation)), the extra rows/cols PyTorch appends to the output.
    """

    transposed = True

    def apply(self, z):
        return self._transposed(z, self.output_padding)

    def adjoint(self, y, in_shape):
        # With output_padding ≥ stride (possible when dilation > stride) the conv yields more
        # rows than the input has; the extra ones are not part of the adjoint.
        x = self._direct(y)
        if self.layout == "NHWC":
            return x[:, :in_shape[1], :in_shape[2], :]
        return x[:, :, :in_shape[1], :in_shape[2]]


@functools.partial(jax.jit, static_argnums=(1, 3))
def _lanczos(op, in_shape, key, steps):
    """``steps`` Lanczos steps on AᵀA from a Gaussian start: the tridiagonal's (α, β)."""
    v = op.to_internal(jax.random.normal(key, (1,) + tuple(in_shape), op.dtype))
    v = v / jnp.linalg.norm(v)
    tiny = jnp.finfo(op.dtype).tiny

    def step(carry, _):
        v_prev, v, beta = carry
        w = op.adjoint(op.apply(v), in_shape) - beta * v_prev
        alpha = jnp.vdot(v, w).real
        w = w - alpha * v
        beta = jnp.linalg.norm(w)
        # An exhausted Krylov space (small operators) leaves zeros, i.e. eigenvalue-0 padding.
        v_next = jnp.where(beta > tiny, w / jnp.maximum(beta, tiny), 0)
        return (v, v_next, beta), (alpha, beta)

    init = (jnp.zeros_like(v), v, jnp.zeros((), op.dtype))
    _, (alphas, betas) = lax.scan(step, init, None, length=steps)
    return alphas, betas


def _top_ritz_values(alphas, betas):
    """Largest eigenvalue of the leading k×k tridiagonal, for k = 1 … len(alphas)."""
    alphas, betas = np.asarray(alphas, np.float64), np.asarray(betas, np.float64)
    tops = []
    for k in range(1, len(alphas) + 1):
        tri = np.diag(alphas[:k]) + np.diag(betas[:k - 1], 1) + np.diag(betas[:k - 1], -1)
        tops.append(np.linalg.eigvalsh(tri)[-1])
    return np.array(tops)


def lipschitz_constant(op, in_shape, *, rtol=1e-6, max_steps=1024, key=None) -> float:
    """λ_max(AᵀA) for inputs of ``in_shape`` by Lanczos; see ``_LinearOperator.lipschitz``."""
    if not 0 < rtol < 1:
        raise ValueError(f"rtol={rtol!r}: expected 0 < rtol < 1")
    key = jax.random.PRNGKey(0) if key is None else key
    steps = min(32, max_steps)
    while True:
        tops = _top_ritz_values(*_lanczos(op, tuple(in_shape), key, steps))
        window = min(8, steps - 1)
        if abs(tops[-1] - tops[-1 - window]) <= rtol * tops[-1] or steps >= max_steps:
            return float(tops[-1])
        steps = min(2 * steps, max_steps)
