"""Write samples of a PyTorch generator (``flipad sample``): PNG folder or one ``.npy``.

Sample ``i`` comes from latent ``i`` of the seed (:func:`converters.runner.latents`), so disjoint
train/val/test sets come from different seeds (or different ``start`` offsets of one seed), and
any sample can be regenerated from (seed, index). ``samples.json`` records all of it.

PNG quantisation (part of the paper's pipeline): with the output range (low, high),
``p = round(255 (x − low) / (high − low))`` clipped to [0, 255], decoded by
``x̂ = low + p (high − low) / 255``; for tanh images that is p = round(127.5 (x + 1)),
x̂ = p/127.5 − 1. (The reference encodes round(127.5 x + 128), one level brighter; see
REFERENCE.md §2.3.) Values outside the range are clipped and counted. 1-channel images are
written as mode "L", 3-channel ones as "RGB"; ``.npy`` keeps full float32 precision and any shape.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

import flipad_jax
from flipad_jax.activations import get_activation
from flipad_jax._checks import check_int
from flipad_jax._files import atomic_dir, check_new_path
from converters.runner import LATENT_SCHEME, latents, open_generator

FORMATS = ("png", "npy")
SAMPLES_FILE = "samples.json"


def quantize(x: np.ndarray, output_range) -> tuple[np.ndarray, int]:
    """Images ``(B, C, H, W)`` in ``output_range`` → uint8 ``(B, H, W, C)`` and the clip count."""
    low, high = output_range
    p = np.rint((x.astype(np.float64) - low) * (255.0 / (high - low)))
    clipped = int(np.count_nonzero((p < 0) | (p > 255)))
    return np.clip(p, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1), clipped


def _resolve_range(prepared, output_range, model) -> Optional[tuple]:
    if output_range is not None:
        low, high = (float(v) for v in output_range)
        if not low < high:
            raise ValueError(f"output_range={output_range!r}: expected (low, high), low < high")
        return low, high
    if prepared.head is not None:
        natural = get_activation(prepared.head.activation).range
        if natural is not None:
            return natural
    default = getattr(model, "output_range", None)
    return None if default is None else tuple(float(v) for v in default)


def sample(model, n: int, out, *, arch: Optional[str] = None,
           arch_options: Optional[dict] = None, latent_shape=None, seed: int = 0, start: int = 0,
           batch_size: int = 500, fmt: str = "png", bn_mode: str = "eval", device=None,
           trust_pickle: bool = False, output_range=None, overwrite: bool = False,
           progress: bool = True) -> Path:
    """Write ``n`` samples (latents ``start .. start+n−1`` of ``seed``) to the folder ``out``.

    Args:
      model, arch, arch_options, latent_shape, trust_pickle, bn_mode, device: as in
        :func:`converters.convert.convert` (z̄ and the samples must share ``bn_mode``).
      n: number of samples. seed, start: which latents.
      batch_size: latents per forward pass (reference: 500; matters for bn_mode="train").
      fmt: "png" (``{index:06d}.png``, quantised) or "npy" (``samples.npy``, float32).
      output_range: (low, high) of the images for PNG quantisation; default from the head's
        activation (tanh → (−1, 1), sigmoid → (0, 1)) or the architecture.
      overwrite: replace an existing ``out``.

    Returns:
      ``out``. The folder appears only when all samples were written.
    """
    for name, value, minimum in (("n", n, 1), ("batch_size", batch_size, 1), ("seed", seed, 0),
                                 ("start", start, 0)):
        check_int(name, value, minimum=minimum)
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r}: expected one of {FORMATS}")
    out = check_new_path(out, overwrite=overwrite)
    # The head is traced only to learn the output range; sampling itself needs no invertible head.
    source, prepared = open_generator(
        model, arch=arch, arch_options=arch_options, trust_pickle=trust_pickle,
        latent_shape=latent_shape, bn_mode=bn_mode, device=device, trace_seed=seed,
        trace=lambda source: fmt == "png" and output_range is None and
        getattr(source.model, "output_range", None) is None)
    out_range = _resolve_range(prepared, output_range, source.model)
    if fmt == "png" and out_range is None:
        raise ValueError("fmt='png' needs the images' output range: pass --output-range low,high "
                         "(or write fmt='npy')")
    clipped, shape = 0, None
    with atomic_dir(out, overwrite=overwrite) as tmp:
        arrays = []
        bar = tqdm(total=n, desc="samples", unit="sample", disable=not progress, leave=False)
        for offset in range(0, n, batch_size):
            count = min(batch_size, n - offset)
            z = latents(seed, start + offset, count, prepared.latent_shape)
            x = prepared.generate(z.to(prepared.device, prepared.dtype)).float().cpu().numpy()
            shape = x.shape[1:]
            if fmt == "npy":
                arrays.append(x)
            else:
                if x.ndim != 4 or x.shape[1] not in (1, 3):
                    raise ValueError(f"fmt='png': samples of shape {shape} are not 1- or 3-channel "
                                     "images; use fmt='npy'")
                pixels, c = quantize(x, out_range)
                clipped += c
                for k, img in enumerate(pixels):
                    mode = "L" if img.shape[-1] == 1 else "RGB"
                    Image.fromarray(img[..., 0] if mode == "L" else img, mode).save(
                        tmp / f"{start + offset + k:06d}.png")
            bar.update(count)
        bar.close()
        if fmt == "npy":
            np.save(tmp / "samples.npy", np.concatenate(arrays))
        record = {
            "n": n, "seed": seed, "start": start, "indices": [start, start + n],
            "latent_shape": list(prepared.latent_shape), "latent_scheme": LATENT_SCHEME,
            "format": fmt, "files": "samples.npy" if fmt == "npy" else "{index:06d}.png",
            "sample_shape": list(shape), "output_range": None if out_range is None
            else list(out_range),
            "quantisation": None if fmt == "npy" else
            "p = clip(round(255 (x - low) / (high - low)), 0, 255); x = low + p (high - low) / 255",
            "clipped_values": clipped, "bn_mode": prepared.bn_mode, "batch_size": batch_size,
            "source": {"format": source.format, "file": source.file, "sha256": source.sha256,
                       "arch": source.arch, "arch_options": source.arch_options},
            "versions": {"torch": torch.__version__, "flipad_jax": flipad_jax.__version__},
        }
        (tmp / SAMPLES_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return out
