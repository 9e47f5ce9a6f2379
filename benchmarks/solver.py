"""Lasso solver benchmark: flipad-jax's FISTA vs the reference PyTorch solver, side by side.

For each layer and batch size, in one process and on one device:

1. the reference solver (``reference_fista.py``: fixed step 0.025, λ 5e-4, batch-wide stop rule,
   start at z̄) runs up to ``--ref-iters`` iterations;
2. ours runs with its defaults (step 1/L, restart, per-sample duality-gap stop);
3. ours runs to the reference's final objective: the smallest iteration count k at which every
   sample's objective is ≤ the reference's (found by search, then timed warm) — the fair figure;
4. ours in paper mode (the reference's algorithm in JAX) runs the reference's iteration count.

Objectives of every solution are evaluated the same way, in float64 with PyTorch. Compile time is
reported apart from warm run time. On a GPU the script also measures copy bandwidth and states
the bytes our loop moves per iteration. JSON goes to ``--out``.

    python benchmarks/solver.py --device cpu --batches 16 --ref-iters 1000 --out solver_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

import flipad_jax as fj
from flipad_jax.lasso import _fista
from loop_traffic import compiled_loop_bytes
from reference_fista import layer_maps, reference_fista

LAYERS = {
    # name: (kind, weight shape, stride, padding, bias, activation input shape)
    "dcgan": ("conv_transpose2d", (64, 3, 4, 4), 2, 1, False, (64, 32, 32)),
    "lsgan": ("conv2d", (3, 64, 3, 3), 1, 1, True, (64, 64, 64)),
}
LAM = 5e-4


def make_problem(name, batch, seed=0):
    """Weights N(0, 0.02); targets atanh of 8-bit-quantised tanh outputs of ReLU activations."""
    kind, wshape, stride, padding, has_bias, zshape = LAYERS[name]
    rng = np.random.default_rng(seed)
    weight = (rng.normal(size=wshape) * 0.02).astype(np.float32)
    bias = (rng.normal(size=3) * 0.02).astype(np.float32) if has_bias else None
    make = fj.ConvTranspose2d if kind == "conv_transpose2d" else fj.Conv2d
    op = make(weight, bias, stride=stride, padding=padding, in_size=zshape[1:])
    zbar = np.maximum(rng.normal(size=(256,) + zshape), 0).mean(0).astype(np.float32)
    z_true = np.maximum(rng.normal(size=(batch,) + zshape), 0).astype(np.float32)
    x = np.tanh(np.asarray(op.affine(jnp.asarray(z_true))))
    x = np.round((x + 1) * 127.5) / 127.5 - 1          # the PNG round trip of real samples
    o = np.arctanh(np.clip(x, -1 + 1e-4, 1 - 1e-4)).astype(np.float32)
    return dict(kind=kind, op=op, weight=weight, bias=bias, stride=stride, padding=padding,
                zbar=zbar, o=o)


def head_problem(bundle, images, batch):
    """A trained head's problem: the bundle's layer and z̄ (``flipad convert``), targets σ⁻¹ of
    the first ``batch`` images of ``images`` (e.g. G's own 8-bit samples, as the demo writes
    them), so that speed is measured where trained weights put it, not at random N(0, 0.02)."""
    from flipad_jax.head import Head
    from flipad_jax.images import load_images

    head = Head.load(bundle)
    op = head.op
    kind = {"ConvTranspose2d": "conv_transpose2d", "Conv2d": "conv2d"}.get(type(op).__name__)
    if kind is None or op.groups != 1 or op.dilation != (1, 1):
        raise SystemExit(f"--bundle {bundle}: a {type(op).__name__} layer; the reference "
                         "transcription covers ungrouped, undilated Conv2d/ConvTranspose2d")
    x = load_images(images, head.output_range, shape=head.out_shape)[:batch]
    if len(x) < batch:
        raise SystemExit(f"--images {images}: {len(x)} images, expected at least {batch}")
    return dict(kind=kind, op=op, weight=np.asarray(op.weight, np.float32),
                bias=None if head.bias is None else np.asarray(head.bias, np.float32),
                stride=op.stride, padding=op.padding,
                zbar=np.asarray(head.zbar, np.float32), o=np.asarray(head.target(x), np.float32))


def objective64(problem, z):
    """P(z) per sample in float64 with PyTorch: one yardstick for every solver."""
    w = torch.from_numpy(problem["weight"]).double()
    forward, _ = layer_maps(problem["kind"], w, problem["stride"], problem["padding"])
    z = torch.from_numpy(np.array(z, np.float64))
    out = forward(z)
    if problem["bias"] is not None:
        out = out + torch.from_numpy(problem["bias"]).double().view(1, -1, 1, 1)
    res = (out - torch.from_numpy(problem["o"]).double()).flatten(1)
    l1 = (z - torch.from_numpy(problem["zbar"]).double()).abs().flatten(1).sum(1)
    return (0.5 * (res ** 2).sum(1) + LAM * l1).numpy()


def timed(fn, repeats=1, warmup=False):
    """(result, seconds of the fastest of ``repeats`` runs), blocking on device work; with
    ``warmup`` one untimed run first, also waited for (JAX dispatches asynchronously, so an
    unawaited warm-up would run on inside the timed call)."""
    if warmup:
        jax.block_until_ready(fn())
    best, result = np.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        jax.block_until_ready(result)
        best = min(best, time.perf_counter() - start)
    return result, best


def run_reference(problem, device, max_iter):
    dev = torch.device(device)
    args = [torch.from_numpy(a).to(dev) if a is not None else None
            for a in (problem["weight"], problem["bias"], problem["o"], problem["zbar"])]
    def go():
        z, iters = reference_fista(problem["kind"], *args, max_iter=max_iter,
                                   stride=problem["stride"], padding=problem["padding"])
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return z, iters
    go_small = lambda: reference_fista(problem["kind"], *args, max_iter=3,  # noqa: E731
                                       stride=problem["stride"], padding=problem["padding"])
    go_small()  # warm-up: cuDNN autotuning and allocator
    start = time.perf_counter()
    z, iters = go()
    seconds = time.perf_counter() - start
    return z.cpu().numpy(), iters, seconds


def ours_fixed_iterations(problem, o, k, lipschitz, **kw):
    return fj.solve_lasso(problem["op"], o, LAM, anchor=problem["zbar"], max_iter=k,
                          stop="change", tol=0.0, lipschitz=lipschitz, **kw)


def iterations_to_reach(problem, o, target, lipschitz, cap):
    """Smallest k with every sample's objective ≤ target (doubling, then bisection)."""
    def reached(k):
        res = ours_fixed_iterations(problem, o, k, lipschitz)
        return bool(np.all(objective64(problem, res.z) <= target))
    hi = 8
    while not reached(hi):
        if hi >= cap:
            return None
        hi = min(2 * hi, cap)
    lo = hi // 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if reached(mid) else (mid, hi)
    return hi


