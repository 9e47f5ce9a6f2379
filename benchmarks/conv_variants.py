"""Formulations of the DCGAN last layer's forward+adjoint pair on one device, timed side by side.

Probes why the transposed convolution pair runs slower in XLA than in PyTorch on a GPU:
kernels passed as arguments vs baked in as constants, the input-dilated convolution vs
``lax.conv_transpose`` vs autodiff's transpose, and a polyphase (sub-pixel) form that uses only
stride-1 convolutions (the operator's ``method="polyphase"``). Every variant is checked against
the operator before it is timed.

    python benchmarks/conv_variants.py --batch 1000 --out conv_variants.json

``--heads`` instead times ``ConvTranspose2d(method="direct")`` against ``method="polyphase"`` on the
shipped DCGAN heads (the demo's ConvT 32→1 k4 s2 p1, 14×14 → 28×28, and the paper-size ConvT
64→3 k4 s2 p1, 32×32 → 64×64, both with their trained weights) and on a k3 s2 p1 output_padding 1
geometry with random weights: the forward+adjoint pair and the per-iteration time of the FISTA
loop (``solve_lasso`` with a fixed iteration count; the difference of two counts, so the set-up
cancels). The variants alternate within each round, on a machine that may be loaded; the JSON
keeps every round and the medians.

    python benchmarks/conv_variants.py --heads --batches 16,256 --out benchmarks/results/conv_polyphase_cpu.json
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax import lax

import flipad_jax as fj
from flipad_jax._files import atomic_file

DN = ("NCHW", "OIHW", "NCHW")
WEIGHTS = Path(__file__).resolve().parent.parent / "converters/demo_weights"
LAM = 5e-4


def median_ms(fn, *args, repeats=20):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def pair_variants(args):
    rng = np.random.default_rng(0)
    w = jnp.asarray((rng.normal(size=(64, 3, 4, 4)) * 0.02).astype(np.float32))
    z = jnp.asarray(rng.normal(size=(args.batch, 64, 32, 32)).astype(np.float32))
    op = fj.ConvTranspose2d(w, stride=2, padding=1, in_size=(32, 32), layout="NCHW",
                            method="direct")
    op_poly = fj.ConvTranspose2d(w, stride=2, padding=1, in_size=(32, 32), layout="NCHW",
                                 method="polyphase")
    kd = w
    kt = jnp.transpose(w, (1, 0, 2, 3))[:, :, ::-1, ::-1]
    reference = jax.jit(lambda o, v: o.adjoint(o.apply(v)))(op, z)

    def fwd(v, kt):
        return lax.conv_general_dilated(v, kt, (1, 1), [(2, 2), (2, 2)], lhs_dilation=(2, 2),
                                        dimension_numbers=DN)

    def adj(y, kd):
        return lax.conv_general_dilated(y, kd, (2, 2), [(1, 1), (1, 1)], dimension_numbers=DN)

    variants = {
        "operator_args": jax.jit(lambda o, v: o.adjoint(o.apply(v))),
        "kernels_as_args": jax.jit(lambda v, kt, kd: adj(fwd(v, kt), kd)),
        "kernels_as_constants": jax.jit(lambda v: adj(fwd(v, kt), kd)),
        "conv_transpose_primitive": jax.jit(lambda v, w: adj(lax.conv_transpose(
            v, jnp.transpose(w, (2, 3, 0, 1))[::-1, ::-1], (2, 2), [(2, 2), (2, 2)],
            dimension_numbers=("NCHW", "HWIO", "NCHW"), transpose_kernel=False), kd)),
        "adjoint_by_vjp": jax.jit(lambda v, kt: jax.vjp(lambda u: fwd(u, kt), v)[1](
            fwd(v, kt))[0]),
        "operator_polyphase": jax.jit(lambda o, v: o.adjoint(o.apply(v))),
    }
    inputs = {
        "operator_args": (op, z), "kernels_as_args": (z, kt, kd), "kernels_as_constants": (z,),
        "conv_transpose_primitive": (z, w), "adjoint_by_vjp": (z, kt),
        "operator_polyphase": (op_poly, z),
    }
    rows = {}
    scale = float(jnp.abs(reference).max())
    for name, fn in variants.items():
        out = fn(*inputs[name])
        err = float(jnp.abs(out - reference).max()) / scale
        rows[name] = dict(pair_ms=median_ms(fn, *inputs[name]), max_rel_err=err)
        print(f"{name:28s} {rows[name]['pair_ms']:8.3f} ms  err {err:.1e}", flush=True)
    F = torch.nn.functional
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tw, tz = torch.from_numpy(np.asarray(w)).to(dev), torch.from_numpy(np.asarray(z)).to(dev)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    pair = lambda: F.conv2d(F.conv_transpose2d(tz, tw, stride=2, padding=1), tw,  # noqa: E731
                            stride=2, padding=1)
    pair(); sync()
    times = []
    for _ in range(20):
        start = time.perf_counter(); pair(); sync(); times.append(time.perf_counter() - start)
    rows["torch"] = dict(pair_ms=float(np.median(times)) * 1e3)
    print(f"{'torch':28s} {rows['torch']['pair_ms']:8.3f} ms", flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(batch=args.batch, device=str(jax.devices()[0].device_kind),
                           rows=rows), fh, indent=2)


def head_geometries():
    """name → (weight (C_in, C_out, k, k) float32, ConvTranspose2d keywords)."""
    from safetensors.numpy import load_file

    def trained(path, key):
        return load_file(str(WEIGHTS / path))[key].astype(np.float32)

    k3 = (np.random.default_rng(0).normal(size=(64, 3, 3, 3)) * 0.02).astype(np.float32)
    return {
        "demo_dcgan": (trained("dcgan.safetensors", "main.9.weight"),
                       dict(stride=2, padding=1, in_size=(14, 14))),
        "paper_dcgan": (trained("paper_size/dcgan.safetensors", "main.12.weight"),
                        dict(stride=2, padding=1, in_size=(32, 32))),
        "k3s2_random": (k3, dict(stride=2, padding=1, output_padding=1, in_size=(32, 32))),
    }


def seconds(fn):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def heads(args):
    """Direct against polyphase, alternating, per geometry and batch; medians over rounds."""
    k_lo, k_hi = args.iters
    rows = []
    pair = jax.jit(lambda o, v: o.adjoint(o.apply(v)))
    for name, (w, geometry) in head_geometries().items():
        ops = {m: fj.ConvTranspose2d(w, method=m, **geometry) for m in ("direct", "polyphase")}
        lipschitz = ops["direct"].lipschitz(rtol=1e-4, max_steps=128)
        for batch in args.batches:
            rng = np.random.default_rng(batch)
            z_true = np.maximum(rng.normal(size=(batch,) + ops["direct"].in_shape), 0)
            z_true = jnp.asarray(z_true, jnp.float32)
            o = ops["direct"](z_true)
            anchor = jnp.full(ops["direct"].in_shape, float(z_true.mean()), jnp.float32)

            def solve(op, k):
                return fj.solve_lasso(op, o, LAM, anchor=anchor, max_iter=k, stop="change",
                                      tol=0.0, lipschitz=lipschitz).z

            diff = float(jnp.abs(ops["polyphase"](z_true) - o).max() / jnp.abs(o).max())
            z_int = ops["direct"].to_internal(z_true)  # the pair in the loop's own layout
            compile_s = {m: seconds(lambda: (pair(op, z_int), solve(op, k_lo)))
                         for m, op in ops.items()}
            times = {m: dict(pair=[], lo=[], hi=[]) for m in ops}
            for _ in range(args.rounds):
                for m, op in ops.items():  # alternate the variants within each round
                    times[m]["pair"].append(seconds(lambda: pair(op, z_int)))
                    times[m]["lo"].append(seconds(lambda: solve(op, k_lo)))
                    times[m]["hi"].append(seconds(lambda: solve(op, k_hi)))
            row = dict(geometry=name, weight_shape=list(w.shape), batch=batch,
                       forward_max_rel_diff=diff, iters=[k_lo, k_hi])
            for m in ops:
                t = times[m]
                per_iter = (np.array(t["hi"]) - np.array(t["lo"])) / (k_hi - k_lo)
                row[m] = dict(pair_ms=1e3 * float(np.median(t["pair"])),
                              iter_ms=1e3 * float(np.median(per_iter)),
                              compile_s=compile_s[m], rounds=t)
            row["polyphase_speedup_pair"] = row["direct"]["pair_ms"] / row["polyphase"]["pair_ms"]
            row["polyphase_speedup_iter"] = row["direct"]["iter_ms"] / row["polyphase"]["iter_ms"]
            rows.append(row)
            print(f"{name:12s} B={batch:4d}  pair {row['direct']['pair_ms']:8.2f} → "
                  f"{row['polyphase']['pair_ms']:8.2f} ms ({row['polyphase_speedup_pair']:.2f}×)  "
                  f"iteration {row['direct']['iter_ms']:8.2f} → {row['polyphase']['iter_ms']:8.2f}"
                  f" ms ({row['polyphase_speedup_iter']:.2f}×)", flush=True)
    if args.out:
        record = dict(command=" ".join([os.path.basename(sys.executable)] + sys.argv),
                      device=str(jax.devices()[0].device_kind), platform=platform.platform(),
                      jax=jax.__version__, cpu_count=os.cpu_count(),
                      load_average=os.getloadavg(), lam=LAM, rows=rows)
        with atomic_file(args.out) as tmp:
            Path(tmp).write_text(json.dumps(record, indent=2))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--out", default=None)
    parser.add_argument("--heads", action="store_true",
                        help="direct vs polyphase on the DCGAN heads (pair and FISTA iteration)")
    parser.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")],
                        default=[16, 256])
    parser.add_argument("--iters", type=lambda s: [int(k) for k in s.split(",")],
                        default=[2, 10], help="the two FISTA iteration counts (lo,hi)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.heads:
        heads(args)
    else:
        pair_variants(args)


if __name__ == "__main__":
    main()
