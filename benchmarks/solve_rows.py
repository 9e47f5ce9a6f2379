"""Lasso time per image against rows per solve, on trained heads: the evidence behind
``flipad_jax.head.CPU_SOLVE_BYTES``.

For each head (the shipped demo DCGAN and LSGAN, and the paper-size 64×64×3 DCGAN of
``converters/demo_weights/paper_size``), in one process: convert it, draw G's own 8-bit samples,
then time ``Head.invert`` (the demo's solve: 50 iterations, certified gap 1e-2, λ 5e-4) over the
same images in solves of each row count, warm, best of ``--rounds``, and in solves of the row
count ``Head.solve_rows()`` picks on this backend. Samples stop independently
under this rule, so every row count returns the same features; only the time differs.

    python benchmarks/solve_rows.py --out benchmarks/results/solve_rows_cpu.json
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

import flipad_jax as fj
from converters.convert import convert
from converters.demo_gans import GEN_OPTIONS, WEIGHTS_DIR
from converters.sampling import sample
from flipad_jax.images import load_images
from flipad_jax.report import write_json

HEADS = {  # name: (weights, arch, arch options, images)
    "dcgan": (WEIGHTS_DIR / "dcgan.safetensors", "dcgan", GEN_OPTIONS, 1000),
    "lsgan": (WEIGHTS_DIR / "lsgan.safetensors", "lsgan", GEN_OPTIONS, 1000),
    "paper_dcgan": (WEIGHTS_DIR / "paper_size" / "dcgan.safetensors", "dcgan", None, 400),
}
ROWS = (1000, 400, 200, 100, 50, 25, 12, 8, 4)
SOLVE = dict(tol=1e-2, max_iter=50)  # the demo's features
LAM = 5e-4


def time_rows(head, x, rows: int, rounds: int) -> float:
    """Best wall seconds of inverting all of ``x`` in solves of ``rows`` images (warm)."""
    def run():
        for i in range(0, len(x), rows):
            jax.block_until_ready(head.invert(x[i:i + rows], LAM, **SOLVE).lasso.z)

    head.invert(x[:rows], LAM, **SOLVE)  # compile the full-size solve
    if len(x) % rows:
        head.invert(x[-(len(x) % rows):], LAM, **SOLVE)  # and the tail's
    best = np.inf
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--heads", default=",".join(HEADS), help="comma-separated names of HEADS")
    p.add_argument("--rows", default=",".join(map(str, ROWS)), help="row counts to time")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", required=True, help="JSON file")
    args = p.parse_args(argv)
    rows_list = [int(v) for v in args.rows.split(",")]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.heads.split(","):
            weights, arch, options, n = HEADS[name]
            kw = {} if options is None else {"arch_options": options}
            convert(weights, Path(tmp) / name / "bundle", arch=arch, samples=500, seed=0,
                    progress=False, **kw)
            sample(weights, n, Path(tmp) / name / "png", arch=arch, seed=1, progress=False, **kw)
            head = fj.Head.load(Path(tmp) / name / "bundle")
            x = load_images(Path(tmp) / name / "png", head.output_range)
            z_bytes = head.zbar.dtype.itemsize * int(np.prod(head.in_shape))
            chosen = min(head.solve_rows(), n)
            per_image_ms = {}
            for rows in sorted({r for r in rows_list if r <= n} | {chosen}, reverse=True):
                per_image_ms[rows] = 1e3 * time_rows(head, x, rows, args.rounds) / n
                print(f"{name} rows {rows:5d}: {per_image_ms[rows]:.2f} ms/image "
                      f"(z {rows * z_bytes / 2**20:.1f} MiB)", flush=True)
            best = min(per_image_ms, key=per_image_ms.get)
            results[name] = {
                "head": repr(head), "images": n, "z_bytes_per_image": z_bytes,
                "ms_per_image": per_image_ms, "best_rows": best, "chosen_rows": chosen,
                "speedup_chosen_vs_largest": per_image_ms[max(per_image_ms)] / per_image_ms[chosen],
                "speedup_best_vs_largest": per_image_ms[max(per_image_ms)] / per_image_ms[best]}
    write_json(args.out, {
        "heads": results, "solve": {**SOLVE, "lam": LAM},
        "device": f"{platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__} on "
                  f"{jax.default_backend()}",
        "load_average_end": os.getloadavg(),
        "command": "python benchmarks/solve_rows.py " + shlex.join(sys.argv[1:] if argv is None
                                                                   else argv)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
