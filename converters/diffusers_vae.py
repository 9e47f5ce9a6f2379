"""A diffusers ``AutoencoderKL`` (the Stable Diffusion VAE family) → head bundle.

The paper's Stable Diffusion experiments invert the VAE decoder's last layer (REFERENCE.md §2.2):
``decoder.conv_out`` (SD: Conv2d 128→3, k3 s1 p1, with bias) applied after the decoder's
GroupNorm + SiLU. Nothing follows it, so the head's activation is the identity and the target of
the lasso is the image itself, o = x in [−1, 1]. The pipeline clamps the decoder's output to
[−1, 1] when it makes images; as in the reference, clamped pixels are not treated specially: a
pixel stored at ±1 is fitted at ±1 even where the un-clamped output lay beyond. The bundle
records ``output_range`` [−1, 1] and this convention under ``diffusers.clamp``.

z̄ is the mean input of ``conv_out`` over decoded latents. The decoder's latents are those a
diffusion model produces: unit-variance latents ``ℓ`` that the pipeline decodes as
``decode(ℓ / scaling_factor + shift_factor)``; we draw ``ℓ ~ N(0, I)`` per sample with
:func:`converters.runner.latents` (reproducible by seed and index) and decode them the same way.
The reference averaged over SD 2.1 generations instead (its script for that is missing,
REFERENCE.md §2.4); N(0, I) matches their first two moments per element, not their structure.

Everything else (tracing the head, z̄ in float64, the float64 self-check against torch's forward,
the atomic bundle write) is :func:`converters.convert.convert`'s. Only safetensors weights are
read (``use_safetensors=True``, local files only); a ``.bin`` checkpoint is refused, never
unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flipad_jax import features
from flipad_jax._checks import check_int
from flipad_jax._files import sha256_file
from converters.convert import Conversion, convert
from converters.loading import Source

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
HEAD_LAYER = "vae.decoder.conv_out"
OUTPUT_RANGE = (-1.0, 1.0)
CLAMP_NOTE = ("images are clamp(decoder output, -1, 1); the target is the image itself (o = x), "
              "so clamped pixels are fitted at +-1, as in the reference")


class VAEDecoder(nn.Module):
    """``ℓ ↦ vae.decode(ℓ / scaling_factor + shift_factor)``, un-clamped: the generator whose
    last layer is inverted. ``(B, C_lat, h, w)`` → ``(B, 3, H, W)``."""

    def __init__(self, vae: nn.Module, latent_shape: tuple):
        super().__init__()
        self.vae = vae
        self.latent_shape = tuple(latent_shape)
        self.output_range = OUTPUT_RANGE
        self.scaling_factor = float(vae.config.scaling_factor)
        shift = getattr(vae.config, "shift_factor", None)
        self.shift_factor = 0.0 if shift is None else float(shift)

    def forward(self, latents):
        return self.vae.decode(latents / self.scaling_factor + self.shift_factor,
                               return_dict=False)[0]


def _vae_folder(path) -> Path:
    """The folder holding the VAE's config.json: ``path`` itself or a pipeline's ``vae/``."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"diffusers={str(path)!r}: no such folder (expected a local diffusers "
                         f"AutoencoderKL folder with {CONFIG_FILE} and {WEIGHTS_FILE})")
    for folder in (path, path / "vae"):
        if (folder / CONFIG_FILE).is_file():
            return folder
    raise ValueError(f"diffusers={str(path)!r}: no {CONFIG_FILE} in it or in its vae/ "
                     "subfolder (expected a folder written by AutoencoderKL.save_pretrained)")


def _read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{folder / CONFIG_FILE}: not valid JSON ({e})") from None
    name = config.get("_class_name") if isinstance(config, dict) else None
    if name != "AutoencoderKL":
        raise ValueError(f"{folder / CONFIG_FILE}: _class_name is {name!r}: expected "
                         "'AutoencoderKL' (the Stable Diffusion VAE family)")
    return config


def _weights(folder: Path) -> Path:
    weights = folder / WEIGHTS_FILE
    if weights.is_file():
        return weights
    pickled = sorted(p.name for p in folder.glob("*.bin"))
    if pickled:
        raise ValueError(f"{folder}: only pickled weights ({', '.join(pickled)}): refused, they "
                         f"would execute code when read; expected {WEIGHTS_FILE} (re-save with "
                         "save_pretrained(safe_serialization=True))")
    raise ValueError(f"{folder}: no {WEIGHTS_FILE} (single-file safetensors weights expected)")


