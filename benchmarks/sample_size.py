"""The sample-size curve (the paper's Table 12): ``flipad demo`` at several n_tr, one JSON.

Runs the demo once per training size (n_val = n_test fixed), each into its own folder under
``--work`` so an interrupted curve resumes stage by stage, and after each size rewrites ``--out``
(atomically) with every size finished so far:

    {"runs": [{"n_train": 10000, "methods": {"flipad": {"accuracy": …, "auc": …}, …},
               "per_g": {"flipad": {"dcgan": {"accuracy": …, "auc": …}, …}, …},
               "table2": {…}, "wall_s": …, "device": "…", "command": "…"}, …],
     "paper_table12": {…}}

Accuracies are fractions at fnr 0.005, means over the 16 (G, G′) pairs of Table 1; ``per_g``
averages over each G's four G′. Every size draws its real training images from the same split
(``--real-train``, default ``train``: 10 000 + 1000 real images do not fit in the test split).
``--seeds`` repeats each size with other run seeds (``flipad demo --seed``: G's latents, the real
images drawn, DeepSAD's initialisation and batches); runs of ``--out`` at other (size, seed)
pairs are kept, and ``"spread"`` gives, for each group of runs whose settings differ only in the
seed, each method's mean and standard deviation (ddof 1).

    python benchmarks/sample_size.py --sizes 1000,5000,10000 --work /tmp/curve \
        --out benchmarks/results/demo/sample_size.json
    python benchmarks/sample_size.py --sizes 1000 --seeds 1,2 --work /tmp/curve \
        --out benchmarks/results/demo/sample_size.json

``--weights W`` runs the curve on another folder of the five demo generators (e.g. one that
``python -m converters.demo_gans --out W --epochs 20`` trained). Each run records the folder
(``"shipped"`` for the default) and the generators' training recipes from its ``training.json``,
so runs on other weights, the shipped set of an earlier commit included, are kept apart, also in
``"spread"``.
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np

from converters.demo import FULL, PAPER, PAPER_TABLE12, REAL_TRAIN_SPLITS, run_demo
from converters.demo_gans import RECORD_FILE, WEIGHTS_DIR
from flipad_jax import report


def per_g(pairs: list, fnr: float = 0.005) -> dict:
    """``{method: {G: {"accuracy", "auc"}}}``: means over each G's G′ (fractions)."""
    key = f"acc@fnr={fnr:g}"
    out: dict = {}
    for rec in pairs:
        cell = out.setdefault(rec["method"], {}).setdefault(rec["model"], {"a": [], "u": []})
        cell["a"].append(float(rec[key]))
        cell["u"].append(float(rec["auc"]))
    return {m: {g: {"accuracy": float(np.mean(c["a"])), "auc": float(np.mean(c["u"]))}
                for g, c in gs.items()} for m, gs in out.items()}


def spread(runs: list) -> list:
    """Per group of runs whose settings differ only in the seed, when it has more than one:
    ``{"n_train", "settings", "seeds", "methods": {method: {"accuracy": [mean, std], "auc":
    [mean, std]}}}`` (std with ddof 1)."""
    groups: dict = {}
    for r in runs:
        # SM-Inv₂'s fields are not settings of a run that did not run it (older runs omit them)
        rest = {k: v for k, v in r["settings"].items() if k != "seed" and not (
            k.startswith("sminv_") and not r["settings"].get("sminv_n_test"))}
        rest["weights"] = r["weights"]
        groups.setdefault(json.dumps(rest, sort_keys=True), []).append(r)
    out = []
    for rest, same in groups.items():
        if len(same) < 2:
            continue
        out.append({"n_train": same[0]["n_train"], "settings": json.loads(rest),
                    "seeds": [r["settings"]["seed"] for r in same],
                    "methods": {m: {k: [float(np.mean(v)), float(np.std(v, ddof=1))] for k, v in (
                        (k, [r["methods"][m][k] for r in same]) for k in ("accuracy", "auc"))}
                        for m in same[0]["methods"]}})
    return out


SHIPPED = "shipped"  # the folder of runs on the shipped generators


