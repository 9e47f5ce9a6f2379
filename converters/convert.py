"""PyTorch generator → verified head bundle (``flipad convert``).

Steps: load the generator safely (:mod:`converters.loading`), find its head by tracing a forward
call (:mod:`converters.trace`), compute z̄ = the mean input of the head over ``samples`` latents
(float64 accumulation, batches, progress bar), estimate ‖A‖², and check on ``check_samples``
latents that the JAX head reproduces the generator's images: max |head.forward(z) − G(latent)|
must stay below 1e-4 (float32) or 1e-5 (float64), else the conversion fails. The bundle folder
appears only when everything succeeded (written atomically).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import NamedTuple, Optional

import jax
import numpy as np
import torch
from tqdm.auto import tqdm

import flipad_jax
from flipad_jax.activations import get_activation, resolve_output_range
from flipad_jax._checks import check_int
from flipad_jax._files import atomic_dir, check_new_path
from flipad_jax.bundle import Bundle, build_operator, write_bundle_files
from flipad_jax.head import Head
from converters.runner import LATENT_SCHEME, Prepared, latents, open_generator

CHECK_TOLERANCE = {"float32": 1e-4, "float64": 1e-5}


class Conversion(NamedTuple):
    """What :func:`convert` did: the bundle folder, its head.json, and the wall time."""

    path: Path
    meta: dict
    seconds: float


def mean_activation(prepared: Prepared, samples: int, *, seed: int, batch_size: int,
                    keep: int = 0, progress: bool = True):
    """z̄: the mean input of the head over latents 0..samples−1 of ``seed``, in float64.

    Returns ``(zbar, kept)``: zbar ``in_shape`` float64 numpy; kept = (latents, images,
    head inputs) of the first ``keep`` samples (for the self-check).
    """
    total, kept = None, []
    acc_device = prepared.device if prepared.device.type != "mps" else torch.device("cpu")
    bar = tqdm(total=samples, desc="z̄", unit="latent", disable=not progress, leave=False)
    for start in range(0, samples, batch_size):
        z = latents(seed, start, min(batch_size, samples - start), prepared.latent_shape)
        have = sum(k[0].shape[0] for k in kept)
        x, head_in = prepared.probe(z.to(prepared.device, prepared.dtype), outputs=have < keep)
        batch_sum = head_in.to(acc_device, torch.float64).sum(0)
        total = batch_sum if total is None else total + batch_sum
        if have < keep:
            kept.append((z[:keep - have], x[:keep - have].cpu(), head_in[:keep - have].cpu()))
        bar.update(z.shape[0])
    bar.close()
    zbar = (total / samples).cpu().numpy()
    return zbar, tuple(torch.cat(parts) for parts in zip(*kept)) if kept else None


def _max_error(head: Head, head_in: torch.Tensor, x: torch.Tensor) -> float:
    """max |head.forward(head_in) − x| in the head's dtype."""
    dtype = np.dtype(head.op.dtype)
    out = np.asarray(head.forward(head_in.numpy().astype(dtype)))
    return float(np.max(np.abs(out - x.numpy().astype(dtype))))


