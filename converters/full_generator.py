"""PyTorch generator → verified *generator bundle*: the whole G for JAX (SM-Inv₂ inversion).

Where :mod:`converters.convert` exports only the head, this exports every layer G runs, in eval
mode, as the layer chain :mod:`flipad_jax.generators` executes. A generator converts whole when
it is a registered architecture of :mod:`converters.generators` whose forward is a known chain
(DCGAN, WGAN-GP, EBGAN, medical DCGAN: their ``Sequential``; LSGAN: ``l1``, a reshape, then
``conv_blocks``; KL-WGAN: ``net``), or any plain ``nn.Sequential``, and every layer in the chain
is one :data:`flipad_jax.generators.LAYER_TYPES` covers. Anything else (TorchScript and export
programs, other classes, other layers) is refused with a ``ValueError`` naming it.

Self-check: on ``check_samples`` latents the JAX forward must reproduce torch's eval-mode
forward to ``converters.convert.CHECK_TOLERANCE`` (float64 by default: 1e-5 max abs); the folder
appears only when it does (written atomically).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import NamedTuple, Optional

import jax
import numpy as np
import torch
from torch import nn

import flipad_jax
from flipad_jax._files import atomic_dir, check_new_path
from flipad_jax.generators import FORMAT, SCHEMA_VERSION, Generator, from_arrays, \
    write_generator_files
from converters.convert import CHECK_TOLERANCE
from converters.generators import (DCGANGenerator, EBGANGenerator, KLWGANGenerator,
                                   LSGANGenerator, MedicalDCGANGenerator)
from converters.loading import load_generator
from converters.runner import LATENT_SCHEME, latents
from converters.trace import _module_geometry

_ACTIVATIONS = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}


class GeneratorConversion(NamedTuple):
    """What :func:`convert_generator` did: the bundle folder, its JSON, and the wall time."""

    path: Path
    meta: dict
    seconds: float


def _chain(model: nn.Module) -> list:
    """The modules ``model.forward`` runs, in order, as (name, module) pairs, plus
    ("reshape", (C, H, W)) where the forward reshapes a flat vector into an image."""
    if isinstance(model, (DCGANGenerator, MedicalDCGANGenerator)):
        return [("main", model.main)]
    if isinstance(model, EBGANGenerator):
        return [("conv_blocks", model.conv_blocks)]
    if isinstance(model, LSGANGenerator):
        return [("l1", model.l1), ("reshape", (model.width, model.init_size, model.init_size)),
                ("conv_blocks", model.conv_blocks)]
    if isinstance(model, KLWGANGenerator):
        return [("net", model.net)]
    if type(model) is nn.Sequential:
        return [("", model)]
    raise ValueError(
        f"generator class {type(model).__name__}: cannot be converted whole (SM-Inv₂ needs every "
        "layer in JAX). Expected a registered architecture (dcgan, wgangp, ebgan, lsgan, "
        "medigan_dcgan, klwgan) or a plain nn.Sequential of supported layers")


def _bake_spectral_norm(model: nn.Module) -> None:
    """Replace ``nn.utils.spectral_norm`` hooks (KL-WGAN's) by the eval-mode weight W/σ they
    compute, so the float32 bundle and the float64 self-check reference share that weight.
    ``model`` must be a copy: the hooks are removed in place. (Weights under
    ``nn.utils.parametrize`` are read as computed in eval mode instead; removing those would
    change the class that the copy shares with the caller's module.)"""
    from torch.nn.utils.spectral_norm import SpectralNorm, remove_spectral_norm

    for m in model.modules():
        if any(isinstance(h, SpectralNorm) for h in m._forward_pre_hooks.values()):
            remove_spectral_norm(m)


def _flatten(prefix: str, module: nn.Module):
    """Leaf modules of nested Sequentials as (state_dict prefix, module)."""
    if type(module) is nn.Sequential:
        for name, child in module.named_children():
            yield from _flatten(f"{prefix}.{name}" if prefix else name, child)
    else:
        yield prefix, module


def _tensor(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.float32).numpy().copy()


def _layer(name: str, m: nn.Module, flat: bool) -> tuple[dict, dict]:
    """(JSON entry, arrays) for one leaf module; ``flat`` says whether its input is a vector."""
    if isinstance(m, nn.Linear):
        if not flat:
            raise ValueError(f"layer {name!r} (Linear) runs on an image-shaped activation: "
                             "cannot be converted whole (expected Linear only on vectors)")
        arrays = {f"{name}.weight": _tensor(m.weight)}
        if m.bias is not None:
            arrays[f"{name}.bias"] = _tensor(m.bias)
        return {"type": "linear", "name": name, "bias": m.bias is not None}, arrays
    if type(m) in (nn.Conv2d, nn.ConvTranspose2d):
        kind = "conv2d" if type(m) is nn.Conv2d else "conv_transpose2d"
        arrays = {f"{name}.weight": _tensor(m.weight)}
        if m.bias is not None:
            arrays[f"{name}.bias"] = _tensor(m.bias)
        spec = {"type": kind, "name": name, "bias": m.bias is not None,
                **_module_geometry(m, name)}
        return spec, arrays
    if type(m) is nn.BatchNorm2d:
        if m.running_mean is None:
            raise ValueError(f"layer {name!r} (BatchNorm2d) keeps no running statistics "
                             "(track_running_stats=False): cannot run in eval mode, so the "
                             "generator cannot be converted whole")
        c = m.num_features
        weight = _tensor(m.weight) if m.affine else np.ones(c, np.float32)
        bias = _tensor(m.bias) if m.affine else np.zeros(c, np.float32)
        return ({"type": "batch_norm2d", "name": name, "eps": float(m.eps)},
                {f"{name}.weight": weight, f"{name}.bias": bias,
                 f"{name}.running_mean": _tensor(m.running_mean),
                 f"{name}.running_var": _tensor(m.running_var)})
    if type(m) in _ACTIVATIONS:
        return {"type": _ACTIVATIONS[type(m)]}, {}
    if type(m) is nn.LeakyReLU:
        return {"type": "leaky_relu", "negative_slope": float(m.negative_slope)}, {}
    if type(m) is nn.Upsample and m.mode == "nearest" and m.size is None:
        scale = m.scale_factor if isinstance(m.scale_factor, tuple) else (m.scale_factor,) * 2
        if len(scale) == 2 and all(float(s).is_integer() and s >= 1 for s in scale):
            return {"type": "upsample_nearest", "scale_factor": [int(s) for s in scale]}, {}
    raise ValueError(f"layer {name!r} ({m!r}): cannot be converted whole; expected Linear, "
                     "Conv2d, ConvTranspose2d, BatchNorm2d (with running statistics), ReLU, "
                     "LeakyReLU, Tanh, Sigmoid or nearest Upsample by an integer factor")


def describe(model: nn.Module, latent_shape: tuple) -> tuple[list, dict]:
    """The layer chain of an eval-mode ``model`` as (JSON layer list, arrays); ValueError naming
    the class or layer that cannot be converted."""
    layers, arrays, flat = [], {}, len(latent_shape) == 1
    for prefix, part in _chain(model):
        if prefix == "reshape":
            layers.append({"type": "reshape", "shape": [int(d) for d in part]})
            flat = False
            continue
        for name, leaf in _flatten(prefix, part):
            spec, arr = _layer(name, leaf, flat)
            layers.append(spec)
            arrays.update(arr)
    return layers, arrays


def convert_generator(model, out, *, arch: Optional[str] = None,
                      arch_options: Optional[dict] = None, trust_pickle: bool = False,
                      check_samples: int = 16, check_seed: int = 0,
                      check_dtype: str = "float64", overwrite: bool = False
                      ) -> GeneratorConversion:
    """Convert a whole PyTorch generator into a generator bundle at ``out``.

    Args:
      model: a weights file (state_dict or safetensors, with ``arch``), a pickled module (only
        with ``trust_pickle``), or an ``nn.Module``; see :func:`converters.loading.load_generator`.
      out: the bundle folder to create (must not exist unless ``overwrite``).
      arch, arch_options: registered architecture and constructor overrides for weights files.
      check_samples, check_seed: latents of the self-check (``runner.latents`` of the seed).
      check_dtype: "float64" (default; tolerance 1e-5) or "float32" (1e-4).

    Returns:
      :class:`GeneratorConversion`. Raises ``ValueError`` (and writes nothing) on any refusal.
    """
    t0 = time.perf_counter()
    if check_dtype not in CHECK_TOLERANCE:
        raise ValueError(f"check_dtype={check_dtype!r}: expected one of {list(CHECK_TOLERANCE)}")
    if not isinstance(check_samples, int) or isinstance(check_samples, bool) or check_samples < 1:
        raise ValueError(f"check_samples={check_samples!r}: expected a positive int")
    out = check_new_path(out, overwrite=overwrite)
    source = load_generator(model, arch=arch, arch_options=arch_options,
                            trust_pickle=trust_pickle)
    if not isinstance(source.model, nn.Module) or isinstance(source.model, torch.jit.ScriptModule):
        raise ValueError(f"model={source.file!r} is a {source.format} program: cannot be "
                         "converted whole (its layers are not PyTorch modules here); pass the "
                         "weights with --arch, or an nn.Module")
    if source.latent_shape is None:
        raise ValueError(f"generator class {type(source.model).__name__} has no latent_shape: "
                         "expected the attribute on the module")
    latent_shape = tuple(int(d) for d in source.latent_shape)
    gen = copy.deepcopy(source.model).float().eval()
    check_z = latents(check_seed, 0, check_samples, latent_shape)
    _bake_spectral_norm(gen)
    with torch.no_grad():
        x32 = gen(check_z)
    layers, arrays = describe(gen, latent_shape)
    output_range = getattr(gen, "output_range", None)
    meta = {
        "schema_version": SCHEMA_VERSION, "format": FORMAT,
        "arch": source.arch or type(gen).__name__, "arch_options": source.arch_options,
        "latent_shape": list(latent_shape), "out_shape": [int(d) for d in x32.shape[1:]],
        "output_range": None if output_range is None else [float(v) for v in output_range],
        "bn_mode": "eval", "layers": layers,
        "source": {"format": source.format, "file": source.file, "sha256": source.sha256},
        "versions": {"torch": torch.__version__, "flipad_jax": flipad_jax.__version__},
        "self_check": {"n_samples": check_samples, "seed": check_seed,
                       "latent_scheme": LATENT_SCHEME, "dtype": check_dtype,
                       "max_abs_error": 0.0, "tolerance": CHECK_TOLERANCE[check_dtype]},
    }
    if check_dtype == "float64":
        with torch.no_grad():
            x_ref = copy.deepcopy(gen).double()(check_z.double()).numpy()
    else:
        x_ref = x32.numpy()

    def max_error(g: Generator) -> float:
        return float(np.max(np.abs(np.asarray(g(check_z.numpy().astype(check_dtype))) - x_ref)))

    with jax.enable_x64(check_dtype == "float64"):
        error = max_error(from_arrays(meta, arrays, dtype=check_dtype, precision="highest"))
        meta["self_check"]["max_abs_error"] = error
        if not error <= CHECK_TOLERANCE[check_dtype]:
            raise ValueError(f"self-check failed: the JAX generator reproduces torch's images "
                             f"only up to {error:.3g} (max abs, {check_dtype}), above "
                             f"{CHECK_TOLERANCE[check_dtype]:g}; {meta['arch']} was not "
                             "converted faithfully")
        with atomic_dir(out, overwrite=overwrite) as tmp:
            write_generator_files(tmp, meta, arrays)
            if max_error(Generator.load(tmp, dtype=check_dtype)) != error:
                raise ValueError(f"the bundle written to {tmp} does not read back as written")
    return GeneratorConversion(out, meta, time.perf_counter() - t0)
