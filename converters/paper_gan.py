"""Train a paper-size DCGAN (nz 100, ngf 64, 64×64×3, tanh) on Fashion-MNIST for the benchmarks.

The generator is :mod:`converters.generators`' DCGAN at the paper's configuration (the CelebA
model's 100→512→256→128→64→3 ConvT stack; its last layer, ConvTranspose2d 64→3 k4 s2 p1, is the
head FLIPAD inverts). Fashion-MNIST's 28×28 grey images are resized bicubically to 64×64
(:func:`flipad_jax.datasets.fashion_mnist`) and the grey channel is repeated three times. The
discriminator is the paper's (conv 3→64→128→256→512 k4 s2 p1, leaky 0.2, BatchNorm but in the
first; conv 512→1 k4 s1 p0; sigmoid), the loss the demo DCGAN's (BCE, soft labels 0.9 / 0.1),
Adam lr 2e-4, β = (0.5, 0.999).

A CPU affords only a few thousand steps of this model, so training runs a fixed number of
steps on a seeded random subset of the training split; the record states both, and the images
seen. Samples are blurry garments, which is enough for what the weights are for: a trained last
layer of the paper's size, whose operator norm and sparsity pattern are not a random init's.

Script (what produced the shipped weights)::

    python -m converters.paper_gan --out converters/demo_weights/paper_size

writes ``dcgan.safetensors`` (the generator's state_dict in float16, eval-mode running
statistics included; loads into the float32 model with ``flipad convert --arch dcgan``) and
``training.json`` (command, seed, steps, images seen, losses, seconds, versions).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from converters.demo_gans import _Trainer
from converters.generators import build_generator

IMAGE_SIZE = 64
OUT_DIR = Path(__file__).parent / "demo_weights" / "paper_size"
RECORD_FILE = "training.json"


def paper_discriminator(ndf: int = 64, nc: int = 3) -> nn.Module:
    """The paper's DCGAN discriminator for ``(nc, 64, 64)`` images → ``(B, 1)`` probabilities."""
    layers, ch = [nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)], ndf
    for _ in range(3):
        layers += [nn.Conv2d(ch, 2 * ch, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * ch),
                   nn.LeakyReLU(0.2, True)]
        ch *= 2
    return nn.Sequential(*layers, nn.Conv2d(ch, 1, 4, 1, 0, bias=False), nn.Flatten(),
                         nn.Sigmoid())


def training_images(n: int, seed: int, folder=None) -> np.ndarray:
    """uint8 ``(n, 3, 64, 64)``: a seeded subset of Fashion-MNIST train, grey repeated ×3."""
    from flipad_jax.datasets import fashion_mnist_folder, resize_images
    from flipad_jax.idx import load_split

    images, _ = load_split(fashion_mnist_folder(folder), "train")
    if not 0 < n <= len(images):
        raise ValueError(f"n={n}: expected 1 to {len(images)} training images")
    pick = np.sort(np.random.default_rng(seed).choice(len(images), n, replace=False))
    return np.repeat(resize_images(images[pick], IMAGE_SIZE), 3, axis=1)


def train(n: int, steps: int, *, seed: int = 0, batch: int = 128, folder=None,
          progress: bool = True) -> tuple[nn.Module, dict]:
    """Train the paper-size DCGAN for ``steps`` steps (one D and one G update each) on ``n``
    images drawn under ``seed``; returns (G in eval mode, its record)."""
    if steps < 1 or batch < 2:
        raise ValueError(f"steps={steps}, batch={batch}: expected steps >= 1 and batch >= 2")
    images = training_images(n, seed, folder)
    torch.manual_seed(seed)
    gen = build_generator("dcgan", seed=seed)
    trainer = _Trainer("dcgan", gen, batch, disc=paper_discriminator())
    data = torch.from_numpy(images).float().div_(127.5).sub_(1.0)
    losses, d_sum, g_sum, start = [], 0.0, 0.0, time.perf_counter()
    order = torch.randperm(n)
    log_every = max(1, steps // 20)
    for step in tqdm(range(steps), desc="paper-size DCGAN", disable=not progress):
        lo = (step * batch) % n
        if lo + batch > n:  # a new pass over the subset
            order, lo = torch.randperm(n), 0
        d_loss, g_loss = trainer.step(data[order[lo:lo + batch]])
        if not (np.isfinite(d_loss) and np.isfinite(g_loss)):
            raise FloatingPointError(f"paper-size DCGAN diverged at step {step + 1}")
        d_sum, g_sum = d_sum + d_loss, g_sum + g_loss
        if (step + 1) % log_every == 0:
            losses.append({"step": step + 1, "d": d_sum / log_every, "g": g_sum / log_every})
            d_sum = g_sum = 0.0
    gen.eval()
    record = {"arch": "dcgan", "options": {"nz": 100, "ngf": 64, "nc": 3, "image_size": 64},
              "seed": seed, "subset": n, "steps": steps, "batch_size": batch,
              "images_seen": steps * batch, "epochs_of_subset": round(steps * batch / n, 2),
              "losses": losses, "seconds": round(time.perf_counter() - start, 1)}
    return gen, record


def main(argv=None) -> int:
    from safetensors.torch import save_file

    from flipad_jax._files import atomic_dir

    p = argparse.ArgumentParser(description="Train the paper-size DCGAN on Fashion-MNIST 64×64×3.")
    p.add_argument("--out", default=str(OUT_DIR), help="folder to (re)write")
    p.add_argument("--data", help="Fashion-MNIST IDX folder (default: Debian's)")
    p.add_argument("--n", type=int, default=10000, help="training subset size")
    p.add_argument("--steps", type=int, default=1000, help="D+G update steps")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    gen, record = train(args.n, args.steps, seed=args.seed, batch=args.batch, folder=args.data,
                        progress=not args.quiet)
    record["command"] = "python -m converters.paper_gan " + " ".join(
        argv if argv is not None else sys.argv[1:])
    record.update(data="Fashion-MNIST train split, bicubic 28→64, grey repeated to 3 channels",
                  weights_dtype="float16", torch=torch.__version__,
                  threads=torch.get_num_threads())
    with atomic_dir(Path(args.out), overwrite=True) as tmp:
        save_file({k: (v.half() if v.is_floating_point() else v).contiguous()
                   for k, v in gen.state_dict().items()}, tmp / "dcgan.safetensors")
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
