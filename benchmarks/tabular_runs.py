"""The paper's protocol for Table 5: several runs, each with its own generators and detectors.

The paper's tabular numbers are means over five runs, and in the authors' code each run has its
own KL-WGAN (``train_klwgan.py``, ``save_id`` 0–4), its own fit of every SDV model
(``train_sdv_models.py``) and its own DeepSAD seed. The shipped generators are one such run
(seed 0). For each run r > 0 this script trains KL-WGAN and the three SDV models with seed r on
the same whitened training rows (:mod:`converters.tabular_gans`, 500 epochs, one torch thread)
into ``--work``/run<r>/generators, then runs the tabular demo on them with DeepSAD seed r
(:func:`converters.tabular_demo.run_tabular_demo`, the paper's row counts, ``--epochs`` DeepSAD
epochs); run 0 is the shipped generators. Everything is cached under ``--work``, so two
processes can take different runs side by side and a last call over all runs collects them::

    python benchmarks/tabular_runs.py --dataset redwine --runs 1,3 --work W &
    python benchmarks/tabular_runs.py --dataset redwine --runs 2,4 --work W
    python benchmarks/tabular_runs.py --dataset redwine --runs 0,1,2,3,4 --work W \\
        --out benchmarks/results/tabular/runs_redwine.json

The record: per run and method the accuracy at fnr 0.005 and the AUC against each G′, and per
method the mean over G′ of each run, with the mean and standard deviation over runs.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from converters.tabular_demo import FULL, run_tabular_demo
from converters.tabular_gans import (DATASETS, OUT_DIR, klwgan_weights, sdv_samples_file,
                                     train_klwgans, train_sdv_models)
from flipad_jax import report


def generators(work: Path, run: int, dataset: str, command: str) -> Path:
    """The generator folder of ``run`` (0: the shipped one), trained with seed ``run`` once."""
    if run == 0:
        return OUT_DIR
    folder = work / f"run{run}" / "generators"
    if not klwgan_weights(folder, dataset).exists():
        train_klwgans(folder, datasets=(dataset,), seed=run, progress=False, command=command)
    if not sdv_samples_file(folder, dataset).exists():
        train_sdv_models(folder, datasets=(dataset,), seed=run, command=command)
    return folder


def summary(results: dict) -> dict:
    """{method: {"per_run": [mean over G′ of acc@fnr=0.005], "mean", "sd", "per_other":
    {other: [acc per run]}}} from {run: results of run_tabular_demo}."""
    out: dict = {}
    for run, res in sorted(results.items()):
        for rec in res["pairs"]:
            m = out.setdefault(rec["method"], {"per_other": {}, "auc_per_other": {}})
            m["per_other"].setdefault(rec["other"], []).append(rec["acc@fnr=0.005"])
            m["auc_per_other"].setdefault(rec["other"], []).append(rec["auc"])
    for m in out.values():
        per_run = np.mean(list(m["per_other"].values()), axis=0)
        m.update(per_run=per_run.tolist(), mean=float(per_run.mean()),
                 sd=float(per_run.std(ddof=1)) if len(per_run) > 1 else None)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", choices=DATASETS, default="redwine")
    p.add_argument("--runs", default="0,1,2,3,4", help="comma-separated run numbers (seeds)")
    p.add_argument("--epochs", type=int, default=20, help="DeepSAD epochs (the paper: 100)")
    p.add_argument("--sminv-rows", type=int, default=0, help="SM-Inv₂ rows per set (0: none)")
    p.add_argument("--work", type=Path, required=True, help="cache folder, one subfolder a run")
    p.add_argument("--out", type=Path, help="JSON record to write")
    args = p.parse_args(argv)
    try:
        runs = [int(r) for r in args.runs.split(",")]
    except ValueError:
        p.error(f"--runs {args.runs!r}: expected comma-separated non-negative integers")
    if not runs or min(runs) < 0 or len(set(runs)) != len(runs):
        p.error(f"--runs {args.runs!r}: expected distinct non-negative integers")
    torch.set_num_threads(1)  # the KL-WGAN and SDV networks are tiny (tabular_gans)
    command = "python benchmarks/tabular_runs.py " + " ".join(sys.argv[1:] if argv is None
                                                             else argv)
    settings = FULL._replace(epochs=args.epochs, sminv_rows=args.sminv_rows,
                             datasets=(args.dataset,))
    results, seconds = {}, {}
    for run in runs:
        start = time.perf_counter()
        folder = generators(args.work, run, args.dataset, command)
        results[run] = run_tabular_demo(args.work / f"run{run}" / "demo", progress=False,
                                        settings=settings._replace(seed=run),
                                        generators=None if run == 0 else folder)
        seconds[run] = round(time.perf_counter() - start, 1)
        print(f"run {run}: {seconds[run]} s", {m: round(v["accuracy"], 4) for m, v in
                                                results[run]["methods"].items()}, flush=True)
    record = {"dataset": args.dataset, "runs": runs, "settings": settings._asdict(),
              "methods": summary(results), "command": command,
              "seconds_this_call": seconds}  # a cached run costs its scoring only
    text = json.dumps(record, indent=2) + "\n"
    if args.out:
        report.write_text(args.out, text)
    print(text)
    return record


if __name__ == "__main__":
    main()
