"""Bytes the FISTA loop moves per iteration, read off the compiled program, and its time.

For each trained head and batch size, the solver's loop (``flipad_jax.lasso._fista``, gap
rule) is compiled for the default backend. The bytes an iteration moves are summed over the
top-level instructions of the compiled while-loop body (fusions, convolutions, copies, custom
calls): each reads its operands and writes its result once, which is what an unfused pass costs
(fusions' internal temporaries stay in registers or cache). Then the loop runs 2 and 202
iterations warm (tol 0: every sample runs them all) and the difference gives seconds per
iteration, so the start-up outside the loop cancels.

``--rev REV`` also loads ``flipad_jax/lasso.py`` as committed at git revision REV and measures
its loop in the same process, alternating with ours, so both see the same machine load:

    python benchmarks/loop_traffic.py --batches 16,256 --rev 3480cbc \\
        --out benchmarks/results/loop_traffic_cpu.json

Heads: the shipped demo DCGAN (ConvTranspose2d 32→1, 16×16 → 32×32) and LSGAN (Conv2d 32→1,
k3, 32×32) converted from ``converters/demo_weights`` (``--bundles DIR`` keeps them), and the
paper-size DCGAN (ConvTranspose2d 64→3, 32×32 → 64×64) from ``converters/demo_weights/
paper_size``. Targets: σ⁻¹ of Fashion-MNIST test images (at 64×64, three equal channels for
the paper-size head).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

LAM = 5e-4
REPO = Path(__file__).resolve().parents[1]
_SHAPE = re.compile(r"\b(pred|s32|u32|f16|bf16|f32|f64|s64)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s32": 4, "u32": 4, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "s64": 8}
_MOVES = ("fusion(", "convolution(", "copy(", "custom-call(")


def _nbytes(text: str) -> int:
    """Bytes of every array shape written in ``text`` (a result or an operand list)."""
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        total += _BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    return total


def loop_body_bytes(hlo: str) -> dict:
    """Bytes moved by one pass of the compiled while-loop body of ``hlo`` (optimised HLO text).

    Returns ``{"bytes", "passes"}``: the sum over the body's data-moving instructions of their
    operands' and result's sizes, and the number of such instructions."""
    loop = re.search(r"while\(.*?body=(%[\w.\-]+)", hlo)
    if loop is None:
        raise ValueError("no while loop in the compiled program")
    start = hlo.index(f"\n{loop.group(1)} ") + 1
    body = hlo[start:hlo.index("\n}\n", start)].split("\n")[1:]
    shapes, operands = {}, {}
    for line in body:
        name, _, rest = line.strip().partition(" = ")
        # "<result type, a tuple for multi-output fusions> <opcode>(<operands>), <attributes>"
        head = re.match(r"(.*?)\s*\b([a-z][\w\-]*)\((.*?)\)(,|$)", rest)
        if head is None:
            continue
        shapes[name] = _nbytes(head.group(1))
        if head.group(2) + "(" in _MOVES:
            operands[name] = re.findall(r"%[\w.\-]+", head.group(3))
    moved = passes = 0
    for name, used in operands.items():
        moved += shapes.get(name, 0) + sum(shapes.get(o, 0) for o in used)
        passes += 1
    return dict(bytes=moved, passes=passes)


def lasso_at(rev: str):
    """``flipad_jax/lasso.py`` as committed at ``rev``, imported as a module of its own."""
    source = subprocess.run(["git", "show", f"{rev}:flipad_jax/lasso.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / f"lasso_{rev}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"lasso_{rev}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while they are built
    spec.loader.exec_module(module)
    return module


def heads(bundles: Path) -> dict:
    """name → (Head, targets o (256, *out_shape)): σ⁻¹ of Fashion-MNIST test images."""
    from converters.convert import convert
    from converters.demo_gans import GEN_OPTIONS, WEIGHTS_DIR, arch_of
    from converters.paper_gan import OUT_DIR
    from flipad_jax.datasets import fashion_mnist
    from flipad_jax.head import Head
    from flipad_jax.images import pixels_to_range

    sources = {name: (Path(WEIGHTS_DIR) / f"{name}.safetensors",
                      dict(arch=arch_of(name), arch_options=GEN_OPTIONS))
               for name in ("dcgan", "lsgan")}
    sources["paper_dcgan"] = (OUT_DIR / "dcgan.safetensors", dict(arch="dcgan"))
    out = {}
    for name, (weights, options) in sources.items():
        if not (bundles / name).exists():
            convert(weights, bundles / name, samples=2000, seed=0, progress=False, **options)
        head = Head.load(bundles / name)
        c, size = head.out_shape[0], head.out_shape[-1]
        images = np.repeat(fashion_mnist("test", size)[:256], c, axis=1)
        out[name] = (head, head.target(pixels_to_range(images)))
    return out


def loop_problem(op, zbar, o):
    """The arguments of ``_fista`` for targets ``o`` ``(B, *out_shape)`` at λ = 5e-4, step 1/L."""
    r = op.out_to_internal(jnp.asarray(o) - op.affine(jnp.asarray(zbar)[None]))
    delta0 = jnp.zeros((r.shape[0],) + op.to_internal(jnp.asarray(zbar)[None]).shape[1:],
                       r.dtype)
    return r, jnp.full((r.shape[0],), LAM, r.dtype), delta0


def compiled_loop_bytes(fista, op, zbar, o, step) -> dict:
    """:func:`loop_body_bytes` of ``fista``'s loop compiled for this problem (gap rule)."""
    r, lam, delta0 = loop_problem(op, zbar, o)
    hlo = jax.jit(fista, static_argnames=("restart", "stop", "continuation")).lower(
        op, r, lam, delta0, step, 0.0, 2, restart=True, stop="gap").compile().as_text()
    return loop_body_bytes(hlo)


