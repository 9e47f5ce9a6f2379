"""How many iterations does our solver need on the pipeline's images, at best?

``pipeline.py`` times our stop rules against the reference pipeline. This script asks what any
stop rule could buy: for each image of the same test set (the same work folder and options), the
first iteration at which our iterate's lasso objective is at or below the reference's own solution
(its FISTA at step 0.025 to its batch-wide stop), checked every ``--every`` iterations, for each
solver variant:

* ``fixed``: step 1/L with restart (the change rule's solver);
* ``growth``: the growing step (γ = 1.02) on top;
* ``path``: the certified default's levers, growing step and λ path (η = 0.2).

No stop rule fires before the objective is reached (tol 1e-30); the counts (to within
``--every``) are a floor for any rule that must end every image at or below its reference
objective. The pipeline's bar is on the *mean* objective, which a rule can also meet by stopping
easy images early and hard ones late: ``mean_criterion`` is the fewest iterations, summed over
images, at which the mean is met, each image stopping at one of the checks. Beside them, the
per-sample change rule at ``--change-tol`` is run as ``pipeline.py --stop change`` runs it. The
sample-iteration totals give the iteration factor the pipeline's ratio is built from (the
reference runs each batch to its slowest sample's count)::

    OMP_NUM_THREADS=1 XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \\
        python benchmarks/pipeline_oracle.py --work /work/pipeline_work \\
        --out benchmarks/results/pipeline_oracle_cpu.json
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from flipad_jax.lasso import GAP_EVERY

from pipeline import LAM, check_sizes, layer, objective64, parser, work_folder, write_record
from reference_fista import reference_fista

VARIANTS = {"fixed": dict(stop="change"), "growth": dict(stop="change", step_growth=1.02),
            "path": dict(stop="gap")}  # "path": the gap rule's defaults, growth and the λ path


def iterations_to_reach(head, o, target, variant: str, every: int, max_iter: int):
    """Per sample, the first multiple of ``every`` at which the objective is ≤ ``target``
    (−1: not within ``max_iter``), and the objectives ``(checks, B)`` at every check up to the
    one where the last sample reached it."""
    from flipad_jax import lasso

    opts = lasso.LassoOptions(**VARIANTS[variant])
    op, ref = head.op, layer(head, "cpu")
    anchor = jnp.asarray(head.zbar)[None]
    r = op.out_to_internal(jnp.asarray(o) - op.affine(anchor))
    lam = jnp.full((len(o),), LAM, r.dtype)
    step = 1.0 / (opts.lipschitz_margin * float(head.lipschitz))
    static = dict(restart=opts.restart, stop=opts.stop, continuation=opts.continuation,
                  step_growth=opts.step_growth)
    start = op.to_internal(jnp.zeros((len(o),) + op.in_shape, r.dtype))  # z = z̄, as ours
    state = lasso._start_jit(op, r, lam, start, step, continuation=opts.continuation)
    reached, history = np.full(len(o), -1), []
    k = 0
    while k + every <= max_iter and (reached < 0).any():
        k += every
        state = lasso._iterate_jit(op, r, lam, state, step, 1e-30, k, **static)
        history.append(objective64(ref, o, np.asarray(op.from_internal(state.delta) + anchor)))
        reached[(reached < 0) & (history[-1] <= target)] = k
    return reached, np.array(history)


def mean_criterion(history: np.ndarray, target: float, every: int):
    """The fewest iterations, summed over samples, at which the *mean* objective is ≤ ``target``
    (the pipeline's bar), each sample stopping at one of the checks of ``history``; found by a
    Lagrangian sweep (each sample stops where objective + μ·iterations is least), so an upper
    bound on that minimum. Returns (per-sample iterations, mean objective) or None."""
    iterations = every * np.arange(1, len(history) + 1)
    best = None
    for mu in np.logspace(-8, 1, 1000):
        stop = np.argmin(history + mu * iterations[:, None], axis=0)
        mean = history[stop, np.arange(history.shape[1])].mean()
        if mean <= target and (best is None or iterations[stop].sum() < best[0].sum()):
            best = (iterations[stop], float(mean))
    return best


def run(args) -> dict:
    from flipad_jax.head import Head
    from flipad_jax.images import list_images, read_images
    from flipad_jax.lasso import LassoOptions

    work = work_folder(args)
    head = Head.load(work / "bundle")
    refs = list_images(work / "test/g") + list_images(work / "test/real")
    x = read_images(refs, head.output_range)
    o = np.asarray(head.target(x))
    ref = layer(head, args.device)
    batches = [slice(i, i + args.batch) for i in range(0, len(o), args.batch)]

    z_ref, ref_iters = [], []
    for b in batches:
        z, n = reference_fista("conv_transpose2d", ref.weight, ref.bias,
                               torch.from_numpy(o[b]).to(args.device), ref.zbar, lr=0.025,
                               alpha=LAM, max_iter=args.ref_max_iter, tol=1e-5, **ref.geometry)
        z_ref.append(z.cpu().numpy())
        ref_iters.append(n)
    target = objective64(ref, o, np.concatenate(z_ref))
    reference_total = sum(n * (b.stop - b.start) for n, b in zip(ref_iters, batches))

    record = {"reference": {"iterations_per_batch": ref_iters, "objective_mean": float(target.mean()),
                            "sample_iterations": reference_total},
              "oracle": {}, "every": args.every}
    for variant in args.variants.split(","):
        start = time.perf_counter()
        reached, history = iterations_to_reach(head, o, target, variant, args.every,
                                               args.max_iter)
        everyone = bool((reached > 0).all())  # else the counts below would understate it
        pooled = mean_criterion(history, float(target.mean()), args.every) if everyone else None
        record["oracle"][variant] = {
            "per_sample": reached.tolist(), "all_reached": everyone,
            "mean": float(reached.mean()) if everyone else None,
            "max": int(reached.max()) if everyone else None,
            "iteration_factor": reference_total / float(reached.sum()) if everyone else None,
            "mean_criterion": None if pooled is None else {
                "per_sample": pooled[0].tolist(), "mean": float(pooled[0].mean()),
                "objective_mean": pooled[1],
                "iteration_factor": reference_total / float(pooled[0].sum())},
            "seconds": round(time.perf_counter() - start, 1)}
        print(variant, record["oracle"][variant]["mean"], flush=True)

    options = LassoOptions(stop="change", tol=args.change_tol)
    solved = [head.invert_batches(x[b], LAM, batch_size=args.batch, options=options).lasso
              for b in batches]
    iterations = np.concatenate([np.asarray(s.iterations) for s in solved])
    objective = objective64(ref, o, np.concatenate([np.asarray(s.z) for s in solved]))
    record["change_rule"] = {"tol": args.change_tol, "per_sample": iterations.tolist(),
                             "mean": float(iterations.mean()),
                             "objective_mean": float(objective.mean()),
                             "samples_at_or_below_target": int((objective <= target).sum()),
                             "iteration_factor": reference_total / float(iterations.sum())}
    record["command"] = "python benchmarks/pipeline_oracle.py " + " ".join(args.argv)
    record["device"] = f"jax {jax.__version__} on {jax.devices()[0].device_kind}, torch on " \
                       f"{args.device}"
    return record


def main(argv=None):
    import sys

    p = parser(__doc__.split("\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"a subset of {list(VARIANTS)}")
    p.add_argument("--every", type=int, default=24,
                   help=f"iterations between objective checks, a multiple of {GAP_EVERY} (the "
                        "gap rule's schedule, which a segment's end would otherwise shift)")
    p.add_argument("--max-iter", type=int, default=8000, help="give up on a variant after this")
    p.add_argument("--change-tol", type=float, default=1e-4, help="the change rule run beside")
    args = p.parse_args(argv)
    check_sizes(args)
    if args.every <= 0 or args.every % GAP_EVERY:
        p.error(f"--every {args.every}: expected a positive multiple of {GAP_EVERY}")
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        p.error(f"--variants {args.variants}: {sorted(unknown)} not in {list(VARIANTS)}")
    args.argv = sys.argv[1:] if argv is None else list(argv)
    return write_record(run(args), args.out)


if __name__ == "__main__":
    main()