def default_latent_shape(config: dict) -> tuple:
    """``(latent_channels, s, s)``: the decoder's latent for an image of ``sample_size``, which
    the encoder halves once per down block but the last (SD: 512 → 64)."""
    size = config.get("sample_size", 512)
    size = size[0] if isinstance(size, (list, tuple)) else size
    factor = 2 ** (len(config.get("block_out_channels", (64,))) - 1)
    return int(config.get("latent_channels", 4)), int(size) // factor, int(size) // factor


def load_vae_decoder(path, *, latent_shape=None) -> Source:
    """Load the ``AutoencoderKL`` at ``path`` (safetensors only, local files only) as a
    :class:`~converters.loading.Source` whose model is a :class:`VAEDecoder`.

    Args:
      path: the VAE folder (``config.json`` + ``diffusion_pytorch_model.safetensors``), or a
        pipeline folder with it in ``vae/``.
      latent_shape: per-sample latent shape; default :func:`default_latent_shape`.
    """
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise ValueError("diffusers is not installed: pip install 'flipad-jax[diffusers]'") \
            from None
    folder = _vae_folder(path)
    config = _read_config(folder)
    weights = _weights(folder)
    shape = default_latent_shape(config) if latent_shape is None else \
        tuple(int(d) for d in latent_shape)
    try:
        vae = AutoencoderKL.from_pretrained(folder, use_safetensors=True, local_files_only=True,
                                            low_cpu_mem_usage=False,
                                            torch_dtype=torch.float32)
    except (OSError, ValueError, EnvironmentError) as e:
        raise ValueError(f"{folder}: diffusers could not load the AutoencoderKL "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") \
            from None
    return Source(VAEDecoder(vae, shape), "diffusers", folder.name, sha256_file(weights), None,
                  {}, shape)


def convert_diffusers(path, out, *, downsample: str = "crop", downsample_size: int = 128,
                      latent_shape=None, samples: int = 5000, seed: int = 0,
                      batch_size: int = 8, device=None, check_samples: int = 4,
                      check_dtype: str = "float64", overwrite: bool = False,
                      progress: bool = True) -> Conversion:
    """Convert the ``AutoencoderKL`` at ``path`` into a head bundle at ``out``
    (``flipad convert --diffusers``).

    Args:
      path: the VAE folder (or a pipeline folder with ``vae/``); see :func:`load_vae_decoder`.
      out: the bundle folder to create (must not exist unless ``overwrite``).
      downsample, downsample_size: how FLIPAD features are reduced, recorded in the bundle
        (``features``) as the default of ``flipad fit``: "crop" (the central square, the
        reference's SD setting: 128 of the 512×512 map) or "maxpool" (max pool down to the
        size; :func:`flipad_jax.features.downsample`).
      latent_shape: per-sample latent shape (default from the config: SD 4×64×64).
      samples: latents for z̄ (default 5000, the reference's ``num_avg_act``); seed: their seed.
      batch_size: latents per decoder call; device: torch device (default CUDA, MPS, CPU).
      check_samples, check_dtype: latents and dtype of the self-check against the decoder
        (float64: tolerance 1e-5).
      overwrite, progress: as in :func:`converters.convert.convert`.

    Returns:
      :class:`~converters.convert.Conversion`. Raises ``ValueError`` (and writes nothing) on any
      refusal.
    """
    if downsample not in features.DOWNSAMPLE_MODES:  # before the (slow) load
        raise ValueError(f"downsample={downsample!r}: expected one of "
                         f"{list(features.DOWNSAMPLE_MODES)}")
    check_int("downsample_size", downsample_size)
    source = load_vae_decoder(path, latent_shape=latent_shape)
    decoder = source.model
    # conv_out's input has the image's size: the latent's, doubled by each up block but the last
    factor = 2 ** (len(decoder.vae.config.block_out_channels) - 1)
    activations = np.zeros((1, 1) + tuple(d * factor for d in source.latent_shape[1:]), np.float32)
    features.downsample(activations, downsample_size, downsample)  # refuses a size maxpool can't
    notes = {"features": {"downsample": downsample, "size": int(downsample_size)},
             "diffusers": {"scaling_factor": decoder.scaling_factor,
                           "shift_factor": decoder.shift_factor, "clamp": CLAMP_NOTE,
                           "latents": "N(0, I), decoded as decode(latent / scaling_factor + "
                                      "shift_factor)"}}
    return convert(source, out, latent_shape=source.latent_shape, samples=samples,
                   layer=HEAD_LAYER, seed=seed, batch_size=batch_size, device=device,
                   output_range=OUTPUT_RANGE, check_samples=check_samples,
                   check_dtype=check_dtype, overwrite=overwrite, progress=progress,
                   extra_meta=notes)
