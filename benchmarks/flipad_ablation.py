"""FLIPAD ablation on the demo's hard pairs: one detector G, one setting changed at a time.

Starts from the full demo's settings (``converters.demo.FULL``: 50 DeepSAD epochs, the demo's
widths, λ = 5e-4, at most 50 FISTA iterations at tol 1e-2, pool to 16×16) and changes one factor
per setting (:data:`SETTINGS`), plus the paper-faithful combination: the reference solver
(``LassoOptions.paper(op)``, stopped at 1000 iterations) with the authors' DeepSAD widths. Each
setting fits G's FLIPAD detector with the library's ``Detector`` on G's training samples against
real ones (thresholds on G's validation samples) and scores 1000 test images of G, real, every
other G′ and, for DCGAN, its other-seed twin. Data, bundles, detector construction and metrics
are the demo's own functions (:mod:`converters.demo`).

Everything lands under ``--out`` and a rerun resumes:

* ``work/``: the demo's bundles and PNG samples (guarded by its settings file);
* ``features/<key>/<source>_<split>.npz``: features and the lasso's per-image certificates
  (objective, duality gap, iterations, status), one folder per solver setting (λ, solver
  options, pooling), so settings that differ only in DeepSAD share one inversion;
* ``detectors/<setting>/``, ``hist_<setting>_<G>.png`` and ``settings/<setting>.json``.

``--json`` is rewritten after each setting with every setting finished so far:

    {"g": "dcgan", "settings": [{"name": "baseline", "changes": {…}, "pairs": [...],
      "mean": {"accuracy": …, "auc": …}, "certificates": {…}, "seconds": {…}}, …],
     "command": "…", "device": "…"}

    python benchmarks/flipad_ablation.py --g dcgan --out /tmp/ablation_dcgan \\
        --json benchmarks/results/demo/ablation_dcgan.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

from converters.demo import (FAMILIES, FULL, REAL, REAL_TRAIN_SPLITS, _bundles,
                             _detector, _evaluate, _real, _samples, _sources, stage_settings)
from converters._workdir import prepare_work
from flipad_jax import report
from flipad_jax._files import atomic_file
from flipad_jax.features import check_solved
from flipad_jax.lasso import LassoOptions, Status

PAPER_SOLVER_ITERS = 1000
# name → (changes to the demo's settings, whether the lasso is the reference solver)
SETTINGS = {
    "baseline": ({}, False),
    "iter300": ({"max_iter": 300}, False),
    "iter1000": ({"max_iter": 1000}, False),
    "pool_none": ({"pool_to": None}, False),
    "lam5e-3": ({"lam": 5e-3}, False),
    "widths_paper": ({"widths": "paper", "rep_dim": 128}, False),
    "paper": ({"widths": "paper", "rep_dim": 128}, True),
}
FIT_SPLITS = (("g", "train"), (REAL, "train"), ("g", "val"))


def build_detector(head, settings, paper_solver: bool):
    """The demo's FLIPAD detector for ``settings``; with ``paper_solver`` its lasso is the
    reference solver, stopped at :data:`PAPER_SOLVER_ITERS` iterations."""
    det = _detector("flipad", head, settings, progress=False)
    if paper_solver:
        lasso = LassoOptions.paper(head.op, max_iter=PAPER_SOLVER_ITERS)
        det.set_params(features=det.feature_config.replace(lasso=lasso))
    return det


def feature_key(det) -> str:
    """Folder name of the features ``det`` computes: a digest of its feature config."""
    text = json.dumps(det.feature_config.to_json(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cached_features(det, folder: Path, name: str, images) -> dict:
    """``{"features": (N, C, h, w) float32, "objective", "gap", "iterations", "status": (N,),
    "seconds": ()}`` of ``images`` under ``det``'s feature config, from ``folder/name.npz`` or
    computed (one solve, :meth:`Detector.features_and_inversion`) and saved there."""
    path = folder / f"{name}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    start = time.perf_counter()
    feats, res = det.features_and_inversion(images)
    check_solved(res.status, name)
    out = {"features": feats, "objective": np.asarray(res.objective),
           "gap": np.asarray(res.gap), "iterations": np.asarray(res.iterations),
           "status": np.asarray(res.status), "seconds": np.asarray(time.perf_counter() - start)}
    with atomic_file(path, suffix=".npz") as tmp:
        np.savez(tmp, **out)
    return out


def certificates(parts: list) -> dict:
    """Means over the images of ``parts`` (cached feature dicts) of the lasso's certificates."""
    obj = np.concatenate([p["objective"] for p in parts]).astype(np.float64)
    gap = np.concatenate([p["gap"] for p in parts]).astype(np.float64)
    its = np.concatenate([p["iterations"] for p in parts])
    status = np.concatenate([p["status"] for p in parts])
    rel = gap / obj
    return {"n": int(len(obj)), "objective": float(obj.mean()), "rel_gap": float(rel.mean()),
            "rel_gap_median": float(np.median(rel)), "iterations": float(its.mean()),
            "share_max_iter": float(np.mean(status == Status.MAX_ITER))}


