"""Train the demo's generators: the paper's four GAN families on Fashion-MNIST (32×32 grey).

The generators are :mod:`converters.generators`' DCGAN, WGAN-GP (DCGAN generator), LSGAN and
EBGAN at ``nc=1, image_size=32, ngf=32, nz=100`` (the paper's architectures scaled to the data),
plus a second DCGAN from another seed (the paper's Table 2 setting). Discriminators and losses
follow the paper's App. G scaled the same way:

* DCGAN: conv 1→32→64→128 (k4 s2 p1) → 1 (k4 s1 p0), leaky 0.2, BatchNorm inside, sigmoid; BCE
  with soft labels 0.9 (real) / 0.1 (fake).
* WGAN-GP: the same critic with LayerNorm and no sigmoid; 5 critic steps per generator step,
  gradient penalty 10, Adam β = (0, 0.9).
* LSGAN: conv k3 s2 p1 blocks 1→16→32→64→128, leaky 0.2, dropout 0.25, BatchNorm but in the
  first; Linear 512 → 1; least squares (real 1, fake 0).
* EBGAN: auto-encoder discriminator (conv 1→32→64→128 k4 s2 p1, BN, leaky 0.2; ConvT back,
  ReLU), energy = reconstruction MSE, margin max(1, batch/64), pull-away term weight 0.1.

Adam lr 2e-4, β = (0.5, 0.999) unless stated, batch 128. Everything runs on the CPU under one
seed (``torch.manual_seed``) with 2 threads, so a run is repeatable on the same machine.

Script (what produced the shipped weights; ``flipad demo --retrain`` runs the same code)::

    python -m converters.demo_gans --out converters/demo_weights

It writes ``<name>.safetensors`` (the generator's state_dict, eval-mode running statistics
included) and ``training.json`` (command, seeds, epochs, per-epoch losses, seconds, versions).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from converters.generators import build_generator

IMAGE_SIZE = 32
GEN_OPTIONS = dict(nz=100, ngf=32, nc=1, image_size=IMAGE_SIZE)


class DemoModel(NamedTuple):
    """One demo generator: its file stem, architecture, training seed and epochs."""

    name: str
    arch: str
    seed: int
    epochs: int
    init: str = "dcgan"  # build_generator's init
    betas: tuple = None  # Adam's (β1, β2); None: the family's (_Trainer)


# Each model has a seed of its own, as independent training runs have: DCGAN, WGAN-GP and EBGAN
# share the generator architecture, and from one seed they share the initial weights, which a
# few epochs barely move (last layers at cosine 0.77–0.93 apart, measured), so their samples
# would be nearly indistinguishable through each other's last layer.
DEMO_MODELS = (
    DemoModel("dcgan", "dcgan", 0, 3),
    DemoModel("wgangp", "wgangp", 2, 6),  # 5 critic steps per generator step
    DemoModel("lsgan", "lsgan", 0, 2),    # its own architecture; 3×3 convs cost 3.5× a step
    DemoModel("ebgan", "ebgan", 3, 3),
    DemoModel("dcgan_seed1", "dcgan", 1, 3),
)
# The authors' train_wgangp.py keeps PyTorch's default initialisation and uses Adam (0.5, 0.999);
# the shipped WGAN-GP has the DCGAN init and the WGAN-GP paper's (0, 0.9). --authors-wgangp
# trains this one in its place, to measure what the difference does to attribution.
AUTHORS_WGANGP = DemoModel("wgangp", "wgangp", 2, 6, init="torch", betas=(0.5, 0.999))
WEIGHTS_DIR = Path(__file__).parent / "demo_weights"
RECORD_FILE = "training.json"


def weights_fingerprint(folder) -> str:
    """sha256 over the names and bytes of the ``*.safetensors`` in ``folder``: a run's work
    stages (bundles, samples, detectors) belong to these exact weights, not to a folder name."""
    from flipad_jax._files import folder_digest

    if not any(Path(folder).glob("*.safetensors")):
        raise ValueError(f"{folder}: no generator weights (*.safetensors) here")
    return folder_digest(folder, "*.safetensors")


def arch_of(name: str) -> str:
    """The architecture of the demo generator called ``name``."""
    for model in DEMO_MODELS:
        if model.name == name:
            return model.arch
    raise ValueError(f"name={name!r}: expected a demo generator, one of "
                     f"{[m.name for m in DEMO_MODELS]}")


def _dc_body(norm, ndf: int = 32) -> list[nn.Module]:
    """conv 1→ndf→2ndf→4ndf (k4 s2 p1) with leaky 0.2 and ``norm(channels, size)`` but first."""
    layers = [nn.Conv2d(1, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
    ch, size = ndf, IMAGE_SIZE // 2
    for _ in range(2):
        size //= 2
        layers += [nn.Conv2d(ch, ch * 2, 4, 2, 1), norm(ch * 2, size), nn.LeakyReLU(0.2, True)]
        ch *= 2
    return layers + [nn.Conv2d(ch, 1, size, 1, 0), nn.Flatten()]


def dcgan_discriminator() -> nn.Module:
    return nn.Sequential(*_dc_body(lambda c, s: nn.BatchNorm2d(c)), nn.Sigmoid())


def wgan_critic() -> nn.Module:
    return nn.Sequential(*_dc_body(lambda c, s: nn.LayerNorm([c, s, s])))


def lsgan_discriminator() -> nn.Module:
    layers, ch = [], 1
    for i, out in enumerate((16, 32, 64, 128)):
        layers += [nn.Conv2d(ch, out, 3, 2, 1), nn.LeakyReLU(0.2, True), nn.Dropout2d(0.25)]
        if i:
            layers.append(nn.BatchNorm2d(out, 0.8))
        ch = out
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(128 * 2 * 2, 1))


class EBGANDiscriminator(nn.Module):
    """Auto-encoder: ``forward(x)`` → (reconstruction, flattened code)."""

    def __init__(self, ndf: int = 32):
        super().__init__()
        enc, dec, ch = [], [], 1
        for i, out in enumerate((ndf, 2 * ndf, 4 * ndf)):
            enc += [nn.Conv2d(ch, out, 4, 2, 1)] + ([nn.BatchNorm2d(out)] if i else [])
            enc.append(nn.LeakyReLU(0.2, True))
            dec = [nn.ConvTranspose2d(out, ch, 4, 2, 1)] + ([nn.ReLU(True)] if dec else []) + dec
            ch = out
        self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec, nn.Tanh())

    def forward(self, x):
        code = self.encoder(x)
        return self.decoder(code), code.flatten(1)


def _pull_away(code):
    """The EBGAN pull-away term: mean squared cosine similarity between distinct codes."""
    n = code.shape[0]
    unit = code / code.norm(dim=1, keepdim=True).clamp_min(1e-8)
    sim = unit @ unit.t()
    return (sim.square().sum() - n) / (n * (n - 1))


def _adam(params, betas=(0.5, 0.999)):
    return torch.optim.Adam(params, lr=2e-4, betas=betas)


class _Trainer:
    """One GAN family: ``step(real)`` updates D (and G when due) and returns (d_loss, g_loss)."""

    def __init__(self, arch: str, gen: nn.Module, batch: int, disc: nn.Module = None,
                 betas: tuple = None):
        self.arch, self.gen, self.batch, self.count = arch, gen, batch, 0
        # ``disc``: another discriminator for the same loss (the paper-size DCGAN's, 64×64×3).
        self.disc = disc if disc is not None else {
            "dcgan": dcgan_discriminator, "wgangp": wgan_critic,
            "lsgan": lsgan_discriminator, "ebgan": EBGANDiscriminator}[arch]()
        betas = betas or ((0.0, 0.9) if arch == "wgangp" else (0.5, 0.999))
        self.betas = betas
        self.opt_g, self.opt_d = _adam(gen.parameters(), betas), _adam(self.disc.parameters(),
                                                                       betas)
        self.margin = max(1.0, batch / 64.0)

    def _noise(self, n):
        return torch.randn((n,) + tuple(self.gen.latent_shape))

    def _d_loss(self, real, fake):
        d = self.disc
        if self.arch == "dcgan":
            return (F.binary_cross_entropy(d(real), torch.full((len(real), 1), 0.9))
                    + F.binary_cross_entropy(d(fake), torch.full((len(fake), 1), 0.1)))
        if self.arch == "lsgan":
            return 0.5 * (F.mse_loss(d(real), torch.ones(len(real), 1))
                          + F.mse_loss(d(fake), torch.zeros(len(fake), 1)))
        if self.arch == "ebgan":
            energy_real = F.mse_loss(d(real)[0], real)
            return energy_real + F.relu(self.margin - F.mse_loss(d(fake)[0], fake))
        eps = torch.rand(len(real), 1, 1, 1)
        mix = (eps * real + (1 - eps) * fake).requires_grad_(True)
        grad, = torch.autograd.grad(d(mix).sum(), mix, create_graph=True)
        penalty = (grad.flatten(1).norm(dim=1) - 1).square().mean()
        return d(fake).mean() - d(real).mean() + 10.0 * penalty

    def _g_loss(self, fake):
        d = self.disc
        if self.arch == "dcgan":
            return F.binary_cross_entropy(d(fake), torch.full((len(fake), 1), 0.9))
        if self.arch == "lsgan":
            return 0.5 * F.mse_loss(d(fake), torch.ones(len(fake), 1))
        if self.arch == "ebgan":
            # The image is the target, not a path for G's gradient: through it G learns images
            # that any auto-encoder copies (measured: it collapsed to near-black noise).
            recon, code = d(fake)
            return F.mse_loss(recon, fake.detach()) + 0.1 * _pull_away(code)
        return -d(fake).mean()

    def step(self, real):
        fake = self.gen(self._noise(len(real)))
        self.opt_d.zero_grad(set_to_none=True)
        d_loss = self._d_loss(real, fake.detach())
        d_loss.backward()
        self.opt_d.step()
        self.count += 1
        if self.arch == "wgangp" and self.count % 5:
            return d_loss.item(), None
        self.opt_g.zero_grad(set_to_none=True)
        g_loss = self._g_loss(fake)
        g_loss.backward()
        self.opt_g.step()
        return d_loss.item(), g_loss.item()


def train_generator(model: DemoModel, images: np.ndarray, *, epochs=None, batch: int = 128,
                    progress: bool = True) -> tuple[nn.Module, dict]:
    """Train one demo generator on uint8 images ``(N, 1, 32, 32)``; returns (G, its record)."""
    epochs = model.epochs if epochs is None else epochs
    if len(images) < batch:
        raise ValueError(f"images: {len(images)} of them, expected at least batch={batch}")
    torch.manual_seed(model.seed)
    gen = build_generator(model.arch, options=GEN_OPTIONS, seed=model.seed, init=model.init)
    trainer = _Trainer(model.arch, gen, batch, betas=model.betas)
    data = torch.from_numpy(images).float().div_(127.5).sub_(1.0)
    losses, start = [], time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(len(data))
        d_sum, g_sum, g_n, n = 0.0, 0.0, 0, 0
        bar = tqdm(range(len(data) // batch), desc=f"{model.name} epoch {epoch + 1}/{epochs}",
                   disable=not progress, leave=False)
        for i in bar:
            d_loss, g_loss = trainer.step(data[order[i * batch:(i + 1) * batch]])
            d_sum, n = d_sum + d_loss, n + 1
            if g_loss is not None:
                g_sum, g_n = g_sum + g_loss, g_n + 1
        losses.append({"d": d_sum / n, "g": g_sum / max(g_n, 1)})
        if not all(np.isfinite(list(losses[-1].values()))):
            raise FloatingPointError(f"{model.name}: GAN training diverged at epoch {epoch + 1}")
    gen.eval()
    record = {"arch": model.arch, "seed": model.seed, "epochs": epochs, "batch_size": batch,
              "init": model.init, "adam_betas": list(trainer.betas), "options": GEN_OPTIONS,
              "losses": losses,
              "seconds": round(time.perf_counter() - start, 1)}
    return gen, record


def train_demo_generators(out, *, data=None, models=DEMO_MODELS, epochs=None,
                          batch: int = 128, progress: bool = True,
                          command: str = "train_demo_generators()") -> Path:
    """Train ``models`` and write them, with ``training.json``, to the folder ``out``.

    Other generators already in ``out`` are kept with their records; each record holds the
    ``command`` that trained it. The folder is replaced atomically: complete or as before.
    """
    from safetensors.torch import save_file

    from flipad_jax._files import atomic_dir
    from flipad_jax.datasets import fashion_mnist, fashion_mnist_folder

    torch.set_num_threads(2)
    folder = fashion_mnist_folder(data)
    images = fashion_mnist("train", IMAGE_SIZE, folder)
    out = Path(out)
    with atomic_dir(out, overwrite=True) as tmp:
        # Models not retrained now keep their files and records (``--only``).
        old = json.loads((out / RECORD_FILE).read_text()) if (out / RECORD_FILE).is_file() \
            else {"models": {}}
        records = {k: v for k, v in old["models"].items() if (out / f"{k}.safetensors").is_file()}
        for name in records:
            shutil.copy2(out / f"{name}.safetensors", tmp / f"{name}.safetensors")
        for model in models:
            gen, records[model.name] = train_generator(model, images, epochs=epochs,
                                                       batch=batch, progress=progress)
            records[model.name]["command"] = command
            save_file({k: v.contiguous() for k, v in gen.state_dict().items()},
                      tmp / f"{model.name}.safetensors")
        record = {"data": {"source": "Fashion-MNIST train split", "folder": str(folder),
                           "n": len(images), "size": IMAGE_SIZE, "preparation": "zero-pad 2"},
                  "models": records, "torch": torch.__version__,
                  "threads": torch.get_num_threads()}
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Train the demo's GANs on Fashion-MNIST.")
    p.add_argument("--out", default=str(WEIGHTS_DIR), help="folder to (re)write")
    p.add_argument("--data", help="Fashion-MNIST IDX folder (default: Debian's)")
    p.add_argument("--epochs", type=int, help="override every model's epochs")
    p.add_argument("--only", nargs="+", choices=[m.name for m in DEMO_MODELS],
                   help="retrain only these models; the others in --out are kept")
    p.add_argument("--authors-wgangp", action="store_true",
                   help="train WGAN-GP as the authors' train_wgangp.py does (PyTorch's default "
                        "init, Adam betas 0.5, 0.999) instead of the shipped recipe")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    models = [AUTHORS_WGANGP if args.authors_wgangp and m.name == "wgangp" else m
              for m in DEMO_MODELS if not args.only or m.name in args.only]
    command = "python -m converters.demo_gans " + " ".join(argv if argv is not None
                                                          else sys.argv[1:])
    train_demo_generators(args.out, data=args.data, models=models, epochs=args.epochs,
                          command=command,
                          progress=not args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
