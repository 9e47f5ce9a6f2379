"""Reference PyTorch generators of the paper (App. G; METHOD.md §3), configurable in size.

Module names follow the authors' checkpoints, so their state_dicts load with ``strict=True``:
DCGAN / WGAN-GP ``main.<i>``, EBGAN ``conv_blocks.<i>``, LSGAN ``l1.0`` + ``conv_blocks.<i>``,
medical DCGAN ``main.<i>`` (plus the medigan library's ``first_layers`` alias and its unused
``embed_nn``), KL-WGAN ``net.<i>`` with a spectral-norm hook on ``net.2``. The Stable Diffusion
entry is the VAE decoder's last block with diffusers' names (``conv_norm_out``, ``conv_act``,
``conv_out``) behind a small stem that turns an SD-shaped latent into its 128-channel input.

Every generator has ``latent_shape`` (per sample, what it expects from N(0, I)) and
``output_range`` (of its images; None when unbounded). ``ARCHS`` maps the ``--arch`` names to a
builder with the paper's sizes as defaults and a ``small`` preset for fast tests.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch
from torch import nn


def _num_upsamplings(image_size: int, start: int) -> int:
    n = math.log2(image_size / start) if image_size >= start else -1
    if n < 1 or n != int(n):
        raise ValueError(f"image_size={image_size}: expected {start}·2^k with k >= 1")
    return int(n)


def dcgan_layers(nz: int, ngf: int, nc: int, image_size: int) -> list[nn.Module]:
    """DCGAN's generator: ConvT(nz→ngf·2^(n−1), k4 s1 p0) BN ReLU, then k4 s2 p1 ConvTs halving
    the channels down to ngf (each BN ReLU), last ConvT ngf→nc (k4 s2 p1) and tanh; no biases.
    image_size = 4·2^n (64: the paper's 512→256→128→64→3)."""
    n = _num_upsamplings(image_size, 4)
    ch = ngf * 2 ** (n - 1)
    layers = [nn.ConvTranspose2d(nz, ch, 4, 1, 0, bias=False), nn.BatchNorm2d(ch), nn.ReLU(True)]
    for _ in range(n - 1):
        layers += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ch // 2),
                   nn.ReLU(True)]
        ch //= 2
    return layers + [nn.ConvTranspose2d(ch, nc, 4, 2, 1, bias=False), nn.Tanh()]


class DCGANGenerator(nn.Module):
    """DCGAN (also the WGAN-GP) generator; latent ``(nz, 1, 1)``, images ``(nc, S, S)`` in [−1, 1]."""

    output_range = (-1.0, 1.0)

    def __init__(self, nz: int = 100, ngf: int = 64, nc: int = 3, image_size: int = 64):
        super().__init__()
        self.latent_shape = (nz, 1, 1)
        self.main = nn.Sequential(*dcgan_layers(nz, ngf, nc, image_size))

    def forward(self, z):
        return self.main(z)


class EBGANGenerator(nn.Module):
    """EBGAN's generator: the DCGAN layers under the name ``conv_blocks`` (the reference's
    ``use_conv=False``); latent ``(nz, 1, 1)``."""

    output_range = (-1.0, 1.0)

    def __init__(self, nz: int = 100, ngf: int = 64, nc: int = 3, image_size: int = 64):
        super().__init__()
        self.latent_shape = (nz, 1, 1)
        self.conv_blocks = nn.Sequential(*dcgan_layers(nz, ngf, nc, image_size))

    def forward(self, z):
        return self.conv_blocks(z)


class LSGANGenerator(nn.Module):
    """LSGAN's generator: Linear nz → 2ngf·(S/8)², then three [nearest ×2, conv k3 p1, BN, ReLU]
    blocks 2ngf→2ngf→2ngf→ngf, last conv ngf→nc (k3 s1 p1, with bias) and tanh. BatchNorm eps is
    0.8: the reference passes 0.8 positionally (meant as momentum, taken as eps)."""

    output_range = (-1.0, 1.0)

    def __init__(self, nz: int = 100, ngf: int = 64, nc: int = 3, image_size: int = 64):
        super().__init__()
        _num_upsamplings(image_size, 8)
        self.latent_shape = (nz,)
        self.init_size = image_size // 8
        self.width = 2 * ngf
        self.l1 = nn.Sequential(nn.Linear(nz, self.width * self.init_size ** 2))
        blocks = []
        for c_in, c_out in ((self.width, self.width), (self.width, self.width), (self.width, ngf)):
            blocks += [nn.Upsample(scale_factor=2), nn.Conv2d(c_in, c_out, 3, 1, 1),
                       nn.BatchNorm2d(c_out, 0.8), nn.ReLU(inplace=True)]
        self.conv_blocks = nn.Sequential(*blocks, nn.Conv2d(ngf, nc, 3, 1, 1), nn.Tanh())

    def forward(self, z):
        h = self.l1(z).view(z.shape[0], self.width, self.init_size, self.init_size)
        return self.conv_blocks(h)


class MedicalDCGANGenerator(nn.Module):
    """The medigan DCGAN (model 5) unconditional generator at 128×128 grayscale: DCGAN layers with
    ngf·16 after the first ConvT. ``first_layers`` aliases ``main``'s first six modules and
    ``embed_nn`` (Linear 1→nz, BN, LeakyReLU) is unused, both only so that medigan's state_dicts
    load unchanged."""

    output_range = (-1.0, 1.0)

    def __init__(self, nz: int = 100, ngf: int = 64, nc: int = 1, image_size: int = 128):
        super().__init__()
        self.latent_shape = (nz, 1, 1)
        layers = dcgan_layers(nz, ngf, nc, image_size)
        self.first_layers = nn.Sequential(*layers[:6])
        self.main = nn.Sequential(*layers)
        self.embed_nn = nn.Sequential(nn.Linear(1, nz), nn.BatchNorm1d(nz),
                                      nn.LeakyReLU(0.2, inplace=True))

    def forward(self, z):
        return self.main(z)