def run_setting(name: str, g: str, base, heads, images, out: Path, progress: bool) -> dict:
    changes, paper_solver = SETTINGS[name]
    settings = base._replace(**changes)
    det = build_detector(heads[g], settings, paper_solver)
    folder = out / "features" / feature_key(det)
    report.write_json(folder / "feature_config.json", det.feature_config.to_json())
    _, shown = _sources(g)
    wanted = [(g if s == "g" else s, split) for s, split in FIT_SPLITS] + \
        [(s, "test") for s in shown]
    feats = {}
    for source, split in wanted:
        if progress:
            print(f"  {name}: features of {source} {split}", file=sys.stderr, flush=True)
        feats[source, split] = cached_features(det, folder, f"{source}_{split}",
                                               images[source][split])
    det_dir = out / "detectors" / name
    start = time.perf_counter()
    if det_dir.exists():
        det = type(det).load(det_dir, head=heads[g], progress=False)
        fit_s = None
    else:
        det.fit(*(feats[g if s == "g" else s, split]["features"] for s, split in FIT_SPLITS),
                precomputed=True)
        fit_s = round(time.perf_counter() - start, 1)
        det.save(det_dir)
    scores = {s: det.anomaly_score(feats[s, "test"]["features"], precomputed=True)
              for s in shown}
    table1, table2 = [], []
    _evaluate(out, (table1, table2), name, g, scores, det.thresholds_)
    n_inverted = sum(len(f["objective"]) for f in feats.values())
    return {
        "name": name, "changes": {**changes, **({"lasso": "LassoOptions.paper(op, max_iter="
                                                 f"{PAPER_SOLVER_ITERS})"} if paper_solver else {})},
        "feature_config": det.feature_config.to_json(), "feature_key": folder.name,
        "widths": settings.widths, "rep_dim": settings.rep_dim, "epochs": settings.epochs,
        "mean": report.summarize(table1)[name],
        "pairs": [{k: v for k, v in r.items() if k not in ("method", "model")} for r in table1],
        "table2": [{k: v for k, v in r.items() if k not in ("method", "model")} for r in table2],
        "certificates": {"g": certificates([feats[g, s] for s in ("train", "val", "test")]),
                         "all": certificates(list(feats.values()))},
        "seconds": {"features_per_1000": round(1000 * sum(float(f["seconds"]) for f in
                                                          feats.values()) / n_inverted, 1),
                    "fit": fit_s},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--g", choices=FAMILIES, default="dcgan", help="the detector's generator")
    p.add_argument("--n-train", type=int, default=1000, help="training samples a class")
    p.add_argument("--n-eval", type=int, default=1000, help="n_val = n_test (default 1000)")
    p.add_argument("--real-train", choices=REAL_TRAIN_SPLITS, default="train",
                   help="split of the real training images (default train, as the sample-size "
                        "curve of benchmarks/sample_size.py)")
    p.add_argument("--settings", default=",".join(SETTINGS),
                   help=f"comma-separated names from {', '.join(SETTINGS)}")
    p.add_argument("--out", required=True, help="work folder (resumable)")
    p.add_argument("--json", required=True, help="results file, rewritten after each setting")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    names = args.settings.split(",")
    unknown = sorted(set(names) - set(SETTINGS))
    if unknown:
        raise ValueError(f"--settings {', '.join(unknown)}: expected names from "
                         f"{', '.join(SETTINGS)}")
    from converters.demo_gans import WEIGHTS_DIR

    base = FULL._replace(n_train=args.n_train, n_val=args.n_eval, n_test=args.n_eval,
                         real_train=args.real_train, sminv_n_test=0)
    out = Path(args.out)
    real = _real(base, None)
    work = prepare_work(out, {"settings": stage_settings(base), "retrain": False,
                              "weights": None}, what="ablation")
    _, shown = _sources(args.g)
    heads = _bundles(WEIGHTS_DIR, work, base, [args.g] + [s for s in shown if s != REAL],
                     progress=False)
    sizes = {"train": base.n_train, "val": base.n_val, "test": base.n_test}
    images = {REAL: real}
    for name in heads:
        splits = ("train", "val", "test") if name == args.g else ("test",)
        images[name] = {s: _samples(WEIGHTS_DIR, work, name, s, sizes[s],
                                    heads[args.g].output_range, base.seed) for s in splits}
    if max(heads[args.g].in_shape[-2:]) <= base.pool_to and "pool_none" in names:
        print(f"pool_none skipped: {args.g}'s activations {heads[args.g].in_shape} are no "
              f"larger than pool_to={base.pool_to}, so pooling is the identity", file=sys.stderr)
        names.remove("pool_none")

    command = "python benchmarks/flipad_ablation.py " + " ".join(argv or sys.argv[1:])
    results = []
    for name in names:
        path = out / "settings" / f"{name}.json"
        if path.exists():
            results.append(json.loads(path.read_text()))
        else:
            start = time.perf_counter()
            rec = run_setting(name, args.g, base, heads, images, out, not args.quiet)
            rec["wall_s"] = round(time.perf_counter() - start, 1)
            rec["load_avg_1min_at_end"] = round(os.getloadavg()[0], 2)
            report.write_json(path, rec)
            results.append(rec)
        rec = results[-1]
        hard = ", ".join(f"{r['other']} {100 * r['acc@fnr=0.005']:.1f}/{100 * r['auc']:.1f}"
                         for r in rec["pairs"])
        print(f"[{time.strftime('%H:%M:%S')}] {name}: mean acc {100 * rec['mean']['accuracy']:.2f}"
              f" AUC {100 * rec['mean']['auc']:.2f} ({hard}); rel. gap of G "
              f"{rec['certificates']['g']['rel_gap']:.4f}, {rec.get('wall_s')} s",
              file=sys.stderr, flush=True)
        report.write_json(args.json, {
            "g": args.g, "n_train": args.n_train, "n_eval": args.n_eval,
            "real_train": args.real_train, "base": base._asdict(), "settings": results,
            "device": f"{jax.devices()[0].platform}, {os.cpu_count()} cores",
            "command": command})
    return 0


if __name__ == "__main__":
    sys.exit(main())
