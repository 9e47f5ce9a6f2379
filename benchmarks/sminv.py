"""SM-Inv₂ reconstruction: flipad-jax (a loop over one jitted Adam step on all restarts × samples)
vs PyTorch.

Both sides invert the same demo generator (eval mode, float32) on the same images (half samples
the generator made, half real Fashion-MNIST test images) from the same initial latents
(:func:`flipad_jax.sminv.initial_latents`), with the same objective (each latent's per-pixel
MSE) and optimiser (Adam, lr 0.1, PyTorch's defaults). The PyTorch side is the fastest honest
form of the reference's loop (``src/flipad/wrappers/inversion.py``): all restarts and samples as
one batch of latents under one ``torch.optim.Adam`` (Adam is elementwise, so that is the same as
the reference's one Adam per latent, without its Python loop over optimisers and restarts).

Reported per side: wall time of the whole reconstruction (median over ``--rounds``; the sides
alternate so drifting machine load hits both alike), JAX's first call (compile + run) apart, time
per latent-step, the ratio torch / JAX, and how far the two results agree (max |Δ best distance|,
share of samples keeping the same restart). For a generator with nearest upsampling followed by
a "same" convolution (LSGAN), the JAX side also runs with those layers unfused
(``Generator.load(fuse_upsampling=False)``), timed in the same rounds (``jax_unfused``).

    python benchmarks/sminv.py --arch dcgan --samples 16 --restarts 10 --steps 100 \
        --out benchmarks/results/sminv_cpu_dcgan.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import torch
from safetensors.torch import load_file

from converters.demo_gans import GEN_OPTIONS, WEIGHTS_DIR, arch_of
from converters.full_generator import convert_generator
from converters.generators import build_generator
from flipad_jax._files import atomic_file
from flipad_jax.datasets import fashion_mnist
from flipad_jax.generators import Generator
from flipad_jax.images import pixels_to_range
from flipad_jax.sminv import initial_latents, reconstruct


def torch_reconstruct(model, images, z0, steps, lr):
    """The same reconstruction in PyTorch: returns (best distance (B,), restart (B,))."""
    restarts, n = z0.shape[:2]
    z = torch.tensor(z0.reshape((restarts * n,) + z0.shape[2:]), requires_grad=True)
    target = torch.from_numpy(images).reshape(1, n, -1)
    opt = torch.optim.Adam([z], lr=lr)

    def per_restart(z):
        return (model(z).reshape(restarts, n, -1) - target).square().mean(-1)

    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        per_restart(z).sum().backward()
        opt.step()
    with torch.no_grad():
        d = per_restart(z)
    best, restart = d.min(0)
    return best.numpy(), restart.numpy()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="dcgan", help="demo generator name (dcgan, lsgan, ...)")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--restarts", type=int, default=10)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    model = build_generator(arch_of(args.arch), options=GEN_OPTIONS)
    model.load_state_dict(load_file(str(WEIGHTS_DIR / f"{args.arch}.safetensors")))
    model.eval()
    for q in model.parameters():
        q.requires_grad_(False)
    with tempfile.TemporaryDirectory() as tmp:
        path = convert_generator(WEIGHTS_DIR / f"{args.arch}.safetensors", Path(tmp) / "g",
                                 arch=arch_of(args.arch), arch_options=GEN_OPTIONS,
                                 check_samples=2).path
        gen = Generator.load(path)
        # the same chain without fused upsampling + convolution, timed beside it when it has any
        unfused = Generator.load(path, fuse_upsampling=False)
    sides = {"jax": gen}
    if len(unfused.layers) != len(gen.layers):
        sides["jax_unfused"] = unfused
    half = args.samples // 2
    made = np.asarray(gen(np.random.default_rng(0).standard_normal(
        (half,) + gen.latent_shape).astype(np.float32)))
    real = pixels_to_range(fashion_mnist("test", 32)[:args.samples - half])
    images = np.concatenate([made, real])
    key = jax.random.key(0)
    z0 = np.asarray(initial_latents(key, args.restarts, np.arange(args.samples),
                                    gen.latent_shape))
    kw = dict(key=key, restarts=args.restarts, steps=args.steps, lr=args.lr,
              batch_size=args.samples, progress=False)

    load_before = os.getloadavg()
    t = time.perf_counter()
    ours = reconstruct(gen, images, **kw)
    first = time.perf_counter() - t
    for side in list(sides)[1:]:
        reconstruct(sides[side], images, **kw)  # compiled before the timed rounds
    times = {**{side: [] for side in sides}, "torch": []}
    for _ in range(args.rounds):
        for side, g in sides.items():
            t = time.perf_counter()
            out = reconstruct(g, images, **kw)  # returns numpy: synchronised
            times[side].append(time.perf_counter() - t)
            ours = out if side == "jax" else ours
        t = time.perf_counter()
        theirs = torch_reconstruct(model, images, z0, args.steps, args.lr)
        times["torch"].append(time.perf_counter() - t)
    med = {k: float(np.median(v)) for k, v in times.items()}
    latent_steps = args.samples * args.restarts * args.steps
    result = {
        "arch": args.arch, "samples": args.samples, "restarts": args.restarts,
        "steps": args.steps, "lr": args.lr, "rounds": args.rounds,
        "seconds": {k: [round(v, 3) for v in vs] for k, vs in times.items()},
        "median_s": {k: round(v, 3) for k, v in med.items()},
        "jax_first_call_s": round(first, 3),
        "ms_per_latent_step": {k: round(1e3 * v / latent_steps, 4) for k, v in med.items()},
        "ratio_torch_over_jax": round(med["torch"] / med["jax"], 3),
        **({"ratio_unfused_over_fused": round(med["jax_unfused"] / med["jax"], 3)}
           if "jax_unfused" in med else {}),
        "agreement": {
            "max_abs_diff_best_distance": float(np.max(np.abs(ours.distance - theirs[0]))),
            "same_restart_share": float(np.mean(ours.restart == theirs[1])),
            "best_distance_jax": ours.distance.tolist(),
            "best_distance_torch": theirs[0].tolist()},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "jax_backend": jax.default_backend(), "torch_threads": torch.get_num_threads(),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "versions": {"jax": jax.__version__, "torch": torch.__version__},
    }
    with atomic_file(args.out) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median_s", "jax_first_call_s",
                                              "ratio_torch_over_jax", "ms_per_latent_step")}))


if __name__ == "__main__":
    main()
