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

* **other levers** (``--levers``): the same P*, and the true relative suboptimality after 300,
  1000, 3000 and 10 000 iterations of FISTA variants that each change one thing: per-coordinate
  steps (a diagonal majoriser of AᵀA from Gershgorin's row sums |A|ᵀ|A|1, or the columns
  equilibrated, s_j ∝ 1/‖A e_j‖² with ‖AS‖² from power iteration), the library's growing step
  (``LassoOptions(step_growth=γ)``: backtracking, γ 1.02 and 1.1), and Anderson acceleration
  (Bertrand & Massias 2021) of ISTA and of FISTA (K = 5, extrapolating every 5 and 10
  iterations, an extrapolation kept only where it lowers the objective). All cost one forward
  and one adjoint an iteration (Anderson: one forward more per extrapolation).

Targets are σ⁻¹ of G's own 8-bit samples, as ``benchmarks/solver.py --bundle`` takes them.
``--random`` instead counts the iterations the certified default (float32, relative gap 1e-3)
needs with and without continuation on ``solver.py``'s random-weight DCGAN and LSGAN layers.

    python benchmarks/trained_convergence.py --bundle W/bundles/dcgan --images W/samples/dcgan/val \
        --out benchmarks/results/trained_convergence_dcgan.json
    python benchmarks/trained_convergence.py --levers --bundle W/bundles/dcgan \
        --images W/samples/dcgan/val --out benchmarks/results/solver_levers_dcgan.json
    python benchmarks/trained_convergence.py --random --out benchmarks/results/trained_convergence_random.json
"""

import argparse
import dataclasses
import functools
import json
import platform
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from flipad_jax.lasso import _bcast, _per_sample_sum, _soft_threshold  # noqa: E402

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
    options = fj.LassoOptions(max_iter=iters, tol=1e-12, continuation=continuation,
                              step_growth=None)  # the fixed step these rows were measured at
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


def _zero_delta(op, r):
    """δ = 0 for every sample of ``r``, in the operator's internal layout."""
    return jnp.zeros((r.shape[0],) + op.to_internal(jnp.zeros((1,) + op.in_shape)).shape[1:],
                     r.dtype)


def _objective(op, r, lam, delta):
    """P = ½‖Aδ − r‖² + λ‖δ‖₁ per sample (internal layout)."""
    return 0.5 * _per_sample_sum(jnp.square(op.apply(delta) - r)) + \
        lam * _per_sample_sum(jnp.abs(delta))


@functools.partial(jax.jit, static_argnames=("iters",))
def diagonal_step_fista(op, r, lam, steps, *, iters):
    """FISTA with restarts on δ (internal layout, target ``r``) with a per-coordinate step
    ``steps`` (δ's shape), for ``iters`` iterations of one forward and one adjoint each. → δ."""
    def body(_, state):
        delta, prev, t = state
        t_next = (1 + jnp.sqrt(1 + 4 * t * t)) / 2
        y = delta + _bcast((t - 1) / t_next, delta) * (delta - prev)
        new = _soft_threshold(y - steps * op.adjoint(op.apply(y) - r), lam * steps)
        uphill = _per_sample_sum((y - new) * (new - delta)) > 0
        return new, jnp.where(_bcast(uphill, new), new, delta), jnp.where(uphill, 1.0, t_next)

    delta = _zero_delta(op, r)
    return lax.fori_loop(0, iters, body, (delta, delta, jnp.ones((r.shape[0],), r.dtype)))[0]


@functools.partial(jax.jit, static_argnames=("iters", "k", "every", "momentum"))
def anderson_variant(op, r, lam, step, *, iters, k, every, momentum):
    """ISTA (``momentum=False``) or FISTA with restarts, plus Anderson extrapolation every
    ``every`` iterations from the last ``k`` + 1 iterates: c = (UᵀU)⁻¹1/1ᵀ(UᵀU)⁻¹1 over their
    differences U, kept per sample where it lowers P (then momentum restarts). → (δ, kept)."""
    def prox_grad(y):
        return _soft_threshold(y - step * op.adjoint(op.apply(y) - r), lam * step)

    def extrapolate(args):
        new, history, t_next, kept = args
        u = history[1:] - history[:-1]
        gram = jnp.einsum("kb...,jb...->bkj", u, u)
        gram += 1e-10 * jnp.trace(gram, axis1=1, axis2=2)[:, None, None] * jnp.eye(k)
        c = jnp.linalg.solve(gram, jnp.ones(gram.shape[:2] + (1,), gram.dtype))[..., 0]
        candidate = jnp.einsum("bk,kb...->b...", c / jnp.sum(c, axis=1, keepdims=True),
                               history[1:])
        better = _objective(op, r, lam, candidate) < _objective(op, r, lam, new)
        return (jnp.where(_bcast(better, new), candidate, new), history,
                jnp.where(better, 1.0, t_next), kept + better)

    def body(i, state):
        delta, prev, t, history, kept = state
        t_next = (1 + jnp.sqrt(1 + 4 * t * t)) / 2 if momentum else t
        y = delta + _bcast((t - 1) / t_next, delta) * (delta - prev) if momentum else delta
        new = prox_grad(y)
        if momentum:
            t_next = jnp.where(_per_sample_sum((y - new) * (new - delta)) > 0, 1.0, t_next)
        history = jnp.roll(history, -1, axis=0).at[k].set(new)
        new, history, t_next, kept = lax.cond((i % every == every - 1) & (i >= k), extrapolate,
                                              lambda a: a, (new, history, t_next, kept))
        return new, jnp.where(_bcast(t_next == 1.0, new), new, delta), t_next, history, kept

    delta = _zero_delta(op, r)
    state = (delta, delta, jnp.ones((r.shape[0],), r.dtype),
             jnp.zeros((k + 1,) + delta.shape, r.dtype), jnp.zeros((r.shape[0],), jnp.int32))
    final = lax.fori_loop(0, iters, body, state)
    return final[0], final[-1]


