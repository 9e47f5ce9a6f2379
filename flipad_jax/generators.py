"""Whole generators in JAX, for baselines that invert all of G (SM-Inv₂, :mod:`flipad_jax.sminv`).

A generator is a chain of layers run in eval mode (BatchNorm with its running statistics),
loaded from a *generator bundle* that :mod:`converters.full_generator` writes from a PyTorch
generator after checking this module's forward against torch's::

    DIR/generator.safetensors   arrays named as in the PyTorch state_dict, PyTorch layout
                                (``<layer>.weight``, ``.bias``, ``.running_mean``, ``.running_var``)
    DIR/generator.json          schema below

``generator.json``, schema version 1::

    schema_version   1
    format           "flipad_generator"
    arch             the registered architecture it came from (dcgan, lsgan, ...)
    arch_options     its constructor options, e.g. {"nz": 100, "ngf": 32, "nc": 1, ...}
    latent_shape     per-sample latent shape, e.g. [100, 1, 1] or [100]
    out_shape        per-sample image shape, e.g. [1, 32, 32]
    output_range     [low, high] of the images, or null
    bn_mode          "eval" (the only mode this module runs)
    layers           the chain, in order; each {"type": T, ...} with T one of LAYER_TYPES:
                     linear {name, bias}; conv2d / conv_transpose2d {name, bias, stride,
                     padding, dilation, groups, (output_padding)}; batch_norm2d {name, eps};
                     relu; leaky_relu {negative_slope}; tanh; sigmoid;
                     upsample_nearest {scale_factor: [h, w] ints}; reshape {shape: [C, H, W]}
    source, versions, self_check   provenance, as in the head bundle

Arrays are channel-first at the API (latents ``(B, *latent_shape)``, images ``(B, C, H, W)``);
inside, image activations run channel-last (NHWC), the layout that measured fastest for these
convolutions on XLA:CPU (STYLE.md). The linear layers are :mod:`flipad_jax.operators` (with their
bias), so the convolution arithmetic is the one the head uses and tests.

Nearest upsampling followed by a stride-1 "same" convolution (LSGAN's blocks) runs fused, as one
small convolution per output phase (:class:`UpsampledConv`): the same map with fewer
multiply-adds (4/9 for LSGAN's 3×3 at ×2, never more than unfused) and no upsampled intermediate.
``fuse_upsampling=False`` keeps the two layers.

BatchNorm mode. The reference inverts with BatchNorm in *training* mode (batch statistics, which
couple all latents of a batch: REFERENCE.md §6.2). Here it runs in eval mode: the product samples
its generators in eval mode (``converters.sampling``), a sample's reconstruction must not depend
on which other samples share its batch, and eval mode is how a generator is deployed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from flipad_jax._checks import check_floating
from flipad_jax.operators import _LAYOUTS, _PRECISIONS, Conv2d, ConvTranspose2d, Linear

SCHEMA_VERSION = 1
FORMAT = "flipad_generator"
WEIGHTS_FILE = "generator.safetensors"
META_FILE = "generator.json"
LAYER_TYPES = ("linear", "conv2d", "conv_transpose2d", "batch_norm2d", "relu", "leaky_relu",
               "tanh", "sigmoid", "upsample_nearest", "reshape")
_LINEAR_TYPES = {"linear": Linear, "conv2d": Conv2d, "conv_transpose2d": ConvTranspose2d}


def _bad(field: str, value, expected: str) -> ValueError:
    return ValueError(f"{META_FILE} field {field!r} is {value!r}: expected {expected}")


def _ints(value, field: str, *, length=None, minimum=0) -> list:
    if not (isinstance(value, list) and value and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in value)
            and (length is None or len(value) == length)):
        n = "" if length is None else f"{length} "
        raise _bad(field, value, f"a list of {n}ints >= {minimum}")
    return value


def _per_channel(v, x):
    """A ``(C,)`` array shaped to broadcast against the channel-last batch ``x``."""
    return v.reshape((1,) * (x.ndim - 1) + (-1,))


def _run_layer(layer, x):
    """One layer of the chain on a channel-last batch (a linear layer with its bias)."""
    if isinstance(layer, (Linear, Conv2d, ConvTranspose2d)):
        x = layer.apply(x)
        return x if layer.bias is None else x + _per_channel(layer.bias, x)
    return layer(x)


@jax.tree_util.register_pytree_node_class
class BatchNorm2d:
    """Eval-mode ``torch.nn.BatchNorm2d``: γ (x − running_mean) / sqrt(running_var + eps) + β,
    per channel, on a channel-last batch. Arrays ``(C,)``; ``eps`` is static."""

    def __init__(self, weight, bias, running_mean, running_var, eps: float):
        self.weight, self.bias = weight, bias
        self.running_mean, self.running_var = running_mean, running_var
        self.eps = float(eps)

    def __call__(self, x):
        scale = self.weight / jnp.sqrt(self.running_var + self.eps)
        return (x - _per_channel(self.running_mean, x)) * _per_channel(scale, x) + \
            _per_channel(self.bias, x)

    def tree_flatten(self):
        return (self.weight, self.bias, self.running_mean, self.running_var), (self.eps,)

    @classmethod
    def tree_unflatten(cls, static, children):
        return cls(*children, *static)


@jax.tree_util.register_pytree_node_class
class Elementwise:
    """A parameter-free step: an activation, nearest upsampling, or the flat → image reshape.

    ``kind`` is a layer type of ``LAYER_TYPES``; ``arg`` its static argument (the negative
    slope, the (h, w) scale factor, or the (C, H, W) shape)."""

    def __init__(self, kind: str, arg=None):
        self.kind, self.arg = kind, arg

    def __call__(self, x):
        if self.kind == "relu":
            return jax.nn.relu(x)
        if self.kind == "leaky_relu":
            return jnp.where(x >= 0, x, self.arg * x)
        if self.kind == "tanh":
            return jnp.tanh(x)
        if self.kind == "sigmoid":
            return jax.nn.sigmoid(x)
        if self.kind == "upsample_nearest":  # channel-last image batch
            return jnp.repeat(jnp.repeat(x, self.arg[0], axis=1), self.arg[1], axis=2)
        # reshape: PyTorch's view of a flat vector as (C, H, W), then channel-last
        return jnp.moveaxis(x.reshape((x.shape[0],) + tuple(self.arg)), 1, -1)

    def tree_flatten(self):
        return (), (self.kind, self.arg)

    @classmethod
    def tree_unflatten(cls, static, children):
        return cls(*static)


def _phase_taps(k: int, s: int) -> list:
    """Per output phase r of nearest upsampling by ``s`` then a size-``k`` (odd) convolution
    with padding ``k // 2``, along one axis: ``(A_r, (pad_lo, pad_hi))``, where ``A_r`` ``(m, k)``
    sums the kernel's taps that read the same small-image pixel (tap t of output s·i + r reads
    pixel i + ⌊(r + t − k//2) / s⌋), and the pads make the phase's output as long as the input."""
    taps = []
    for r in range(s):
        offsets = (r + np.arange(k) - k // 2) // s
        lo = offsets[0]
        a = np.zeros((offsets[-1] - lo + 1, k))
        a[offsets - lo, np.arange(k)] = 1.0
        taps.append((a, (int(-lo), int(offsets[-1]))))
    return taps


@jax.tree_util.register_pytree_node_class
class UpsampledConv:
    """Nearest upsampling by ``scale`` = (s_h, s_w), then ``conv`` (a stride-1, dilation-1
    :class:`~flipad_jax.operators.Conv2d` with odd kernel and padding k // 2, and its bias), on a
    channel-last batch ``(B, H, W, C)`` → ``(B, s_h·H, s_w·W, O)``.

    Output pixel (s_h·i + r, s_w·j + c) reads only small-image pixels near (i, j), so each of the
    s_h·s_w phases (r, c) is one convolution of the small image with a kernel that sums the taps
    reading the same pixel; the phases are then interleaved. On LSGAN's 3×3 blocks at ×2 that is
    4 taps a phase instead of 9: the generator's gradient at batch 20 took half the time of
    upsampling then convolving (CPU, ``benchmarks/README.md``)."""

    def __init__(self, scale: tuple, conv: Conv2d):
        self.scale, self.conv = tuple(scale), conv

    @staticmethod
    def fuses(upsample, conv) -> bool:
        """Whether ``upsample`` then ``conv`` (two layers of a chain) can run as one."""
        return (isinstance(upsample, Elementwise) and upsample.kind == "upsample_nearest"
                and type(conv) is Conv2d and conv.layout == "NHWC"
                and conv.stride == (1, 1) and conv.dilation == (1, 1)
                and all(k % 2 and p == k // 2 for k, p in zip(conv.kernel_size, conv.padding)))

    def __call__(self, x):
        conv = self.conv
        hwio = jnp.transpose(conv.weight, _LAYOUTS["NHWC"][1])
        (kh, kw), (sh, sw) = conv.kernel_size, self.scale
        highest = _PRECISIONS["highest"]  # the sums of taps: exact enough in float32 anywhere
        phases = [[conv._conv(x, jnp.einsum("at,bu,tuco->abco", a.astype(hwio.dtype),
                                            b.astype(hwio.dtype), hwio, precision=highest),
                              stride=(1, 1), padding=[pad_a, pad_b], lhs_dilation=(1, 1),
                              rhs_dilation=(1, 1))
                   for b, pad_b in _phase_taps(kw, sw)] for a, pad_a in _phase_taps(kh, sh)]
        y = jnp.stack([jnp.stack(row, axis=3) for row in phases], axis=2)  # (B, H, sh, W, sw, O)
        y = y.reshape(x.shape[0], x.shape[1] * sh, x.shape[2] * sw, y.shape[-1])
        return y if conv.bias is None else y + _per_channel(conv.bias, y)

    def tree_flatten(self):
        return (self.conv,), self.scale

    @classmethod
    def tree_unflatten(cls, scale, children):
        return cls(scale, *children)


def _fuse_upsampling(layers: list) -> list:
    """The chain with every fusable (upsample, conv) pair as one :class:`UpsampledConv`."""
    fused = []
    for layer in layers:
        if fused and UpsampledConv.fuses(fused[-1], layer):
            layer = UpsampledConv(fused.pop().arg, layer)
        fused.append(layer)
    return fused


class GeneratorInfo(NamedTuple):
    """Static (hashable) facts about a generator: shapes, output range, architecture, and the
    bundle's JSON as text."""

    latent_shape: tuple
    out_shape: tuple
    output_range: Optional[tuple]
    arch: str
    meta_json: str


@jax.tree_util.register_pytree_node_class
class Generator:
    """A whole generator G as a JAX pytree: ``G(z)`` maps ``(B, *latent_shape)`` latents to
    ``(B, *out_shape)`` images, in eval mode. Build it with :meth:`load` (from a generator
    bundle) or :func:`from_arrays`. Passing it through ``jit``/``vmap``/``grad`` is allowed:
    arrays are leaves, the layer chain is static."""

    def __init__(self, layers: tuple, info: GeneratorInfo):
        self.layers, self.info = tuple(layers), info

    latent_shape = property(lambda self: self.info.latent_shape)
    out_shape = property(lambda self: self.info.out_shape)
    output_range = property(lambda self: self.info.output_range)

    @property
    def meta(self) -> dict:
        """The bundle's JSON (provenance, self-check, layer chain)."""
        return json.loads(self.info.meta_json)

    def tree_flatten(self):
        return (self.layers,), self.info

    @classmethod
    def tree_unflatten(cls, info, children):
        return cls(children[0], info)

    def __call__(self, z):
        """G(z): latents ``(B, *latent_shape)`` → images ``(B, *out_shape)``, z's dtype."""
        x = jnp.moveaxis(z, 1, -1) if z.ndim == 4 else z  # image-shaped latents: channel-last
        for layer in self.layers:
            x = _run_layer(layer, x)
        return jnp.moveaxis(x, -1, 1) if x.ndim == 4 else x

    def check_latents(self, name: str, z):
        """``z`` as an array; a ValueError naming ``name`` unless it is ``(B, *latent_shape)``
        floating."""
        z = jnp.asarray(z)
        if z.ndim != len(self.latent_shape) + 1 or tuple(z.shape[1:]) != self.latent_shape:
            raise ValueError(f"{name} has shape {tuple(z.shape)}: expected (B, "
                             f"{', '.join(map(str, self.latent_shape))}) (the latent shape)")
        check_floating(name, z)
        return z

    @classmethod
    def load(cls, path, *, dtype=np.float32, precision: Optional[str] = "highest",
             fuse_upsampling: bool = True) -> "Generator":
        """Read and validate the generator bundle folder ``path``.

        Args:
          dtype: dtype of the weights (float64 needs ``jax.enable_x64``).
          precision: convolution precision, as in :mod:`flipad_jax.operators` ("highest" by
            default; None for the backend's default, TF32 on recent NVIDIA GPUs).
          fuse_upsampling: run nearest upsampling + "same" convolution as
            :class:`UpsampledConv` (the same map, fewer multiply-adds); False keeps the layers.
        """
        path = Path(path)
        for name in (META_FILE, WEIGHTS_FILE):
            if not (path / name).is_file():
                raise ValueError(f"path={str(path)!r}: expected a generator bundle folder holding "
                                 f"{META_FILE} and {WEIGHTS_FILE} (converters.full_generator "
                                 f"writes one); {name} is missing")
        try:
            meta = json.loads((path / META_FILE).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path / META_FILE}: not valid JSON ({e})") from None
        try:
            arrays = load_file(str(path / WEIGHTS_FILE))
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"{path / WEIGHTS_FILE}: not a readable safetensors file ({e})") \
                from None
        return from_arrays(meta, arrays, dtype=dtype, precision=precision,
                           fuse_upsampling=fuse_upsampling)


def _layer(spec, i: int, arrays: dict, used: set, dtype, precision, in_shape: tuple):
    """One layer of the chain from its JSON entry and its arrays; ``in_shape`` is the
    per-sample channel-last shape reaching it (a convolution needs its input size)."""
    field = f"layers[{i}]"
    if not isinstance(spec, dict) or spec.get("type") not in LAYER_TYPES:
        got = spec.get("type") if isinstance(spec, dict) else spec
        raise _bad(f"{field}.type", got, f"one of {list(LAYER_TYPES)}")
    kind = spec["type"]

    def array(suffix):
        name = spec.get("name")
        if not isinstance(name, str):
            raise _bad(f"{field}.name", name, "the layer's state_dict prefix (a string)")
        key = f"{name}.{suffix}"
        if key not in arrays:
            raise ValueError(f"{WEIGHTS_FILE} lacks {key!r}, needed by {field} ({kind})")
        used.add(key)
        return jnp.asarray(arrays[key], dtype)

    if kind in _LINEAR_TYPES:
        bias = array("bias") if spec.get("bias") else None
        if kind == "linear":
            return Linear(array("weight"), bias, precision=precision)
        geometry = {k: _ints(spec.get(k), f"{field}.{k}", length=2)
                    for k in ("stride", "padding", "dilation")}
        if kind == "conv_transpose2d":
            geometry["output_padding"] = _ints(spec.get("output_padding"),
                                               f"{field}.output_padding", length=2)
        groups = _ints([spec.get("groups")], f"{field}.groups", minimum=1)[0]
        if len(in_shape) != 3:
            raise ValueError(f"{META_FILE}: {field} ({kind}) takes images, but its input has "
                             f"per-sample shape {list(in_shape)} (channel-last)")
        return _LINEAR_TYPES[kind](array("weight"), bias, groups=groups, precision=precision,
                                   in_size=in_shape[:2],
                                   **{k: tuple(v) for k, v in geometry.items()})
    if kind == "batch_norm2d":
        eps = spec.get("eps")
        if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps > 0):
            raise _bad(f"{field}.eps", eps, "a positive number")
        return BatchNorm2d(array("weight"), array("bias"), array("running_mean"),
                           array("running_var"), eps)
    if kind == "leaky_relu":
        slope = spec.get("negative_slope")
        if not (isinstance(slope, (int, float)) and not isinstance(slope, bool)):
            raise _bad(f"{field}.negative_slope", slope, "a number")
        return Elementwise(kind, float(slope))
    if kind == "upsample_nearest":
        return Elementwise(kind, tuple(_ints(spec.get("scale_factor"), f"{field}.scale_factor",
                                             length=2, minimum=1)))
    if kind == "reshape":
        return Elementwise(kind, tuple(_ints(spec.get("shape"), f"{field}.shape", length=3,
                                             minimum=1)))
    return Elementwise(kind)


def from_arrays(meta: dict, arrays: dict, *, dtype=np.float32,
                precision: Optional[str] = "highest", fuse_upsampling: bool = True) -> Generator:
    """A :class:`Generator` from a bundle's JSON ``meta`` and its ``arrays`` (name → numpy),
    validated: every field, every array used exactly once, and the chain's output shape;
    ``dtype``, ``precision`` and ``fuse_upsampling`` as in :meth:`Generator.load`."""
    if not isinstance(meta, dict):
        raise ValueError(f"{META_FILE} holds a {type(meta).__name__}: expected a JSON object")
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise _bad("schema_version", meta.get("schema_version"), str(SCHEMA_VERSION))
    if meta.get("format") != FORMAT:
        raise _bad("format", meta.get("format"), repr(FORMAT))
    if meta.get("bn_mode") != "eval":
        raise _bad("bn_mode", meta.get("bn_mode"), "'eval'")
    if not isinstance(meta.get("arch"), str):
        raise _bad("arch", meta.get("arch"), "the architecture's name (a string)")
    latent_shape = tuple(_ints(meta.get("latent_shape"), "latent_shape", minimum=1))
    out_shape = tuple(_ints(meta.get("out_shape"), "out_shape", minimum=1))
    if len(latent_shape) not in (1, 3):
        raise _bad("latent_shape", list(latent_shape), "(D,) or (C, H, W)")
    output_range = meta.get("output_range")
    if output_range is not None:
        if not (isinstance(output_range, list) and len(output_range) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in output_range)
                and output_range[0] < output_range[1]):
            raise _bad("output_range", output_range, "[low, high] with low < high, or null")
        output_range = tuple(float(v) for v in output_range)
    layers_meta = meta.get("layers")
    if not isinstance(layers_meta, list) or not layers_meta:
        raise _bad("layers", layers_meta, "a non-empty list of layers")
    dtype = np.dtype(dtype)
    if not np.issubdtype(dtype, np.floating):
        raise ValueError(f"dtype={dtype}: expected a floating dtype (float32 or float64)")
    used: set = set()
    layers = []
    shape = latent_shape[1:] + latent_shape[:1] if len(latent_shape) == 3 else latent_shape
    for i, spec in enumerate(layers_meta):  # the shape is threaded through for the convolutions
        layers.append(_layer(spec, i, arrays, used, dtype, precision, shape))
        try:
            shape = jax.eval_shape(lambda x: _run_layer(layers[-1], x),
                                   jax.ShapeDtypeStruct((1,) + shape, dtype)).shape[1:]
        except (TypeError, ValueError) as e:
            raise ValueError(f"{META_FILE}: the layer chain does not run on latents of shape "
                             f"{list(latent_shape)} (layers[{i}]: {e})") from None
    if set(arrays) != used:
        raise ValueError(f"{WEIGHTS_FILE} holds arrays no layer uses: "
                         f"{sorted(set(arrays) - used)}")
    if fuse_upsampling:
        layers = _fuse_upsampling(layers)
    gen = Generator(layers, GeneratorInfo(latent_shape, out_shape, output_range, meta["arch"],
                                          json.dumps(meta, sort_keys=True)))
    try:
        got = jax.eval_shape(gen, jax.ShapeDtypeStruct((1,) + latent_shape, dtype)).shape[1:]
    except (TypeError, ValueError) as e:
        raise ValueError(f"{META_FILE}: the layer chain does not run on latents of shape "
                         f"{list(latent_shape)} ({e})") from None
    if tuple(got) != out_shape:
        raise _bad("out_shape", list(out_shape), f"{list(got)}, what the layer chain makes "
                   f"from latents of shape {list(latent_shape)}")
    return gen


def write_generator_files(folder, meta: dict, arrays: dict) -> None:
    """Validate (``meta``, ``arrays``) as a bundle and write its two files into an existing
    (temporary) ``folder``; the caller makes the folder appear atomically (``atomic_dir``)."""
    from_arrays(meta, arrays, dtype=np.float32)
    folder = Path(folder)
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()},
              str(folder / WEIGHTS_FILE))
    (folder / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