def convert(model, out, *, arch: Optional[str] = None, arch_options: Optional[dict] = None,
            latent_shape=None, samples: int = 10000, layer: Optional[str] = None, seed: int = 0,
            batch_size: Optional[int] = None, bn_mode: str = "eval", device=None,
            trust_pickle: bool = False, output_range=None, check_samples: int = 64,
            check_dtype: str = "float32", overwrite: bool = False,
            progress: bool = True, extra_meta: Optional[dict] = None) -> Conversion:
    """Convert a PyTorch generator into a head bundle at ``out`` (the CLI's ``flipad convert``).

    Args:
      model: file path (state_dict with ``arch``, safetensors with ``arch``, TorchScript,
        torch.export program; a pickled module only with ``trust_pickle``), an ``nn.Module``, or
        a loaded :class:`~converters.loading.Source`.
      out: the bundle folder to create (must not exist unless ``overwrite``).
      arch, arch_options: registered architecture and constructor overrides for weights files.
      latent_shape: per-sample latent shape; default from the architecture / program.
      samples: N latents for z̄ (default 10000). seed: their seed (see ``runner.latents``).
      layer: name of the layer to invert; default the last linear layer that runs.
      batch_size: latents per forward pass; default 128 with bn_mode="train" (the reference's
        batches, which set the batch statistics) and 500 in eval mode (faster; no effect on z̄).
      bn_mode: "eval" (running statistics, default) or "train" (batch statistics, the
        reference's behaviour); z̄ and samples must use the same mode.
      device: torch device; default CUDA, then MPS, then CPU.
      output_range: (low, high) of the images for identity heads (default: the architecture's,
        else unbounded); tanh/sigmoid heads use the activation's range.
      check_samples, check_dtype: latents and dtype ("float32" or "float64", the latter for
        nn.Module generators) of the self-check.
      overwrite: replace an existing ``out``.
      progress: show a progress bar.
      extra_meta: further top-level head.json fields (must not replace the schema's own).

    Returns:
      :class:`Conversion`. Raises ``ValueError`` (and writes nothing) on any refusal.
    """
    t0 = time.perf_counter()
    if batch_size is None:
        batch_size = 128 if bn_mode == "train" else 500
    for name, value in (("samples", samples), ("batch_size", batch_size),
                        ("check_samples", check_samples)):
        check_int(name, value)
    check_int("seed", seed, minimum=0)
    if check_dtype not in CHECK_TOLERANCE:
        raise ValueError(f"check_dtype={check_dtype!r}: expected one of {list(CHECK_TOLERANCE)}")
    out = check_new_path(out, overwrite=overwrite)
    source, prepared = open_generator(model, arch=arch, arch_options=arch_options,
                                      trust_pickle=trust_pickle, latent_shape=latent_shape,
                                      bn_mode=bn_mode, device=device, layer=layer,
                                      trace_seed=seed)
    head = prepared.head
    out_range = _output_range(head.activation, output_range, source)
    zbar, (check_z, check_x, check_in) = mean_activation(
        prepared, samples, seed=seed, batch_size=batch_size, keep=check_samples,
        progress=progress)
    if check_dtype == "float64":
        prepared64 = prepared.to_float64()
        check_x, check_in = prepared64.probe(check_z.to(prepared64.device, torch.float64))
        check_x, check_in = check_x.cpu(), check_in.cpu()

    weight = head.weight.cpu().numpy()
    bias = None if head.bias is None else head.bias.cpu().numpy()
    layer_meta = {"kind": head.kind, "name": head.name, "has_bias": bias is not None,
                  **head.geometry}
    meta = {
        "schema_version": 1,
        "layer": layer_meta,
        "in_shape": list(head.in_shape),
        "out_shape": list(head.out_shape),
        "activation": head.activation,
        "output_range": None if out_range is None else list(out_range),
        "zbar": {"n_samples": int(samples), "seed": int(seed), "batch_size": int(batch_size),
                 "bn_mode": prepared.bn_mode, "latent_shape": list(prepared.latent_shape),
                 "latent_scheme": LATENT_SCHEME},
        "lipschitz": 1.0,  # replaced below, once the operator exists
        "source": {"format": source.format, "file": source.file, "sha256": source.sha256,
                   "arch": source.arch, "arch_options": source.arch_options},
        "versions": {"torch": torch.__version__, "flipad_jax": flipad_jax.__version__},
        "self_check": {"n_samples": int(check_in.shape[0]), "dtype": check_dtype,
                       "max_abs_error": 0.0, "tolerance": CHECK_TOLERANCE[check_dtype]},
    }
    clash = sorted(set(extra_meta or {}) & set(meta))
    if clash:
        raise ValueError(f"extra_meta: fields {clash} would replace head.json's own")
    meta.update(extra_meta or {})
    bundle = Bundle(meta, weight, bias, zbar)
    meta["lipschitz"] = build_operator(bundle, dtype=np.float32).lipschitz()

    tolerance = CHECK_TOLERANCE[check_dtype]
    with jax.enable_x64(check_dtype == "float64"):
        op = build_operator(bundle, dtype=np.dtype(check_dtype), precision="highest")
        error = _max_error(Head(op, head.activation, zbar.astype(check_dtype)), check_in, check_x)
        meta["self_check"]["max_abs_error"] = error
        if not error <= tolerance:
            raise ValueError(
                f"self-check failed: the JAX head reproduces the generator's images only up to "
                f"{error:.3g} (max abs, {check_dtype}), above {tolerance:g}; layer "
                f"{head.name!r} ({head.kind}) was not converted faithfully")
        with atomic_dir(out, overwrite=overwrite) as tmp:
            write_bundle_files(tmp, bundle)
            written = Head.load(tmp, dtype=check_dtype, precision="highest")  # validates the files
            if _max_error(written, check_in, check_x) != error:
                raise ValueError(f"the bundle written to {tmp} does not read back as written")
    return Conversion(out, meta, time.perf_counter() - t0)


def _output_range(activation: str, output_range, source) -> Optional[tuple]:
    resolved = resolve_output_range(get_activation(activation), output_range)
    if resolved is not None:
        return resolved
    default = getattr(source.model, "output_range", None)
    return None if default is None else tuple(float(v) for v in default)
