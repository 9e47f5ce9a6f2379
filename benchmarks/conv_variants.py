"""Formulations of the DCGAN last layer's forward+adjoint pair on one device, timed side by side.

Probes why the transposed convolution pair runs slower in XLA than in PyTorch on a GPU:
kernels passed as arguments vs baked in as constants, the input-dilated convolution vs
``lax.conv_transpose`` vs autodiff's transpose, and a polyphase (sub-pixel) form that uses only
stride-1 convolutions. Every variant is checked against the operator before it is timed.

    python benchmarks/conv_variants.py --batch 1000 --out conv_variants.json
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax import lax

import flipad_jax as fj

DN = ("NCHW", "OIHW", "NCHW")


def median_ms(fn, *args, repeats=20):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def polyphase_kernel(w, s=2):
    """Sub-pixel kernel: ConvT(k=4, s=2, p=1) as a stride-1 2×2 conv to 4·C_out channels."""
    n = w.shape[2] // s
    idx = np.array([[phi + s * (n - 1 - t) for phi in range(s)] for t in range(n)])
    k = w[:, :, idx][:, :, :, :, idx]                       # (Cin, Cout, n, s, n, s)
    k = jnp.transpose(k, (1, 3, 5, 0, 2, 4))                # (Cout, s, s, Cin, n, n)
    return k.reshape(w.shape[1] * s * s, w.shape[0], n, n)  # OIHW, O = (c, phase_y, phase_x)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    w = jnp.asarray((rng.normal(size=(64, 3, 4, 4)) * 0.02).astype(np.float32))
    z = jnp.asarray(rng.normal(size=(args.batch, 64, 32, 32)).astype(np.float32))
    op = fj.ConvTranspose2d(w, stride=2, padding=1, in_size=(32, 32), layout="NCHW")
    kd = w
    kt = jnp.transpose(w, (1, 0, 2, 3))[:, :, ::-1, ::-1]
    reference = jax.jit(lambda o, v: o.adjoint(o.apply(v)))(op, z)

    def fwd(v, kt):
        return lax.conv_general_dilated(v, kt, (1, 1), [(2, 2), (2, 2)], lhs_dilation=(2, 2),
                                        dimension_numbers=DN)

    def adj(y, kd):
        return lax.conv_general_dilated(y, kd, (2, 2), [(1, 1), (1, 1)], dimension_numbers=DN)

    kp = polyphase_kernel(w)

    def poly_fwd(v, kp):
        p = lax.conv_general_dilated(v, kp, (1, 1), [(1, 1), (1, 1)], dimension_numbers=DN)
        b, _, q, r = p.shape                                  # (B, 3·2·2, 33, 33)
        p = p.reshape(b, 3, 2, 2, q, r).transpose(0, 1, 4, 2, 5, 3).reshape(b, 3, 2 * q, 2 * r)
        return p[:, :, 1:65, 1:65]

    variants = {
        "operator_args": jax.jit(lambda o, v: o.adjoint(o.apply(v))),
        "kernels_as_args": jax.jit(lambda v, kt, kd: adj(fwd(v, kt), kd)),
        "kernels_as_constants": jax.jit(lambda v: adj(fwd(v, kt), kd)),
        "conv_transpose_primitive": jax.jit(lambda v, w: adj(lax.conv_transpose(
            v, jnp.transpose(w, (2, 3, 0, 1))[::-1, ::-1], (2, 2), [(2, 2), (2, 2)],
            dimension_numbers=("NCHW", "HWIO", "NCHW"), transpose_kernel=False), kd)),
        "adjoint_by_vjp": jax.jit(lambda v, kt: jax.vjp(lambda u: fwd(u, kt), v)[1](
            fwd(v, kt))[0]),
        "polyphase_with_vjp_adjoint": jax.jit(lambda v, kp: jax.vjp(lambda u: poly_fwd(u, kp),
                                                                    v)[1](poly_fwd(v, kp))[0]),
    }
    inputs = {
        "operator_args": (op, z), "kernels_as_args": (z, kt, kd), "kernels_as_constants": (z,),
        "conv_transpose_primitive": (z, w), "adjoint_by_vjp": (z, kt),
        "polyphase_with_vjp_adjoint": (z, kp),
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


if __name__ == "__main__":
    main()
