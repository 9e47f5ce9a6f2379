"""XLA:CPU's convolution libraries side by side: YNNPACK (its default) against Eigen
(``flipad_jax.cpu_convolutions.eigen_jit``), with PyTorch's conv2d beside them, on DeepSAD's
5×5 "same" convolutions (the reference's LeNets, batch 128, NHWC inside as our networks run).

Per geometry: forward, input gradient and weight gradient, each its own compiled function, ms
(median of ``--repeats`` after a warm-up, the arrays already on the device); PyTorch: forward,
and forward + the gradients a train step needs (both, except the first layer's: no input
gradient when C_in = 3, the image). The evidence for which compiled functions
:mod:`flipad_jax.cpu_convolutions` routes to Eigen.

    python benchmarks/conv_library.py --out benchmarks/results/conv_library_cpu.json
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys

import jax
import numpy as np
import torch
from jax import lax

from conv_variants import median_ms
from flipad_jax.cpu_convolutions import eigen_jit, eigen_jit_options
from flipad_jax.report import write_json

# (C_in, map size, C_out): lenet_cifar10 (3 → 32 → 64 → 128 on 32×32) and the paper widths on
# the demo's 32-channel 16×16 features (32 → 128 → 256)
GEOMETRIES = ((3, 32, 32), (32, 16, 64), (64, 8, 128), (32, 16, 128), (128, 8, 256))


def _conv(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), ((2, 2), (2, 2)),
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _input_grad(x, w, g):
    return jax.vjp(lambda x: _conv(x, w), x)[1](g)[0]


def _weight_grad(x, w, g):
    return jax.vjp(lambda w: _conv(x, w), w)[1](g)[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", required=True, help="JSON file")
    args = p.parse_args(argv)
    if jax.default_backend() != "cpu" or not eigen_jit_options():
        raise SystemExit("needs an XLA:CPU backend that accepts the Eigen option")
    torch.set_num_threads(os.cpu_count())
    load_start = os.getloadavg()
    rows = []
    for c_in, size, c_out in GEOMETRIES:
        rng = np.random.default_rng(0)
        x = rng.normal(size=(args.batch, size, size, c_in)).astype(np.float32)
        w = (0.1 * rng.normal(size=(5, 5, c_in, c_out))).astype(np.float32)
        g = rng.normal(size=(args.batch, size, size, c_out)).astype(np.float32)
        xj, wj, gj = (jax.device_put(a) for a in (x, w, g))  # no host copy inside the timing
        row = {"c_in": c_in, "size": size, "c_out": c_out}
        for library, jit in (("ynnpack", jax.jit), ("eigen", eigen_jit)):
            fwd, gin, gw = jit(_conv), jit(_input_grad), jit(_weight_grad)
            row[library] = {"forward_ms": median_ms(fwd, xj, wj, repeats=args.repeats),
                            "input_grad_ms": median_ms(gin, xj, wj, gj, repeats=args.repeats),
                            "weight_grad_ms": median_ms(gw, xj, wj, gj, repeats=args.repeats)}
        first_layer = c_in == 3
        xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(not first_layer)
        wt = torch.from_numpy(w.transpose(3, 2, 0, 1).copy()).requires_grad_()
        gt = torch.from_numpy(g.transpose(0, 3, 1, 2).copy())

        def torch_forward():
            with torch.no_grad():
                return torch.nn.functional.conv2d(xt, wt, padding=2)

        def torch_forward_backward():
            y = torch.nn.functional.conv2d(xt, wt, padding=2)
            return torch.autograd.grad(y, (wt,) if first_layer else (xt, wt), gt)

        row["torch"] = {"forward_ms": median_ms(torch_forward, repeats=args.repeats),
                        "forward_backward_ms": median_ms(torch_forward_backward,
                                                         repeats=args.repeats)}
        rows.append(row)
        y, e = row["ynnpack"], row["eigen"]
        print(f"{c_in:4d} → {c_out:4d} on {size:2d}×{size:<2d}  ms fwd / in-grad / w-grad: "
              f"YNNPACK {y['forward_ms']:6.1f} / {y['input_grad_ms']:6.1f} / "
              f"{y['weight_grad_ms']:6.1f}   Eigen {e['forward_ms']:6.1f} / "
              f"{e['input_grad_ms']:6.1f} / {e['weight_grad_ms']:6.1f}   torch fwd "
              f"{row['torch']['forward_ms']:6.1f}, fwd+bwd "
              f"{row['torch']['forward_backward_ms']:6.1f}", flush=True)
    write_json(args.out, {
        "geometries": rows, "batch": args.batch, "repeats": args.repeats,
        "device": f"{platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__}, "
                  f"torch {torch.__version__} ({torch.get_num_threads()} threads)",
        "load_average_start": load_start, "load_average_end": os.getloadavg(),
        "command": "python benchmarks/conv_library.py " + shlex.join(
            sys.argv[1:] if argv is None else argv)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