def recipes(weights) -> dict:
    """``{"folder", "recipes": {G: {"seed", "epochs", "init", "adam_betas"}}}`` from the
    training.json of ``weights`` (None: the shipped generators, folder :data:`SHIPPED`). The
    recipes set runs on one set of weights apart from runs on another, the shipped set of an
    earlier commit included."""
    folder = WEIGHTS_DIR if weights is None else Path(weights)
    record = json.loads((folder / RECORD_FILE).read_text())["models"]
    return {"folder": SHIPPED if weights is None else str(weights), "recipes": {
        g: {k: m.get(k) for k in ("seed", "epochs", "init", "adam_betas")}
        for g, m in record.items()}}


def device_name() -> str:
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()})"
    return f"{dev.platform.upper()}: {dev.device_kind}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1000,5000,10000", help="comma-separated n_train values")
    p.add_argument("--n-eval", type=int, default=1000, help="n_val = n_test (default 1000)")
    p.add_argument("--widths", choices=("demo", "paper"), default="demo",
                   help="DeepSAD widths: the demo's (default) or the authors' (App. G)")
    p.add_argument("--real-train", choices=REAL_TRAIN_SPLITS, default="train")
    p.add_argument("--seeds", default="0", help="comma-separated run seeds (default 0)")
    p.add_argument("--weights", help="folder of the demo generators (default: the shipped ones)")
    p.add_argument("--work", required=True, help="folder for one demo run per size and seed")
    p.add_argument("--out", required=True, help="JSON file, rewritten after each size")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    # SM-Inv₂ is left out of the curve: at these sizes it costs far more than the rest
    base = (PAPER if args.widths == "paper" else FULL)._replace(
        n_val=args.n_eval, n_test=args.n_eval, real_train=args.real_train, sminv_n_test=0)
    weights = recipes(args.weights)
    todo = [(n, seed, weights) for n in sizes for seed in seeds]
    runs = []
    if Path(args.out).exists():  # keep the other sizes, seeds and weights recorded there
        runs = [r for r in json.loads(Path(args.out).read_text())["runs"]
                if (r["n_train"], r.get("seed", 0), r["weights"]) not in todo]
    for n, seed, _ in todo:
        settings = base._replace(n_train=n, seed=seed)
        name = (f"n{n}" if seed == 0 else f"n{n}_seed{seed}") + (
            "" if args.weights is None else "_" + Path(args.weights).name)
        folder = Path(args.work) / name
        command = (f"flipad demo --n-train {n} --n-val {args.n_eval} --n-test {args.n_eval} "
                   f"--real-train {args.real_train} --sminv-n-test 0"
                   + (f" --seed {seed}" if seed else "")
                   + (" --paper-scale" if args.widths == "paper" else "")
                   + ("" if args.weights is None else f" --weights {args.weights}")
                   + f" --out {folder}")
        print(f"[{time.strftime('%H:%M:%S')}] {command}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        # overwrite=False: a rerun with the same settings reuses the finished stages
        results = run_demo(folder, settings=settings, weights=args.weights, progress=False)
        run = {"n_train": n, "seed": seed, "methods": results["methods"],
               "per_g": per_g(results["pairs"]), "table2": results["table2"]["methods"],
               "wall_s": round(time.perf_counter() - start, 1),
               "stage_s": results["timings_s"], "peak_rss_mib": results["peak_rss_mib"],
               "settings": results["settings"], "weights": weights, "device": device_name(),
               "load_avg_1min_at_end": round(os.getloadavg()[0], 2), "command": command}
        runs.append(run)
        runs.sort(key=lambda r: (r["n_train"], r.get("seed", 0)))
        report.write_json(args.out, {"runs": runs, "spread": spread(runs), "paper_table12": {
            str(k): v for k, v in PAPER_TABLE12.items()},
            "script": "python benchmarks/sample_size.py " + " ".join(argv or sys.argv[1:])})
        flipad = results["methods"]["flipad"]
        print(f"  n={n}: FLIPAD accuracy {flipad['accuracy']:.4f}, AUC {flipad['auc']:.4f}, "
              f"{run['wall_s']} s", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
