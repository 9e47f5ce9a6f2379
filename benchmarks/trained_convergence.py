"""How fast FISTA converges on a trained head, and how loose its certificate is there.

On random N(0, 0.02) weights the certified default stops within ~2000 iterations; on the shipped
demo GANs' trained heads it does not certify within 10 000 (``benchmarks/README.md``). This
script separates the two possible causes on one trained head, in float64 on the CPU:

* the **true** relative suboptimality (P(z_k) − P*)/P* after k iterations of our default
  solver (step 1/L, restarts), P* from a 40 000-iteration solve of the same samples, against
  the **certified** one, gap(z_k)/P(z_k), and the support size of z_k against the number of
  rows of A (the lasso has a solution with at most that many nonzeros);
* **dual extrapolation** (celer's rule, Massias, Gramfort & Salmon 2018): at each checkpoint k
  the residuals ρ = o − Az − b of the iterates k − 50, k − 40, …, k (the real solver's, capped
  there) are combined as c = (UᵀU)⁻¹1 / 1ᵀ(UᵀU)⁻¹1 over their K = 5 differences U; the
  combination is scaled to be dual feasible (by the best feasible factor), and the relative gap
  against the best of it and the six plain dual points is recorded beside the plain one;
* **continuation** (``LassoOptions(continuation=η)``: a warm-started path of λ from λ_max/2
  down to λ by factors η), a standard lever for small λ: the iterations to reach a true
  suboptimality of 1e-3 with and without it (the cap at which the solve's result first gets
  there, on a grid of ratio 1.25).

Targets are σ⁻¹ of G's own 8-bit samples, as ``benchmarks/solver.py --bundle`` takes them.
``--random`` instead counts the iterations the certified default (float32, relative gap 1e-3)
needs with and without continuation on ``solver.py``'s random-weight DCGAN and LSGAN layers.

    python benchmarks/trained_convergence.py --bundle W/bundles/dcgan --images W/samples/dcgan/val \
        --out benchmarks/results/trained_convergence_dcgan.json
    python benchmarks/trained_convergence.py --random --out benchmarks/results/trained_convergence_random.json
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import flipad_jax as fj  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from solver import LAM, head_problem, make_problem  # noqa: E402

CHECKPOINTS = (300, 1000, 3000, 10000)
EXTRAPOLATION_K, EXTRAPOLATION_EVERY = 5, 10  # celer's defaults
REFERENCE_ITERS = 40000
TARGET = 1e-3


def float64_problem(bundle, images, batch):
    p = head_problem(bundle, images, batch)
    op = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64)
                      if isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jnp.floating)
                      else a, p["op"])
    return op, jnp.asarray(p["o"], jnp.float64), jnp.asarray(p["zbar"], jnp.float64)


def solve(op, o, zbar, iters, lipschitz, continuation=None):
    """Our solver capped at ``iters`` (a gap tolerance it never meets, so the cap decides)."""
    options = fj.LassoOptions(max_iter=iters, tol=1e-12, continuation=continuation)
    return fj.solve_lasso(op, o, LAM, anchor=zbar, options=options, lipschitz=lipschitz)


def dual_value(op, target, lam, rho):
    """D(αρ) = ⟨t, αρ⟩ − ½α²‖ρ‖² (t = ``target`` = o − A z̄ − b) at the best α with
    ‖Aᵀ αρ‖∞ ≤ λ, per sample: the dual objective of the scaled residual ρ (B, *out_shape)."""
    axes = tuple(range(1, rho.ndim))
    alpha_max = lam / jnp.max(jnp.abs(op.T(rho)), axis=tuple(range(1, len(op.in_shape) + 1)))
    correlation, norm_sq = jnp.sum(target * rho, axis=axes), jnp.sum(rho * rho, axis=axes)
    alpha = jnp.clip(correlation / norm_sq, 0, alpha_max)
    return alpha * correlation - 0.5 * alpha ** 2 * norm_sq


def extrapolated_gap(op, o, zbar, k, lipschitz, result):
    """Relative gaps at ``result`` (the solve capped at k) from the plain dual points of iterates
    k − K·f … k (best of them) and from celer's extrapolation of their residuals (best of all),
    per sample."""
    target = o - op.affine(zbar[None])
    earlier = [solve(op, o, zbar, j, lipschitz).z for j in range(
        k - EXTRAPOLATION_K * EXTRAPOLATION_EVERY, k, EXTRAPOLATION_EVERY)]
    residuals = [o - op.affine(z) for z in earlier + [result.z]]
    plain = np.max([np.asarray(dual_value(op, target, LAM, r)) for r in residuals], axis=0)
    flat = np.stack([np.asarray(r).reshape(len(o), -1) for r in residuals], axis=1)
    combined = []
    for history in flat:  # per sample: (K + 1, rows)
        u = np.diff(history, axis=0)
        weights = np.linalg.solve(u @ u.T, np.ones(len(u)))
        combined.append((weights / weights.sum()) @ history[1:])
    extrapolated = np.asarray(dual_value(op, target, LAM, jnp.asarray(
        np.reshape(combined, o.shape))))
    objective = np.asarray(result.objective)
    best = np.maximum(plain, extrapolated)
    return (objective - plain) / objective, (objective - best) / objective


def iterations_to(op, o, zbar, lipschitz, p_star, continuation=None, start=100):
    """Fewest iterations k on a grid {start, 1.25·start, …} with max suboptimality ≤ TARGET
    (so a count is at most 25% above the exact one)."""
    k = start
    while k <= REFERENCE_ITERS:
        res = solve(op, o, zbar, k, lipschitz, continuation)
        worst = float(np.max((np.asarray(res.objective) - p_star) / p_star))
        if worst <= TARGET:
            return k, worst
        k = int(round(k * 1.25))
    return None, worst


def certify_random(etas, batch):
    """Iterations of the certified default on the random layers, per continuation factor."""
    rows = []
    for name in ("dcgan", "lsgan"):
        p = make_problem(name, batch)
        lipschitz = p["op"].lipschitz()
        for eta in (None, *etas):
            res = fj.solve_lasso(p["op"], p["o"], LAM, anchor=p["zbar"], lipschitz=lipschitz,
                                 options=fj.LassoOptions(max_iter=20000, continuation=eta))
            rows.append(dict(layer=name, eta=eta, iterations_max=int(res.iterations.max()),
                             iterations_mean=float(res.iterations.mean()),
                             converged=int(res.converged.sum())))
            print(f"  random {name}, η {eta}: {rows[-1]['iterations_max']} iterations (max), "
                  f"{rows[-1]['converged']}/{batch} certified")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", help="a head bundle (flipad convert)")
    parser.add_argument("--images", help="G's own samples, as flipad reads them")
    parser.add_argument("--random", action="store_true",
                        help="the random-weight layers' certified solve instead")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--etas", default="0.5,0.2,0.1", help="continuation factors")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    etas = [float(e) for e in args.etas.split(",")]
    if args.random:
        record = dict(random=certify_random(etas, args.batch), batch=args.batch, lam=LAM,
                      command=" ".join(["python"] + sys.argv))
        if args.out:
            args.out.write_text(json.dumps(record, indent=1) + "\n")
        return
    if not (args.bundle and args.images):
        parser.error("--bundle and --images are required (or --random)")

    op, o, zbar = float64_problem(args.bundle, args.images, args.batch)
    lipschitz = op.lipschitz()
    rows = int(np.prod(op.out_shape))
    t0 = time.perf_counter()
    reference = solve(op, o, zbar, REFERENCE_ITERS, lipschitz)
    p_star = np.asarray(reference.objective)
    print(f"{args.bundle}: L = {lipschitz:.4g}, rows of A {rows}, P* from {REFERENCE_ITERS} "
          f"iterations (its own relative gap: median {np.median(reference.gap / p_star):.1e})")

    def support(z):
        return int(np.median(np.sum(np.asarray(z - zbar) != 0, axis=(1, 2, 3))))

    checkpoints = []
    for k in CHECKPOINTS:
        res = solve(op, o, zbar, k, lipschitz)
        true = (np.asarray(res.objective) - p_star) / p_star
        cert = np.asarray(res.gap / res.objective)
        best_plain, extrapolated = extrapolated_gap(op, o, zbar, k, lipschitz, res)
        checkpoints.append(dict(iterations=k, true_rel_subopt_median=float(np.median(true)),
                                true_rel_subopt_max=float(np.max(true)),
                                certified_rel_gap_median=float(np.median(cert)),
                                best_plain_rel_gap_median=float(np.median(best_plain)),
                                extrapolated_rel_gap_median=float(np.median(extrapolated)),
                                support_median=support(res.z)))
        print(f"  {k:>6} it.: true {np.median(true):.2e} (max {np.max(true):.2e}), certified "
              f"{np.median(cert):.2e} (best of 6 plain {np.median(best_plain):.2e}, "
              f"extrapolated {np.median(extrapolated):.2e}), support {support(res.z)} of "
              f"{res.z[0].size}")

    plain_k, plain_worst = iterations_to(op, o, zbar, lipschitz, p_star)
    print(f"  plain: {plain_k} iterations to a true suboptimality ≤ {TARGET:g} (max {plain_worst:.1e})")
    continuation = []
    for eta in etas:
        k, worst = iterations_to(op, o, zbar, lipschitz, p_star, continuation=eta)
        continuation.append(dict(eta=eta, iterations=k, worst=worst))
        print(f"  continuation η {eta}: {k} iterations (max {worst:.1e})")
    record = dict(bundle=str(args.bundle), images=str(args.images), batch=args.batch, lam=LAM,
                  lipschitz=lipschitz, rows=rows, dtype="float64", reference_iterations=REFERENCE_ITERS,
                  checkpoints=checkpoints, target=TARGET, plain_iterations=plain_k,
                  continuation=continuation, seconds=time.perf_counter() - t0,
                  device=f"{jax.devices()[0].platform} ({platform.processor() or platform.machine()})",
                  command=" ".join(["python"] + sys.argv))
    if args.out:
        args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