def loop_bytes_per_iteration(problem, o, lipschitz):
    """Bytes our loop moves per iteration, read off its compiled while body
    (``loop_traffic.py``: every data-moving instruction reads its operands and writes its
    result once)."""
    return compiled_loop_bytes(_fista, problem["op"], problem["zbar"], o,
                               1.0 / (1.01 * lipschitz))["bytes"]


def copy_bandwidth():
    """Device copy bandwidth in bytes/s (read + write), from a 1 GiB array."""
    x = jnp.ones((256 * 1024 * 1024,), jnp.float32)
    f = jax.jit(lambda a: a * 1.0001)
    f(x).block_until_ready()
    _, seconds = timed(lambda: f(x), repeats=10)
    return 2 * x.nbytes / seconds


def bench_one(name, batch, device, ref_iters, problem=None, former_default=False):
    problem = problem or make_problem(name, batch)
    o = jnp.asarray(problem["o"])
    row = dict(layer=name, batch=batch, lam=LAM)

    z_ref, ref_k, ref_s = run_reference(problem, "cuda" if device == "gpu" else "cpu", ref_iters)
    ref_obj = objective64(problem, z_ref)
    row["reference"] = dict(seconds=ref_s, iterations=ref_k, objective_mean=float(ref_obj.mean()),
                            step=0.025, max_iter=ref_iters)

    lipschitz = problem["op"].lipschitz()
    # Default solve: first call includes compilation, then warm runs.
    start = time.perf_counter()
    res = fj.solve_lasso(problem["op"], o, LAM, anchor=problem["zbar"], lipschitz=lipschitz)
    jax.block_until_ready(res.z)
    first = time.perf_counter() - start
    res, warm = timed(lambda: fj.solve_lasso(problem["op"], o, LAM, anchor=problem["zbar"],
                                             lipschitz=lipschitz), repeats=1)
    obj = objective64(problem, res.z)
    row["ours_default"] = dict(
        seconds=warm, compile_seconds=max(first - warm, 0.0),
        iterations_max=int(res.iterations.max()), iterations_mean=float(res.iterations.mean()),
        converged=int(res.converged.sum()), objective_mean=float(obj.mean()),
        relative_gap_max=float((res.gap / res.objective).max()), lipschitz=lipschitz,
        step_over_reference_step=float(res.step / 0.025))

    if former_default:
        # the certified solve as the default was before the growing step and the λ path
        # (LassoOptions.step_growth, .continuation) joined it: the fixed step 1/L
        former = lambda: fj.solve_lasso(problem["op"], o, LAM, anchor=problem["zbar"],  # noqa
                                        lipschitz=lipschitz, step_growth=None,
                                        continuation=None)
        res_f, former_s = timed(former, warmup=True)
        row["ours_former_default"] = dict(
            max_iter=fj.LassoOptions().max_iter, seconds=former_s,
            iterations_max=int(res_f.iterations.max()),
            iterations_mean=float(res_f.iterations.mean()), converged=int(res_f.converged.sum()),
            objective_mean=float(objective64(problem, res_f.z).mean()),
            relative_gap_max=float((res_f.gap / res_f.objective).max()),
            speedup_vs_reference=ref_s / former_s)

    k = iterations_to_reach(problem, o, ref_obj, lipschitz, cap=4 * ref_iters)
    if k is not None:
        _, reach_s = timed(lambda: ours_fixed_iterations(problem, o, k, lipschitz), repeats=3)
        row["ours_to_reference_objective"] = dict(iterations=k, seconds=reach_s,
                                                  speedup_vs_reference=ref_s / reach_s)
        per_iter = reach_s / k
    else:
        row["ours_to_reference_objective"] = None
        per_iter = warm / max(int(res.iterations.max()), 1)

    paper = lambda: fj.solve_lasso(problem["op"], o, LAM, anchor=problem["zbar"],  # noqa: E731
                                   options=fj.LassoOptions.paper(problem["op"]),
                                   max_iter=ref_k, tol=0.0)
    paper_res, paper_s = timed(paper, warmup=True)
    row["ours_paper_mode"] = dict(seconds=paper_s, iterations=ref_k,
                                  objective_mean=float(objective64(problem, paper_res.z).mean()),
                                  speedup_vs_reference=ref_s / paper_s)
    row["ours_default"]["speedup_vs_reference"] = ref_s / warm
    nbytes = loop_bytes_per_iteration(problem, o, lipschitz)
    row["per_iteration"] = dict(seconds=per_iter, bytes_moved=nbytes,
                                achieved_bytes_per_s=nbytes / per_iter)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--layers", default="dcgan,lsgan")
    parser.add_argument("--batches", default="16")
    parser.add_argument("--ref-iters", type=int, default=1000)
    parser.add_argument("--bundle", action="append", default=[], metavar="NAME=DIR",
                        help="also a trained head: its bundle (repeatable), with --images")
    parser.add_argument("--images", action="append", default=[], metavar="NAME=SRC",
                        help="that head's targets: G's own images (8-bit PNGs or .npy)")
    parser.add_argument("--former-default", action="store_true",
                        help="also time the certified solve at the fixed step without the λ "
                             "path (the default before LassoOptions' step_growth and "
                             "continuation joined it)")
    parser.add_argument("--out", default=None, help="JSON file to write")
    args = parser.parse_args()
    heads = dict(b.split("=", 1) for b in args.bundle)
    targets = dict(i.split("=", 1) for i in args.images)
    if set(heads) != set(targets):
        raise SystemExit(f"--bundle names {sorted(heads)} and --images names {sorted(targets)}: "
                         "expected one --images per --bundle")
    if args.device == "cpu":
        jax.config.update("jax_platforms", "cpu")
    elif jax.default_backend() != "gpu" or not torch.cuda.is_available():
        raise SystemExit("--device gpu: JAX or PyTorch sees no GPU")
    report = dict(
        command="python benchmarks/solver.py " + " ".join(map(shlex.quote, sys.argv[1:])),
        device=str(jax.devices()[0].device_kind), platform=platform.platform(),
        cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
        versions=dict(jax=jax.__version__, torch=torch.__version__, flipad_jax=fj.__version__),
        precision=("backend defaults in both: TF32 convolutions on NVIDIA GPUs"
                   if args.device == "gpu" else "float32"),
        rows=[])
    if args.device == "gpu":
        report["copy_bandwidth_bytes_per_s"] = copy_bandwidth()
        report["torch_device"] = torch.cuda.get_device_name()
    layers = [(name, None) for name in args.layers.split(",") if name] + \
        [(f"trained {name}", name) for name in heads]
    for name, head in layers:
        for batch in map(int, args.batches.split(",")):
            problem = None if head is None else head_problem(heads[head], targets[head], batch)
            row = bench_one(name, batch, args.device, args.ref_iters, problem,
                            args.former_default)
            if "copy_bandwidth_bytes_per_s" in report:
                row["per_iteration"]["fraction_of_copy_bandwidth"] = (
                    row["per_iteration"]["achieved_bytes_per_s"]
                    / report["copy_bandwidth_bytes_per_s"])
            report["rows"].append(row)
            reach = row["ours_to_reference_objective"]
            print(f"{name:13s} B={batch:5d} reference {row['reference']['seconds']:8.3f}s "
                  f"({row['reference']['iterations']} it) | ours default "
                  f"{row['ours_default']['seconds']:7.3f}s ({row['ours_default']['iterations_max']}"
                  f" it, {row['ours_default']['converged']}/{batch} certified, "
                  f"{row['ours_default']['speedup_vs_reference']:.2f}x) | to ref objective "
                  + (f"{reach['seconds']:7.3f}s ({reach['iterations']} it, "
                     f"{reach['speedup_vs_reference']:.1f}x)" if reach else "not reached")
                  + f" | paper mode {row['ours_paper_mode']['speedup_vs_reference']:.1f}x"
                  + (f" | former default {row['ours_former_default']['seconds']:.3f}s "
                     f"({row['ours_former_default']['converged']}/{batch} certified, "
                     f"{row['ours_former_default']['speedup_vs_reference']:.2f}x)"
                     if args.former_default else ""),
                  flush=True)
    text = json.dumps(report, indent=2)
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as fh:
            fh.write(text)
        os.replace(tmp, args.out)
    else:
        print(text)


if __name__ == "__main__":
    main()
