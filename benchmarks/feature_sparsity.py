"""How sparse and how converged FLIPAD's features are, per iteration cap, on the demo's heads.

For each G, inverts G's own validation images (PNG, from a demo run's ``work`` folder) with the
demo's solver settings (λ 5e-4, gap rule at tol 1e-2) capped at each of ``--caps`` iterations
and reports the fraction of exact zeros of z − z̄, the mean objective and the mean certified
relative gap. ``--compare FILE`` also runs a second copy of ``flipad_jax/lasso.py`` (e.g. an
older commit's, from ``git show COMMIT:flipad_jax/lasso.py > FILE``) on the same problems.

    python benchmarks/feature_sparsity.py --work /tmp/demo/work --compare /tmp/lasso_c23a883.py \
        --out benchmarks/results/demo/feature_sparsity_cpu.json
"""

import argparse
import importlib.util
import sys

import numpy as np

from flipad_jax import lasso
from flipad_jax.head import Head
from flipad_jax.images import load_images
from flipad_jax.report import write_json


def load_solver(path):
    spec = importlib.util.spec_from_file_location("lasso_compared", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def measure(solver, head, o, caps) -> dict:
    rows = {}
    # the demo's fixed step without a λ path, in a module whose certified default has both
    demo = dict(step_growth=None, continuation=None) if hasattr(solver, "STOP_RULE_DEFAULTS") \
        else {}
    for cap in caps:
        res = solver.solve_lasso(head.op, o, 5e-4, anchor=head.zbar, tol=1e-2, max_iter=cap,
                                 **demo)
        delta = np.asarray(res.z) - np.asarray(head.zbar)[None]
        rows[str(cap)] = {"zero_fraction": float(np.mean(delta == 0)),
                          "objective_mean": float(np.mean(res.objective)),
                          "relative_gap_mean": float(np.mean(res.gap / res.objective)),
                          "certified": int(np.sum(np.asarray(res.converged)))}
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", required=True, help="a demo run's work folder (bundles, samples)")
    p.add_argument("--models", default="dcgan,lsgan")
    p.add_argument("--images", type=int, default=32, help="validation images per G")
    p.add_argument("--caps", default="50,1000")
    p.add_argument("--compare", help="another lasso.py to run on the same problems")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    caps = [int(c) for c in args.caps.split(",")]
    solvers = {"this": lasso}
    if args.compare:
        solvers["compared"] = load_solver(args.compare)
    result = {"command": "python " + " ".join(sys.argv), "images_per_g": args.images,
              "lam": 5e-4, "tol": 1e-2, "models": {}}
    for g in args.models.split(","):
        head = Head.load(f"{args.work}/bundles/{g}")
        x = load_images(f"{args.work}/samples/{g}/val", head.output_range)[:args.images]
        o = head.target(x)
        result["models"][g] = {name: measure(s, head, o, caps) for name, s in solvers.items()}
        print(g, result["models"][g], flush=True)
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