def measure(fista, head, o, batch: int, repeats: int) -> dict:
    op, step = head.op, 1.0 / (1.01 * head.lipschitz)
    r, lam, delta0 = loop_problem(op, head.zbar, o[:batch])

    def run(k):
        return fista(op, r, lam, delta0, step, 0.0, k, restart=True, stop="gap")

    jax.block_until_ready(run(2))
    times = {}
    for k in (2, 202):
        best = np.inf
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(run(k))
            best = min(best, time.perf_counter() - start)
        times[k] = best
    seconds = (times[202] - times[2]) / 200
    traffic = compiled_loop_bytes(fista, op, head.zbar, o[:batch], step)
    return dict(seconds_per_iteration=seconds, bytes_per_iteration=traffic["bytes"],
                passes=traffic["passes"], bytes_per_s=traffic["bytes"] / seconds,
                z_bytes=int(np.prod(delta0.shape)) * delta0.dtype.itemsize)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="16,256")
    p.add_argument("--heads", default="dcgan,lsgan,paper_dcgan")
    p.add_argument("--rev", help="also measure flipad_jax/lasso.py at this git revision")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bundles", help="folder for the converted bundles (default: temporary)")
    p.add_argument("--out")
    args = p.parse_args()

    from flipad_jax.lasso import _fista

    variants = {"ours": _fista}
    if args.rev:
        variants[args.rev] = lasso_at(args.rev)._fista
    # timed as one compiled program each (the library's loop is jitted per segment)
    variants = {name: jax.jit(f, static_argnames=("restart", "stop", "continuation"))
                for name, f in variants.items()}
    with tempfile.TemporaryDirectory() as tmp:
        available = heads(Path(args.bundles or tmp))
    rows = []
    for name in args.heads.split(","):
        head, o = available[name]
        for batch in (int(b) for b in args.batches.split(",")):
            row = dict(head=name, batch=batch, layer=repr(head.op))
            for label, fista in variants.items():
                row[label] = measure(fista, head, o, batch, args.repeats)
            if args.rev:
                row["speedup_vs_rev"] = (row[args.rev]["seconds_per_iteration"] /
                                         row["ours"]["seconds_per_iteration"])
            rows.append(row)
            print(json.dumps({k: v if not isinstance(v, dict) else
                              {kk: (round(vv, 6) if isinstance(vv, float) else vv)
                               for kk, vv in v.items()} for k, v in row.items()
                              if k != "layer"}), flush=True)
    result = dict(rows=rows, rev=args.rev, lam=LAM, backend=jax.default_backend(),
                  devices=[str(d) for d in jax.devices()], cpu_count=os.cpu_count(),
                  load_average=os.getloadavg(), jax=jax.__version__,
                  python=sys.version.split()[0], machine=platform.machine(),
                  command="python " + " ".join(sys.argv))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
