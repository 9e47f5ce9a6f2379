"""The head bundle: the folder that carries a generator's last layer from PyTorch to JAX.

Layout (DESIGN.md, "The head bundle")::

    DIR/head.safetensors   weight (PyTorch layout), bias (only if the layer has one), zbar
    DIR/head.json          everything else, schema below

``head.json``, schema version 1::

    schema_version   1
    layer            kind: "conv2d" | "conv_transpose2d" | "linear"; name: the layer's name in the
                     generator; has_bias: bool; for convolutions also stride, padding, dilation
                     ([h, w] ints), output_padding ([h, w], conv_transpose2d only) and groups (int)
    in_shape         per-sample shape of the layer's input, e.g. [64, 32, 32] or [300]
    out_shape        per-sample shape of its output, e.g. [3, 64, 64]
    activation       "tanh" | "sigmoid" | "identity"
    output_range     [low, high] of the generator's images, or null (unbounded identity heads);
                     for tanh and sigmoid heads it is the activation's range
    zbar             n_samples, seed, batch_size (ints), bn_mode ("eval" | "train" |
                     "as_exported"), latent_shape (ints), latent_scheme (how latents are drawn)
    lipschitz        ‖A‖² of the linear map (Lanczos iteration), > 0; checked on reading
    source           format, file (name or null), sha256 (64 hex digits), arch (or null),
                     arch_options (object)
    versions         torch, flipad_jax (strings)
    self_check       n_samples, dtype, max_abs_error, tolerance
    features         optional: downsample ("maxpool" | "crop") and size (int >= 1), how FLIPAD
                     features of this head are reduced by default (``flipad convert --diffusers``)

Other top-level fields (e.g. ``diffusers``: the VAE's latent scaling) are provenance, kept as
written.

Reading validates every field and the array shapes against the geometry, and re-estimates
``lipschitz`` from the weights (a wrong one would make the default solver step diverge or
crawl); every error names the field. Nothing here imports torch: the converter writes bundles
through this module, and :class:`flipad_jax.Head` reads them through it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
from safetensors.numpy import load_file, save_file

from flipad_jax._files import atomic_dir
from flipad_jax.activations import ACTIVATIONS
from flipad_jax.operators import Conv2d, ConvTranspose2d, Linear

SCHEMA_VERSION = 1
WEIGHTS_FILE = "head.safetensors"
META_FILE = "head.json"
LAYER_KINDS = ("conv2d", "conv_transpose2d", "linear")
BN_MODES = ("eval", "train", "as_exported")
DOWNSAMPLE_MODES = ("maxpool", "crop")  # FLIPAD's spatial reductions (flipad_jax.features)
# Reading re-estimates ‖A‖² with a short Lanczos run (a lower bound that converges from below)
# and refuses a stored value outside [estimate · (1 − LOW), estimate · (1 + HIGH)].
LIPSCHITZ_CHECK_LOW, LIPSCHITZ_CHECK_HIGH = 1e-3, 0.05


class Bundle(NamedTuple):
    """A head bundle in memory: the metadata dict (head.json) and the three arrays.

    ``weight`` is in PyTorch layout, ``bias`` is None for a bias-free layer, ``zbar`` has the
    per-sample input shape (``meta["in_shape"]``).
    """

    meta: dict
    weight: np.ndarray
    bias: Optional[np.ndarray]
    zbar: np.ndarray


# -- field checks -------------------------------------------------------------------------------
def _bad(field: str, value, expected: str) -> ValueError:
    return ValueError(f"head.json: field {field!r} is {value!r}: expected {expected}")


def _get(meta: dict, field: str):
    node = meta
    for part in field.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ValueError(f"head.json: field {field!r} is missing")
        node = node[part]
    return node


def _int(meta, field, minimum=None):
    v = _get(meta, field)
    if not isinstance(v, int) or isinstance(v, bool) or (minimum is not None and v < minimum):
        raise _bad(field, v, "an int" + ("" if minimum is None else f" >= {minimum}"))
    return v


def _ints(meta, field, length=None, minimum=0):
    v = _get(meta, field)
    ok = isinstance(v, list) and all(isinstance(e, int) and not isinstance(e, bool)
                                     and e >= minimum for e in v)
    if not ok or (length is not None and len(v) != length) or (length is None and not v):
        what = f"{length} ints" if length is not None else "a non-empty list of ints"
        raise _bad(field, v, f"{what} >= {minimum}")
    return tuple(v)


def _str(meta, field, choices=None, nullable=False):
    v = _get(meta, field)
    if nullable and v is None:
        return v
    if not isinstance(v, str) or (choices is not None and v not in choices):
        raise _bad(field, v, f"one of {list(choices)}" if choices else "a string")
    return v


def _number(meta, field, positive=False):
    v = _get(meta, field)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not np.isfinite(v) or \
            (positive and v <= 0):
        raise _bad(field, v, "a finite number" + (" > 0" if positive else ""))
    return float(v)


def validate_meta(meta: dict) -> None:
    """Check every field of head.json (types, values, consistency between fields)."""
    if not isinstance(meta, dict):
        raise ValueError(f"head.json holds a {type(meta).__name__}: expected a JSON object")
    version = _get(meta, "schema_version")
    if version != SCHEMA_VERSION:
        raise _bad("schema_version", version, f"{SCHEMA_VERSION} (this flipad_jax reads only "
                   "that version; convert the generator again)")
    kind = _str(meta, "layer.kind", LAYER_KINDS)
    _str(meta, "layer.name")
    if not isinstance(_get(meta, "layer.has_bias"), bool):
        raise _bad("layer.has_bias", _get(meta, "layer.has_bias"), "true or false")
    geometry = ("stride", "padding", "dilation", "groups", "output_padding")
    if kind == "linear":
        present = [g for g in geometry if g in meta["layer"]]
        if present:
            raise _bad(f"layer.{present[0]}", meta["layer"][present[0]],
                       "no convolution geometry for a linear layer")
    else:
        _ints(meta, "layer.stride", 2, 1)
        _ints(meta, "layer.padding", 2, 0)
        _ints(meta, "layer.dilation", 2, 1)
        _int(meta, "layer.groups", 1)
        if kind == "conv_transpose2d":
            _ints(meta, "layer.output_padding", 2, 0)
        elif "output_padding" in meta["layer"]:
            raise _bad("layer.output_padding", meta["layer"]["output_padding"],
                       "no output_padding for conv2d")
    rank = 1 if kind == "linear" else 3
    for field in ("in_shape", "out_shape"):
        if len(_ints(meta, field, minimum=1)) != rank:
            raise _bad(field, meta[field], f"{rank} positive ints for a {kind} layer")
    activation = _str(meta, "activation", sorted(ACTIVATIONS))
    out_range = _get(meta, "output_range")
    natural = ACTIVATIONS[activation].range
    if out_range is None:
        if natural is not None:
            raise _bad("output_range", out_range, f"{list(natural)} for a {activation} head")
    else:
        ok = isinstance(out_range, list) and len(out_range) == 2 and all(
            isinstance(e, (int, float)) and not isinstance(e, bool) and np.isfinite(e)
            for e in out_range) and out_range[0] < out_range[1]
        if not ok:
            raise _bad("output_range", out_range, "[low, high] with low < high, or null")
        if natural is not None and tuple(out_range) != natural:
            raise _bad("output_range", out_range, f"{list(natural)} for a {activation} head")
    _int(meta, "zbar.n_samples", 1)
    _int(meta, "zbar.seed", 0)
    _int(meta, "zbar.batch_size", 1)
    _str(meta, "zbar.bn_mode", BN_MODES)
    _ints(meta, "zbar.latent_shape", minimum=1)
    _str(meta, "zbar.latent_scheme")
    _number(meta, "lipschitz", positive=True)
    _str(meta, "source.format")
    _str(meta, "source.file", nullable=True)
    sha = _str(meta, "source.sha256")
    if not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise _bad("source.sha256", sha, "64 lowercase hex digits")
    _str(meta, "source.arch", nullable=True)
    if not isinstance(_get(meta, "source.arch_options"), dict):
        raise _bad("source.arch_options", meta["source"]["arch_options"], "a JSON object")
    _str(meta, "versions.torch")
    _str(meta, "versions.flipad_jax")
    _int(meta, "self_check.n_samples", 1)
    _str(meta, "self_check.dtype", ("float32", "float64"))
    _number(meta, "self_check.max_abs_error")
    _number(meta, "self_check.tolerance", positive=True)
    if "features" in meta:
        _str(meta, "features.downsample", DOWNSAMPLE_MODES)
        _int(meta, "features.size", 1)


def build_operator(bundle: Bundle, dtype=None, precision=None):
    """The JAX operator of the bundle's layer (weights cast to ``dtype``, default the file's)."""
    meta = bundle.meta
    layer = meta["layer"]
    weight = bundle.weight if dtype is None else bundle.weight.astype(dtype)
    bias = None if bundle.bias is None else bundle.bias.astype(weight.dtype)
    if layer["kind"] == "linear":
        return Linear(weight, bias, precision=precision)
    kwargs = dict(stride=tuple(layer["stride"]), padding=tuple(layer["padding"]),
                  dilation=tuple(layer["dilation"]), groups=layer["groups"],
                  in_size=tuple(meta["in_shape"][1:]), precision=precision)
    if layer["kind"] == "conv_transpose2d":
        return ConvTranspose2d(weight, bias, output_padding=tuple(layer["output_padding"]),
                               **kwargs)
    return Conv2d(weight, bias, **kwargs)


def validate_bundle(bundle: Bundle) -> None:
    """Check head.json and that the arrays agree with it (shapes, dtypes, finiteness)."""
    validate_meta(bundle.meta)
    meta = bundle.meta
    arrays = {"weight": bundle.weight, "zbar": bundle.zbar}
    if meta["layer"]["has_bias"] != (bundle.bias is not None):
        raise ValueError(f"head.safetensors {'lacks' if meta['layer']['has_bias'] else 'has'} "
                         f"an array 'bias' but head.json field 'layer.has_bias' is "
                         f"{meta['layer']['has_bias']}")
    if bundle.bias is not None:
        arrays["bias"] = bundle.bias
    for name, a in arrays.items():
        if not isinstance(a, np.ndarray) or a.dtype not in (np.float32, np.float64):
            raise ValueError(f"head.safetensors: array {name!r} has dtype "
                             f"{getattr(a, 'dtype', type(a))}: expected float32 or float64")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"head.safetensors: array {name!r} holds NaN/inf values")
    in_shape, out_shape = tuple(meta["in_shape"]), tuple(meta["out_shape"])
    if bundle.zbar.shape != in_shape:
        raise ValueError(f"head.safetensors: array 'zbar' has shape {bundle.zbar.shape}: "
                         f"expected head.json field 'in_shape' {list(in_shape)}")
    try:
        op = build_operator(bundle)
        op_in, op_out = tuple(op.in_shape), tuple(op.out_shape)
    except ValueError as e:
        raise ValueError(f"head.safetensors: array 'weight' of shape {bundle.weight.shape} does "
                         f"not fit head.json's layer {meta['layer']}: {e}") from None
    if op_in != in_shape:
        raise ValueError(f"head.safetensors: array 'weight' of shape {bundle.weight.shape} takes "
                         f"inputs of shape {list(op_in)}: expected head.json field 'in_shape' "
                         f"{list(in_shape)}")
    if op_out != out_shape:
        raise ValueError(f"head.json field 'out_shape' is {list(out_shape)}: the layer maps "
                         f"{list(in_shape)} to {list(op_out)}")


# -- files --------------------------------------------------------------------------------------
def write_bundle_files(folder, bundle: Bundle) -> None:
    """Validate ``bundle`` and write its two files into an existing (temporary) ``folder``."""
    validate_bundle(bundle)
    folder = Path(folder)
    arrays = {"weight": bundle.weight, "zbar": bundle.zbar}
    if bundle.bias is not None:
        arrays["bias"] = bundle.bias
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()},
              str(folder / WEIGHTS_FILE))
    (folder / META_FILE).write_text(json.dumps(bundle.meta, indent=2, sort_keys=True) + "\n")


def write_bundle(path, bundle: Bundle, *, overwrite: bool = False) -> Path:
    """Validate and write ``bundle`` to the folder ``path``, atomically."""
    with atomic_dir(path, overwrite=overwrite) as tmp:
        write_bundle_files(tmp, bundle)
    return Path(path)


def read_bundle(path) -> Bundle:
    """Read and validate the bundle folder ``path``."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"path={str(path)!r}: expected a head bundle folder (holding "
                         f"{META_FILE} and {WEIGHTS_FILE})")
    for name in (META_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise ValueError(f"path={str(path)!r}: the bundle lacks {name}")
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path / META_FILE}: not valid JSON ({e})") from None
    validate_meta(meta)
    try:
        arrays = load_file(str(path / WEIGHTS_FILE))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{path / WEIGHTS_FILE}: not a readable safetensors file ({e})") from None
    expected = {"weight", "zbar"} | ({"bias"} if meta["layer"]["has_bias"] else set())
    if set(arrays) != expected:
        raise ValueError(f"{path / WEIGHTS_FILE} holds arrays {sorted(arrays)}: expected "
                         f"{sorted(expected)} (head.json field 'layer.has_bias' is "
                         f"{meta['layer']['has_bias']})")
    bundle = Bundle(meta, arrays["weight"], arrays.get("bias"), arrays["zbar"])
    validate_bundle(bundle)
    _check_lipschitz(bundle)
    return bundle


def _check_lipschitz(bundle: Bundle) -> None:
    """Refuse a stored ‖A‖² that the weights do not have: too small, the default step 1/L
    diverges; too large, the solver crawls. A stored value above the estimate is given the
    wider margin because a short Lanczos run may still be below ‖A‖²."""
    op = build_operator(bundle)
    estimate = op.lipschitz(rtol=1e-4, max_steps=128)
    stored = bundle.meta["lipschitz"]
    if not estimate * (1 - LIPSCHITZ_CHECK_LOW) <= stored <= estimate * (1 + LIPSCHITZ_CHECK_HIGH):
        raise ValueError(f"head.json field 'lipschitz' is {stored:.6g} but the weights give "
                         f"||A||^2 = {estimate:.6g} (Lanczos): the bundle's weights or its "
                         "lipschitz field were changed; convert the generator again")
