"""Per-iteration cost of the final-layer maps under different formulations, ours vs PyTorch.

Times, for the DCGAN and LSGAN last layers at one batch size: forward, adjoint, their pair and
one whole solver iteration as flipad-jax runs them, in each internal layout (NHWC, NCHW) and
precision (backend default, "high", "highest"), beside PyTorch's conv_transpose2d/conv2d pair. Used to choose the solver's internal
layout by measurement. Prints a table; JSON with --out.

    python benchmarks/conv_layouts.py --batch 1000 --out conv_layouts.json
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

import flipad_jax as fj
from reference_fista import layer_maps


def bench(fn, *args, repeats=20):
    fn(*args).block_until_ready() if hasattr(fn(*args), "block_until_ready") else None
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(*args)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def torch_bench(fn, repeats=20):
    fn()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--out", default=None)
    parser.add_argument("--layers", default="dcgan,lsgan")
    parser.add_argument("--layouts", default="NHWC,NCHW")
    parser.add_argument("--precisions", default="default,high,highest")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rows = {}
    layers = {
        "dcgan": (fj.ConvTranspose2d, (64, 3, 4, 4), 2, 1, (64, 32, 32)),
        "lsgan": (fj.Conv2d, (3, 64, 3, 3), 1, 1, (64, 64, 64)),
    }
    for name in args.layers.split(","):
        cls, wshape, s, pad, zshape = layers[name]
        w = (rng.normal(size=wshape) * 0.02).astype(np.float32)
        z = jnp.asarray(rng.normal(size=(args.batch,) + zshape).astype(np.float32))
        res = {}
        for layout in args.layouts.split(","):
            for precision in [None if p == "default" else p for p in args.precisions.split(",")]:
                op = cls(w, stride=s, padding=pad, in_size=zshape[1:], precision=precision,
                         layout=layout)
                zi = op.to_internal(z)
                yi = jax.jit(op.apply)(zi)
                tag = f"{layout}_{precision or 'default'}"
                res[f"{tag}_forward_ms"] = bench(jax.jit(op.apply), zi)
                res[f"{tag}_adjoint_ms"] = bench(
                    jax.jit(lambda o, y: o.adjoint(y)), op, yi)
                res[f"{tag}_pair_ms"] = bench(
                    jax.jit(lambda o, v: o.adjoint(o.apply(v))), op, zi)
                # Whole solver iterations (gap rule, certificates included), amortised.
                o_pub = op.out_from_internal(yi)
                run = lambda it: fj.solve_lasso(op, o_pub, 5e-4, max_iter=it,  # noqa: E731
                                                tol=0.0, lipschitz=1.0).z
                run(1)
                res[f"{tag}_solver_ms_per_iteration"] = (
                    bench(run, 101, repeats=3) - bench(run, 1, repeats=3)) / 100
        kind = "conv_transpose2d" if cls is fj.ConvTranspose2d else "conv2d"
        forward, adjoint = layer_maps(kind, torch.from_numpy(w).to(dev), s, pad)
        tz = torch.from_numpy(np.array(z)).to(dev)
        tzc = tz.contiguous(memory_format=torch.channels_last)
        res["torch_pair_ms"] = torch_bench(lambda: adjoint(forward(tz)))
        res["torch_channels_last_pair_ms"] = torch_bench(lambda: adjoint(forward(tzc)))
        res["z_bytes"] = int(z.nbytes)
        rows[name] = res
        print(name, json.dumps(res, indent=1), flush=True)
    report = dict(batch=args.batch, device=str(jax.devices()[0].device_kind), rows=rows)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
