"""Is one SDV fit representative? The tabular demo's detectors against refitted CTGAN / CopulaGAN.

The paper's Table 5 is a mean over five runs, and the authors' ``train_sdv_models.py`` fits every
SDV model once per run; the shipped samples (``converters/demo_weights/tabular``) are one fit,
seed 0. This script refits the ``--models`` on the same whitened training rows with each of
``--seeds`` (SDV defaults but 500 epochs, one torch thread, as the shipped fit), draws 10 000 test
rows of each, and scores them with the tabular demo's FLIPAD and RawPAD detectors. The detectors
are fitted once, by :func:`converters.tabular_demo.run_tabular_demo` under ``--work`` (KL-WGAN
against the shipped TVAE's training rows, ``--epochs`` DeepSAD epochs, the paper's row counts),
so the spread over seeds is that of the other generator's fit alone; seed 0 is the shipped rows.

Each fit is kept under ``--work`` and reused; ``--fit-only`` stops after the fits, so two
processes can fit different seeds side by side before one scores them all::

    python benchmarks/tabular_sdv_seeds.py --dataset redwine --seeds 1,2,3,4 --epochs 20 \\
        --work /tmp/tab_seeds --out benchmarks/results/tabular/sdv_seeds_redwine.json
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from converters.tabular_demo import (FULL, G, TRAIN_OTHER, _g_rows, _head, _one_torch_thread,
                                     load_detector, run_tabular_demo, takes_rows)
from converters.tabular_gans import (OUT_DIR, SDV_MODELS, SDV_SETTINGS, klwgan_weights,
                                     read_sdv_samples, sdv_samples_file, train_sdv)
from flipad_jax import metrics, report
from flipad_jax._files import atomic_file
from flipad_jax.tabular import wine_splits

FNR = 0.005


def refit_rows(work: Path, dataset: str, model: str, seed: int, n: int) -> tuple[np.ndarray, dict]:
    """``n`` test rows of ``model`` fitted with ``seed`` (cached in ``work/sdv``), its record."""
    # named by the model's SDV settings too, so fits under other settings are not reused
    settings = "".join(f"_{k}-{v}" for k, v in sorted(SDV_SETTINGS.get(model, {}).items()))
    path = work / "sdv" / f"{dataset}_{model}{settings}_seed{seed}.npy"
    record_path = path.with_suffix(".json")
    if not path.exists():
        with _one_torch_thread():
            rows, record = train_sdv(wine_splits(dataset).train, model, seed=seed,
                                     samples={"test": n})
        path.parent.mkdir(parents=True, exist_ok=True)
        report.write_json(record_path, record)
        with atomic_file(path, suffix=".npy") as tmp:
            np.save(tmp, rows["test"])
    return np.load(path, allow_pickle=False), json.loads(record_path.read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", choices=("redwine", "whitewine"), default="redwine")
    p.add_argument("--models", default="ctgan,copulagan", help=f"a subset of {SDV_MODELS}")
    p.add_argument("--seeds", default="1,2,3,4", help="SDV fit seeds besides the shipped 0")
    p.add_argument("--epochs", type=int, default=20, help="DeepSAD epochs of the detectors")
    p.add_argument("--fit-only", action="store_true", help="fit the SDV models, score nothing")
    p.add_argument("--work", required=True)
    p.add_argument("--out", help="JSON file (required unless --fit-only)")
    args = p.parse_args(argv)
    models = args.models.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    if not set(models) <= set(SDV_MODELS) or 0 in seeds:
        p.error(f"--models {args.models} --seeds {args.seeds}: expected models of {SDV_MODELS} "
                "and seeds other than 0 (the shipped fit)")
    if not args.fit_only and not args.out:
        p.error("--out is required unless --fit-only")
    torch.set_num_threads(1)
    work = Path(args.work)
    settings = FULL._replace(epochs=args.epochs, sminv_rows=0, datasets=(args.dataset,))
    fits = {}
    for seed in seeds:
        for model in models:
            start = time.perf_counter()
            fits[f"{model}_seed{seed}"] = refit_rows(work, args.dataset, model, seed,
                                                     settings.n_test)
            print(f"[{time.strftime('%H:%M:%S')}] {model} seed {seed}: "
                  f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    if args.fit_only:
        return 0

    demo = run_tabular_demo(work / "demo", settings=settings, progress=False)
    demo_work = work / "demo" / "work"
    weights = klwgan_weights(OUT_DIR, args.dataset)
    head = _head(weights, demo_work, args.dataset, settings)
    g_test = _g_rows(weights, demo_work, args.dataset, "test", settings.n_test)
    shipped = read_sdv_samples(sdv_samples_file(OUT_DIR, args.dataset))
    methods = {}
    for method in ("flipad", "rawpad"):
        det = load_detector(demo_work, method, args.dataset, head, progress=False)
        rows = takes_rows(method)
        score_g = det.anomaly_score(g_test, precomputed=rows)
        per_model = {}
        for model in models:
            sets = {0: shipped[f"{model}_test"][:settings.n_test],
                    **{s: fits[f"{model}_seed{s}"][0] for s in seeds}}
            recs = metrics.evaluate(score_g, {s: det.anomaly_score(x, precomputed=rows)
                                              for s, x in sets.items()},
                                    {FNR: det.thresholds_[FNR]})  # one record per seed, in order
            acc = [r[f"acc@fnr={FNR:g}"] for r in recs]
            auc = [r["auc"] for r in recs]
            per_model[model] = {"seeds": list(sets), "accuracy": acc, "auc": auc,
                                "accuracy_mean_std": [float(np.mean(acc)),
                                                      float(np.std(acc, ddof=1))],
                                "auc_mean_std": [float(np.mean(auc)), float(np.std(auc, ddof=1))]}
            print(f"{method} vs {model}: accuracy " + " ".join(f"{100 * a:.2f}" for a in acc)
                  + f" (mean {100 * np.mean(acc):.2f})", file=sys.stderr, flush=True)
        methods[method] = per_model
    report.write_json(args.out, {
        "dataset": args.dataset, "fnr": FNR, "methods": methods,
        "detectors": {"generator": f"{G}_{args.dataset}", "negative_class": f"{TRAIN_OTHER} "
                      "(shipped, seed 0)", "settings": settings._asdict(),
                      "demo_methods": demo["methods"]},
        "fits": {k: v[1] for k, v in fits.items()},
        "command": "python benchmarks/tabular_sdv_seeds.py " + " ".join(argv or sys.argv[1:])})
    return 0


if __name__ == "__main__":
    sys.exit(main())