def diagonal_steps(op, dtype):
    """Two per-coordinate steps (internal layout, shape (1, …)) with S AᵀA S ≼ I:
    Gershgorin's 1/(|A|ᵀ|A|1) and the equilibrated s_j²/‖AS‖², s_j = 1/‖A e_j‖."""
    absolute = dataclasses.replace(op, weight=jnp.abs(op.weight), bias=None)
    ones_in = op.to_internal(jnp.ones((1,) + op.in_shape, dtype))
    gershgorin = 1 / absolute.adjoint(absolute.apply(ones_in))
    squared = dataclasses.replace(op, weight=jnp.square(op.weight), bias=None)
    scale = 1 / jnp.sqrt(squared.adjoint(op.out_to_internal(jnp.ones((1,) + op.out_shape, dtype))))
    v = op.to_internal(jnp.asarray(np.random.default_rng(0).standard_normal((1,) + op.in_shape),
                                   dtype))
    for _ in range(300):  # power iteration on S AᵀA S; the margin covers its shortfall
        v = scale * op.adjoint(op.apply(scale * v))
        norm = jnp.linalg.norm(v)
        v = v / norm
    return {"gershgorin": gershgorin, "equilibrated": scale * scale / (1.05 * float(norm))}


def levers(op, o, zbar, lipschitz, p_star):
    """True relative suboptimality at each of CHECKPOINTS for each lever (module docstring)."""
    r = op.out_to_internal(o - op.affine(zbar[None]))
    step = 1 / (1.01 * lipschitz)
    diagonal = diagonal_steps(op, o.dtype)
    def library(k, **options):  # the solver itself, capped at k (a tolerance it never meets)
        res = fj.solve_lasso(op, o, LAM, anchor=zbar, lipschitz=lipschitz, max_iter=k,
                             tol=1e-12, **{"continuation": None, "step_growth": None, **options})
        return op.to_internal(res.z - zbar[None]), res.iterations

    def fixed(k, steps):
        return diagonal_step_fista(op, r, LAM, steps, iters=k), jnp.zeros(len(o))

    variants = {
        "fista (ours: step 1/L, restarts)": library,
        "diagonal step, Gershgorin": lambda k: fixed(k, diagonal["gershgorin"]),
        "diagonal step, equilibrated": lambda k: fixed(k, diagonal["equilibrated"]),
        "growing step, x1.02 (step_growth)": lambda k: library(k, step_growth=1.02),
        "growing step, x1.1 (step_growth)": lambda k: library(k, step_growth=1.1),
        "ista + anderson (K 5, every 5)": lambda k: anderson_variant(
            op, r, LAM, step, iters=k, k=5, every=5, momentum=False),
        "fista + anderson (K 5, every 10)": lambda k: anderson_variant(
            op, r, LAM, step, iters=k, k=5, every=10, momentum=True),
    }
    rows = []
    for name, run in variants.items():
        points = []
        for k in CHECKPOINTS:
            delta, _ = run(k)
            true = (np.asarray(_objective(op, r, LAM, delta)) - p_star) / p_star
            points.append(dict(iterations=k, true_rel_subopt_median=float(np.median(true)),
                               true_rel_subopt_max=float(np.max(true))))
        rows.append(dict(lever=name, checkpoints=points))
        print(f"  {name}: " + ", ".join(f"{q['iterations']} it. {q['true_rel_subopt_median']:.1e}"
                                        for q in points))
    return rows


def certify_random(etas, batch):
    """Iterations of the certified default on the random layers, per continuation factor."""
    rows = []
    for name in ("dcgan", "lsgan"):
        p = make_problem(name, batch)
        lipschitz = p["op"].lipschitz()
        for eta in (None, *etas):
            res = fj.solve_lasso(p["op"], p["o"], LAM, anchor=p["zbar"], lipschitz=lipschitz,
                                 options=fj.LassoOptions(max_iter=20000, continuation=eta,
                                                         step_growth=None))
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
    parser.add_argument("--levers", action="store_true",
                        help="compare the step and Anderson levers with FISTA instead")
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

    if args.levers:
        record = dict(bundle=str(args.bundle), images=str(args.images), batch=args.batch,
                      lam=LAM, lipschitz=lipschitz, dtype="float64",
                      reference_iterations=REFERENCE_ITERS,
                      levers=levers(op, o, zbar, lipschitz, p_star),
                      seconds=time.perf_counter() - t0,
                      device=f"{jax.devices()[0].platform} "
                             f"({platform.processor() or platform.machine()})",
                      command=" ".join(["python"] + sys.argv))
        if args.out:
            args.out.write_text(json.dumps(record, indent=1) + "\n")
        return

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
