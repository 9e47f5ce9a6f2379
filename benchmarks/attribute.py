"""Stacked inversion (``flipad attribute``) against a loop over models, on the demo's five heads.

The five Fashion-MNIST generators that ship with the package (``converters/demo_weights``) are
converted to head bundles (or read from ``--bundles``, e.g. a demo run's ``work/bundles``): DCGAN,
WGAN-GP, EBGAN and DCGAN seed 1 share one geometry (ConvTranspose2d 32→1, k4 s2 p1, 16×16 →
32×32), LSGAN has its own (Conv2d 32→1, k3, 32×32). Images: Fashion-MNIST test images at 32×32
in [−1, 1]. Solver: the demo's (λ = 5e-4, tol 1e-2, at most 50 iterations).

Per batch size, warm (every compiled shape run once first), repeated side by side:

* **loop**: ``head.invert(x)`` for each of the five heads in turn (what five ``flipad score``
  runs do);
* **stacked**: :func:`flipad_jax.attribute.invert_stacked` over each geometry group (one vmapped
  solve for the four same-geometry heads; LSGAN's own solve).

Reports medians, the ratio loop / stacked (> 1: stacking is faster), and the largest difference
between the two paths' solutions. Then a probe of where the time goes: one forward + adjoint
pair of the four same-geometry operators per batch size, as a loop, vmapped with JAX's rule (a
grouped convolution) and vmapped with ``kernel_batching="block_diagonal"`` as the stacked solve
runs it (models stacked along the channels: no grouping, M× the multiply-adds), each the mean
of 30 warm calls.

    python benchmarks/attribute.py --batches 8,64 --out benchmarks/results/attribute_cpu.json
"""

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from converters.demo import FULL, solver_options
from flipad_jax.attribute import geometry_key, invert_stacked
from flipad_jax.datasets import fashion_mnist
from flipad_jax.head import Head
from flipad_jax.images import pixels_to_range

NAMES = ("dcgan", "wgangp", "lsgan", "ebgan", "dcgan_seed1")
LAM = 5e-4
OPTIONS = solver_options(FULL)  # the demo's solver


def demo_heads(bundles: Path) -> dict:
    """The five demo heads, converted from the shipped weights into ``bundles`` if missing."""
    from converters.convert import convert
    from converters.demo_gans import GEN_OPTIONS, WEIGHTS_DIR, arch_of

    for name in NAMES:
        if not (bundles / name).exists():
            convert(Path(WEIGHTS_DIR) / f"{name}.safetensors", bundles / name,
                    arch=arch_of(name), arch_options=GEN_OPTIONS, samples=2000, seed=0,
                    progress=False)
    return {name: Head.load(bundles / name) for name in NAMES}


def run_loop(heads, x):
    return [np.asarray(h.invert(x, LAM, options=OPTIONS).z) for h in heads]


def run_stacked(groups, x):
    out = []
    for group in groups:
        if len(group) == 1:
            out.append(np.asarray(group[0].invert(x, LAM, options=OPTIONS).z)[None])
        else:
            out.append(invert_stacked(group, x, [LAM] * len(group), [OPTIONS] * len(group)).z)
    return [z for block in out for z in block]


@jax.jit
def _pair(op, z):
    return op.adjoint(op.apply(z))


def _mean_ms(fn, *args, n=30):
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(n):
        out = fn(*args)
    jax.block_until_ready(out)
    return 1000 * (time.perf_counter() - start) / n


def _vmapped_pair(ops, kernel_batching: str):
    """One jitted forward + adjoint of the M stacked operators under ``vmap``, and its leaves."""
    ops = [dataclasses.replace(op, kernel_batching=kernel_batching) for op in ops]
    treedef = jax.tree_util.tree_structure(ops[0])
    leaves = [jnp.stack(ls) for ls in zip(*(jax.tree_util.tree_leaves(op) for op in ops))]
    return jax.jit(jax.vmap(lambda ls, z: _pair(treedef.unflatten(ls), z))), leaves


def operator_probe(ops, batch: int) -> dict:
    """ms per forward + adjoint pair of M same-geometry convolutions: a loop, and vmapped with
    each ``kernel_batching`` (JAX's grouped rule, and the block-diagonal one stacking uses)."""
    z = jnp.ones((len(ops), batch) +
                 tuple(ops[0].to_internal(jnp.ones((1,) + ops[0].in_shape)).shape[1:]))
    return dict(batch=batch, loop_ms=sum(_mean_ms(_pair, op, z[0]) for op in ops),
                vmapped_ms=_mean_ms(*_vmapped_pair(ops, "grouped"), z),
                block_diagonal_ms=_mean_ms(*_vmapped_pair(ops, "block_diagonal"), z))


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundles", help="folder of the five demo bundles (default: convert the "
                                     "shipped weights into a temporary folder)")
    p.add_argument("--batches", default="8,64,256", help="batch sizes, comma-separated")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", help="JSON file")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        heads = demo_heads(Path(args.bundles or tmp))
    by_key: dict = {}
    for name, head in heads.items():
        by_key.setdefault(geometry_key(head, OPTIONS), []).append(name)
    group_names = list(by_key.values())
    order = [n for g in group_names for n in g]
    groups = [[heads[n] for n in g] for g in group_names]
    loop_heads = [heads[n] for n in order]
    images = pixels_to_range(fashion_mnist("test", 32))

    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        x = images[:batch]
        run_loop(loop_heads, x), run_stacked(groups, x)  # compile
        loop_s, stacked_s = [], []
        for _ in range(args.repeats):  # side by side: both see the same machine load
            t, z_loop = timed(run_loop, loop_heads, x)
            loop_s.append(t)
            t, z_stacked = timed(run_stacked, groups, x)
            stacked_s.append(t)
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(z_loop, z_stacked))
        row = dict(batch=batch, loop_s=float(np.median(loop_s)),
                   stacked_s=float(np.median(stacked_s)), loop_all_s=loop_s,
                   stacked_all_s=stacked_s, max_abs_diff_z=diff)
        row["ratio_loop_over_stacked"] = row["loop_s"] / row["stacked_s"]
        rows.append(row)
        print(f"batch {batch:4d}: loop {row['loop_s']:.3f} s, stacked {row['stacked_s']:.3f} s, "
              f"loop/stacked {row['ratio_loop_over_stacked']:.2f}x, max |dz| {diff:.2e}",
              flush=True)

    probe = [operator_probe([h.op for h in max(groups, key=len)], b) for b in
             (int(b) for b in args.batches.split(","))]
    for row in probe:
        print(f"batch {row['batch']:4d}, one forward + adjoint of the group: loop "
              f"{row['loop_ms']:.2f} ms, vmapped {row['vmapped_ms']:.2f} ms, block-diagonal "
              f"{row['block_diagonal_ms']:.2f} ms", flush=True)
    result = dict(groups=group_names, lam=LAM, options=OPTIONS.to_json(), rows=rows, probe=probe,
                  backend=jax.default_backend(), devices=[str(d) for d in jax.devices()],
                  cpu_count=os.cpu_count(), load_average=os.getloadavg(),
                  jax=jax.__version__, python=sys.version.split()[0],
                  machine=platform.machine(), repeats=args.repeats)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("rows", "probe")}))


if __name__ == "__main__":
    main()