class KLWGANGenerator(nn.Module):
    """KL-WGAN tabular generator: Linear(noise→hidden), LeakyReLU(0.01), spectral-norm
    Linear(hidden→hidden), LeakyReLU, Linear(hidden→data_dim); no output activation."""

    output_range = None

    def __init__(self, data_dim: int = 11, noise_dim: int = 10, hidden: int = 300):
        super().__init__()
        self.latent_shape = (noise_dim,)
        self.net = nn.Sequential(
            nn.Linear(noise_dim, hidden), nn.LeakyReLU(),
            nn.utils.spectral_norm(nn.Linear(hidden, hidden)), nn.LeakyReLU(),
            nn.Linear(hidden, data_dim))

    def forward(self, z):
        return self.net(z)


class SDVAELastBlock(nn.Module):
    """Stable Diffusion VAE decoder's last block behind a stem.

    Stem (ours, to have a generator of N(0, I) latents): conv_in (latent_channels→channels, k3
    p1), SiLU, nearest upsampling ×``upscale``. Last block (diffusers' names): GroupNorm(groups,
    channels, eps 1e-6), SiLU, ``conv_out`` channels→3 (k3 s1 p1, bias), no output activation;
    the SD pipeline clamps images to [−1, 1], hence ``output_range``. Paper size: latent
    4×64×64 → 128×512×512 activations → 3×512×512 images.
    """

    output_range = (-1.0, 1.0)

    def __init__(self, latent_channels: int = 4, latent_size: int = 64, channels: int = 128,
                 upscale: int = 8, groups: int = 32, out_channels: int = 3):
        super().__init__()
        self.latent_shape = (latent_channels, latent_size, latent_size)
        self.conv_in = nn.Conv2d(latent_channels, channels, 3, 1, 1)
        self.upsample = nn.Upsample(scale_factor=upscale)
        self.conv_norm_out = nn.GroupNorm(groups, channels, eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels, out_channels, 3, 1, 1)

    def forward(self, z):
        h = self.upsample(self.conv_act(self.conv_in(z)))
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))


class Arch(NamedTuple):
    """A registered architecture: its class, the paper's configuration (the builder's defaults
    plus these overrides) and a reduced configuration for fast tests."""

    cls: Callable[..., nn.Module]
    paper: dict
    small: dict


ARCHS = {
    "dcgan": Arch(DCGANGenerator, {}, dict(nz=16, ngf=4, nc=3, image_size=16)),
    "wgangp": Arch(DCGANGenerator, {}, dict(nz=16, ngf=4, nc=3, image_size=16)),
    "ebgan": Arch(EBGANGenerator, {}, dict(nz=16, ngf=4, nc=3, image_size=16)),
    "lsgan": Arch(LSGANGenerator, {}, dict(nz=16, ngf=4, nc=3, image_size=16)),
    "medigan_dcgan": Arch(MedicalDCGANGenerator, {}, dict(nz=16, ngf=2, nc=1, image_size=32)),
    "klwgan": Arch(KLWGANGenerator, {}, dict(data_dim=11, noise_dim=10, hidden=24)),
    "sd_vae_last": Arch(SDVAELastBlock, {},
                        dict(latent_channels=4, latent_size=4, channels=16, upscale=2, groups=4)),
}


def _dcgan_init(module: nn.Module) -> None:
    """The reference's ``weights_init``: conv weights N(0, 0.02), BN γ N(1, 0.02), β 0."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                m.weight.normal_(0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.normal_(1.0, 0.02)
                m.bias.zero_()


def build_generator(arch: str, *, size: str = "paper", options: Optional[dict] = None,
                    seed: Optional[int] = None, init: str = "dcgan") -> nn.Module:
    """A fresh generator of a registered architecture.

    Args:
      arch: a key of ``ARCHS`` (dcgan, wgangp, ebgan, lsgan, medigan_dcgan, klwgan, sd_vae_last).
      size: "paper" (the paper's configuration) or "small" (for fast tests).
      options: constructor keyword arguments overriding the preset, e.g.
        ``{"nc": 1, "image_size": 32}`` for the Fashion-MNIST demo.
      seed: if given, the weights are drawn under this seed (the global RNG state is restored
        afterwards): PyTorch's default init, then, with ``init="dcgan"``, the reference's DCGAN
        init for the GAN families (all but klwgan and sd_vae_last).
      init: "dcgan" (default) or "torch": PyTorch's default init only, as the authors'
        ``train_wgangp.py`` leaves its generator.
    """
    if init not in ("dcgan", "torch"):
        raise ValueError(f"init={init!r}: expected 'dcgan' or 'torch'")
    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r}: expected one of {sorted(ARCHS)}")
    if size not in ("paper", "small"):
        raise ValueError(f"size={size!r}: expected 'paper' or 'small'")
    spec = ARCHS[arch]
    kwargs = {**(spec.paper if size == "paper" else spec.small), **(options or {})}
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        try:
            model = spec.cls(**kwargs)
        except TypeError as e:
            raise ValueError(f"options={options!r} for arch={arch!r}: {e}") from None
        if seed is not None and init == "dcgan" and arch not in ("klwgan", "sd_vae_last"):
            _dcgan_init(model)
    return model
