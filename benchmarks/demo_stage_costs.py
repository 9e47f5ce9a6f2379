"""Stage costs of ``flipad demo`` and the paper-scale estimate built from them.

Measures, from a demo run's ``work`` folder (bundles and PNG validation samples):

- per G, final-layer inversion per 1000 images with the demo's solver (50 iterations, tol 1e-2)
  and with ``--converged`` (certified gap 1e-3), with the iterations the converged solve needs;
- one DeepSAD epoch per 1000 training samples (compilation excluded: the second epoch), for the
  demo's and the authors' (paper-scale) widths, on FLIPAD-shaped and pixel-shaped inputs (random
  values: the cost does not depend on them).

and prints the estimate of ``flipad demo --paper-scale`` (4 Gs × 3 DeepSAD methods; SM-F and
sampling are seconds): per G, inversion of 2·n_train + n_val fit images and 7 (DCGAN: 8) test
sets of n_test, and 50 epochs over 2·n_train samples per method.

    python benchmarks/demo_stage_costs.py --work /tmp/demo_yours/work \
        --out benchmarks/results/demo/stage_costs_cpu.json
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from converters.demo import (CONVERGED, FAMILIES, FULL, NETWORK_WIDTHS, PAPER, PAPER_WIDTHS,
                             _bundles, _samples, solver_options)
from flipad_jax.deepsad import DeepSADConfig, fit_deepsad
from flipad_jax.lasso import LassoOptions


def inversion_seconds(head, images, options: LassoOptions) -> tuple:
    """Seconds per 1000 images and the iterations each image ran (warm: call once before, the
    compiled solve depends on the batch shape, not on tol or max_iter)."""
    start = time.perf_counter()
    result = head.invert_batches(images, lam=FULL.lam, options=options)
    seconds = time.perf_counter() - start
    return 1000 * seconds / len(images), np.asarray(result.iterations)


def epoch_seconds(shape, widths, rep_dim, n: int) -> float:
    """Seconds per 1000 samples of the second DeepSAD epoch over n samples of ``shape``."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, *shape)).astype(np.float32)
    y = np.r_[np.ones(n // 2, np.int32), -np.ones(n - n // 2, np.int32)]
    config = DeepSADConfig(network_kwargs=dict(widths=widths, rep_dim=rep_dim), epochs=2,
                           lr_milestones=(1, 2))
    log = fit_deepsad(x, y, config, progress=False).log
    return 1000 * float(log.seconds[1]) / n


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", required=True, help="a demo run's work folder (bundles, samples)")
    p.add_argument("--n-invert", type=int, default=100, help="images inverted per G and solver")
    p.add_argument("--n-epoch", type=int, default=1000, help="samples per timed DeepSAD epoch")
    p.add_argument("--out", help="JSON file")
    args = p.parse_args()

    from converters.demo_gans import WEIGHTS_DIR

    work = Path(args.work)
    heads = _bundles(WEIGHTS_DIR, work, FULL, FAMILIES, False)
    demo = solver_options(FULL)
    inversion, iterations = {}, {}
    for g, head in heads.items():
        images = _samples(WEIGHTS_DIR, work, g, "val", args.n_invert, head.output_range, 0)
        images = images[:args.n_invert]
        inversion_seconds(head, images, demo)  # compiles
        demo_s, _ = inversion_seconds(head, images, demo)
        conv_s, iters = inversion_seconds(head, images, solver_options(FULL._replace(**CONVERGED)))
        inversion[g] = {"demo": demo_s, "converged": conv_s}
        iterations[g] = {"median": float(np.median(iters)), "max": int(iters.max())}

    head = heads[FAMILIES[0]]
    flipad_shape = (head.in_shape[0], FULL.pool_to, FULL.pool_to)
    epochs = {f"{name} {kind}": epoch_seconds(shape, widths[kind], rep, args.n_epoch)
              for name, widths, rep in (("demo", NETWORK_WIDTHS, FULL.rep_dim),
                                        ("paper", PAPER_WIDTHS, PAPER.rep_dim))
              for kind, shape in (("flipad", flipad_shape), ("raw", (1, 32, 32)))}

    n_tr, n_val, n_test = PAPER.n_train, PAPER.n_val, PAPER.n_test

    def inverted_s(solver):  # per G its fit sets and 7 test sets (DCGAN also its twin's)
        return sum(inversion[g][solver] * (2 * n_tr + n_val + (8 if g == "dcgan" else 7) * n_test)
                   for g in FAMILIES) / 1000

    deepsad = 4 * PAPER.epochs * 2 * n_tr / 1000  # per-1000 epochs in the run, per method
    estimate = {
        "flipad inversion (demo solver)": inverted_s("demo"),
        "flipad inversion (--converged)": inverted_s("converged"),
        "deepsad flipad (paper widths)": deepsad * epochs["paper flipad"],
        "deepsad rawpad + dctpad (paper widths)": 2 * deepsad * epochs["paper raw"],
        "deepsad flipad (demo widths)": deepsad * epochs["demo flipad"],
        "deepsad rawpad + dctpad (demo widths)": 2 * deepsad * epochs["demo raw"],
    }
    paper = [k for k in estimate if "paper widths" in k]
    results = {
        "device": f"CPU, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}",
        "command": " ".join(["python"] + sys.argv),
        "n_invert": len(images), "inversion_s_per_1000": inversion,
        "converged_iterations": iterations,
        "deepsad_epoch_s_per_1000": epochs,
        "paper_scale_estimate_s": estimate,
        "paper_scale_total_s": {
            solver: estimate[f"flipad inversion ({solver})"] + sum(estimate[k] for k in paper)
            for solver in ("demo solver", "--converged")},
    }
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
