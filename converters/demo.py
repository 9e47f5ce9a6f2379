"""``flipad demo``: the whole method on the embedded default, from generators to the paper's tables.

Generators: the five Fashion-MNIST GANs that ship with the package (:mod:`converters.demo_gans`;
``--retrain`` trains them anew). Real images: Fashion-MNIST's test split, which no generator saw.

Stages (each result is written atomically under ``OUT/work`` and reused when the demo is rerun
with the same settings, so an interrupted run resumes where it stopped):

1. convert each generator to a head bundle (z̄ over ``zbar_samples`` latents);
2. sample train / val / test sets as 8-bit PNGs and read them back (the paper's pipeline);
3. per G of the four families and per method (FLIPAD, RawPAD, DCTPAD): fit a detector on G's
   samples against real ones, thresholds on G's validation samples;
4. score the test sets of G, real and every other G′ (Table 1) and of G's other-seed twin for
   DCGAN (Table 2); accuracy at each fnr and AUC (:mod:`flipad_jax.metrics`);
5. report: ``tables.md``, ``tables.json``, ``results.json``, ``fig4_<G>.png`` and
   ``hist_<method>_<G>.png`` (:mod:`flipad_jax.report`).

Sizes (``--quick`` / default, :data:`QUICK` / :data:`FULL`): 500 / 1000 training samples per
class, 200 / 1000 validation and test samples per source, DeepSAD for 10 / 50 epochs, at most
50 FISTA iterations per image (λ = 5e-4, pool to 16×16: LSGAN's 32×32 activations are
max-pooled 2×2 as the paper pools its 64×64 ones). The detector networks are the reference's
LeNets with narrower layers for the 32×32 grey data (:data:`NETWORK_WIDTHS`), as the generators
are narrower than the paper's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
from tqdm.auto import tqdm

from flipad_jax.features import FeatureConfig

METHODS = {"flipad": "flipad", "rawpad": "raw", "dctpad": "dct"}
FAMILIES = ("dcgan", "wgangp", "lsgan", "ebgan")
TWINS = {"dcgan": "dcgan_seed1"}  # Table 2: G against its other-seed twin
REAL = "real"
TABLE1 = "Table 1 (G vs real and every other G′)"
TABLE2 = "Table 2 (G vs its other-seed twin)"
# LeNet widths for the 32×32 grey demo data; the reference's are 32, 64, 128 for 3×32×32 pixels
# and 128, 256, 128 for 64×32×32 features (1/4 to 1/8 of those keeps a fit to seconds on a CPU).
NETWORK_WIDTHS = {"flipad": (16, 32, 32), "raw": (8, 16, 32), "dct": (8, 16, 32)}
SAMPLE_SEEDS = {"train": 1, "val": 2, "test": 3}


class DemoSettings(NamedTuple):
    """Sizes and training settings of one demo run (JSON-able; saved in ``OUT/work``)."""

    n_train: int
    n_val: int
    n_test: int
    zbar_samples: int
    epochs: int
    lam: float = FeatureConfig.lam
    tol: float = 1e-2
    max_iter: int = 2000
    pool_to: int = 16
    rep_dim: int = 32
    seed: int = 0


# The full demo trains DeepSAD for the paper's 50 epochs; the quick one trades that for time.
# Measured on DCGAN's FLIPAD detector (500 samples a class), 10 → 50 epochs raised its AUC
# against WGAN-GP from 53.5 to 70.0, against EBGAN from 84.8 to 96.6, against its twin from 91.0
# to 96.1; λ from 5e-4 to 5e-2, or 50, 100 or 1000 solver iterations, moved them by a few points.
QUICK = DemoSettings(n_train=500, n_val=200, n_test=200, zbar_samples=2000, epochs=10,
                     max_iter=50)
FULL = DemoSettings(n_train=1000, n_val=1000, n_test=1000, zbar_samples=5000, epochs=50,
                    max_iter=50)


def _stage(done: dict, name: str, start: float) -> None:
    done[name] = round(done.get(name, 0.0) + time.perf_counter() - start, 2)


def _bundles(weights: Path, work: Path, settings: DemoSettings, names, progress: bool) -> dict:
    from converters.convert import convert
    from converters.demo_gans import GEN_OPTIONS, arch_of
    from flipad_jax.head import Head

    heads = {}
    for name in tqdm(names, desc="convert", disable=not progress):
        folder = work / "bundles" / name
        if not folder.exists():
            convert(weights / f"{name}.safetensors", folder, arch=arch_of(name),
                    arch_options=GEN_OPTIONS, samples=settings.zbar_samples, seed=0,
                    progress=False)
        heads[name] = Head.load(folder)
    return heads


def _samples(weights: Path, work: Path, name: str, split: str, n: int, output_range) -> np.ndarray:
    from converters.demo_gans import GEN_OPTIONS, arch_of
    from converters.sampling import sample
    from flipad_jax.images import load_images

    folder = work / "samples" / name / split
    if not folder.exists():
        sample(weights / f"{name}.safetensors", n, folder, arch=arch_of(name),
               arch_options=GEN_OPTIONS,
               seed=SAMPLE_SEEDS[split], progress=False)
    return load_images(folder, output_range)


def _real(settings: DemoSettings, data) -> dict:
    from flipad_jax.datasets import fashion_mnist
    from flipad_jax.images import pixels_to_range

    images = fashion_mnist("test", 32, data)
    need = settings.n_train + settings.n_test
    if need > len(images):
        raise ValueError(f"n_train + n_test = {need}: expected at most {len(images)}, the size "
                         "of Fashion-MNIST's test split")
    order = np.random.default_rng(settings.seed).permutation(len(images))
    x = pixels_to_range(images[order[:need]])
    return {"train": x[:settings.n_train], "test": x[settings.n_train:]}


def _detector(kind: str, head, settings: DemoSettings, progress: bool):
    from flipad_jax.deepsad import DeepSADConfig
    from flipad_jax.detector import Detector
    from flipad_jax.lasso import LassoOptions

    features = FeatureConfig(kind, lam=settings.lam, pool_to=settings.pool_to, size=32, crop=32,
                             lasso=LassoOptions(tol=settings.tol, max_iter=settings.max_iter))
    training = DeepSADConfig(network_kwargs=dict(widths=NETWORK_WIDTHS[kind],
                                                 rep_dim=settings.rep_dim),
                             epochs=settings.epochs,
                             lr_milestones=(settings.epochs // 2, settings.epochs),  # paper: 25, 50
                             seed=settings.seed)
    return Detector(features, training=training, head=head if kind == "flipad" else None,
                    progress=progress)


def run_demo(out, *, quick: bool = False, retrain: bool = False, data=None,
             weights=None, overwrite: bool = False, progress: bool = True,
             settings: Optional[DemoSettings] = None) -> dict:
    """Run the demo into the folder ``out``; returns the content of ``results.json``."""
    from converters.demo_gans import WEIGHTS_DIR, train_demo_generators
    from flipad_jax import metrics, report
    from flipad_jax.detector import DEFAULT_FNRS, Detector
    from flipad_jax.features import max_pool_to, top_channels

    settings = settings or (QUICK if quick else FULL)
    out = Path(out)
    work = out / "work"
    settings_file = work / "settings.json"
    wanted = {"settings": settings._asdict(), "retrain": retrain,
              "weights": str(weights) if weights else None}
    if settings_file.exists():
        if json.loads(settings_file.read_text()) != wanted and not overwrite:
            raise ValueError(f"{out}: holds a demo run with other settings "
                             f"({settings_file}); expected a new folder, or pass --overwrite")
        if overwrite:
            import shutil
            shutil.rmtree(work)
    elif out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"out={str(out)!r} exists and is not a demo folder: expected a new or "
                         "empty folder (or pass --overwrite)")
    work.mkdir(parents=True, exist_ok=True)
    report.write_json(settings_file, wanted)

    timings: dict = {}
    t = time.perf_counter()
    if retrain:
        weights = work / "weights"
        if not weights.exists():
            train_demo_generators(weights, data=data, progress=progress)
        _stage(timings, "train generators", t)
    weights = Path(weights or WEIGHTS_DIR)

    t = time.perf_counter()
    names = list(FAMILIES) + list(TWINS.values())
    heads = _bundles(weights, work, settings, names, progress)
    _stage(timings, "convert", t)

    t = time.perf_counter()
    out_range = heads[FAMILIES[0]].output_range
    sizes = {"train": settings.n_train, "val": settings.n_val, "test": settings.n_test}
    images = {REAL: _real(settings, data)}
    for name in tqdm(names, desc="sample (PNG)", disable=not progress):
        splits = ("test",) if name in TWINS.values() else ("train", "val", "test")
        images[name] = {s: _samples(weights, work, name, s, sizes[s], out_range) for s in splits}
    _stage(timings, "sample", t)

    table1, table2 = [], []
    for g in FAMILIES:
        for method, kind in METHODS.items():
            label = f"{method} {g}"
            det_dir = work / "detectors" / f"{method}_{g}"
            t = time.perf_counter()
            if det_dir.exists():
                det = Detector.load(det_dir, head=heads[g] if kind == "flipad" else None,
                                    progress=progress)
            else:
                det = _detector(kind, heads[g], settings, progress)
                if progress:
                    tqdm.write(f"fitting {label}")
                det.fit(images[g]["train"], images[REAL]["train"], images[g]["val"])
                det.save(det_dir)
            _stage(timings, f"fit {method}", t)
            # G, then every G′ of Table 1, then G's twin (Table 2) if it has one: only the
            # twin of G is inverted through G's head.
            others = [REAL] + [f for f in FAMILIES if f != g]
            shown = [g] + others + ([TWINS[g]] if g in TWINS else [])
            t = time.perf_counter()
            feats = {s: det.features(images[s]["test"]) for s in shown}
            scores = {s: det.score(f, precomputed=True) for s, f in feats.items()}
            _stage(timings, f"score {method}", t)
            for rec in metrics.evaluate(scores[g], {s: scores[s] for s in others},
                                        det.thresholds_):
                table1.append({"method": method, "model": g, **rec})
            if g in TWINS:
                for rec in metrics.evaluate(scores[g], {TWINS[g]: scores[TWINS[g]]},
                                            det.thresholds_):
                    table2.append({"method": method, "model": g, **rec})
            report.histogram_figure(out / f"hist_{method}_{g}.png", {s: scores[s] for s in shown},
                                    det.thresholds_, title=f"{method} detector of {g}: "
                                                           "test scores per source")
            if kind == "flipad":
                channels = top_channels(feats[g], feats[REAL], 3)
                zbar = np.asarray(max_pool_to(heads[g].zbar[None], settings.pool_to))[0]
                report.feature_figure(out / f"fig4_{g}.png", zbar,
                                      {s: feats[s].mean(axis=0) for s in [g] + others},
                                      channels, title=f"{g}: mean inverted features per source, "
                                                      "top channels (G vs real)")

    results = {"methods": report.summarize(table1), "pairs": table1,
               "table2": {"methods": report.summarize(table2), "pairs": table2},
               "settings": settings._asdict(), "timings_s": timings,
               "weights": str(weights), "data": "Fashion-MNIST (real: test split)"}
    sections = {TABLE1: table1, TABLE2: table2}
    report.write_text(out / "tables.md", report.tables_markdown(sections, DEFAULT_FNRS))
    report.write_json(out / "tables.json", {"table1": table1, "table2": table2})
    report.write_json(out / "results.json", results)
    return results


DEMO_EXAMPLES = """\
examples:
  flipad demo --quick                 # about 2 minutes on 2 CPU cores
  flipad demo --out flipad-demo       # the full demo (1000 / 1000 / 1000 samples, ~12 min)
  flipad demo --retrain --out demo2   # retrain the five GANs first (tens of minutes on a CPU)
"""


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``flipad demo`` on an argparse subparsers object."""
    from flipad_jax._argparse import add_output_flags, subparser

    p = subparser(
        subparsers, "demo", DEMO_EXAMPLES,
        help="the whole method on the embedded Fashion-MNIST GANs, with the paper's tables",
        description="Convert the shipped generators, sample PNG train/val/test sets, fit FLIPAD, "
                    "RawPAD and DCTPAD detectors for each G, print Table-1 and Table-2 style "
                    "tables and write a report folder (tables, results.json, figures).")
    p.add_argument("--out", default="flipad-demo", help="report folder (default flipad-demo)")
    p.add_argument("--quick", action="store_true", help="smaller sets and shorter training")
    p.add_argument("--retrain", action="store_true", help="retrain the GANs instead of using "
                   "the shipped weights")
    p.add_argument("--data", help="Fashion-MNIST IDX folder (default: $FLIPAD_FASHION_MNIST or "
                   "Debian's /usr/share/datasets/fashion-mnist)")
    p.add_argument("--weights", help="folder of demo generator weights (default: shipped)")
    add_output_flags(p, "discard an earlier run in --out")
    p.set_defaults(func=_run_demo)
    return p


def _run_demo(args) -> int:
    from flipad_jax import report

    start = time.perf_counter()
    results = run_demo(args.out, quick=args.quick, retrain=args.retrain, data=args.data,
                       weights=args.weights, overwrite=args.overwrite, progress=not args.quiet)
    print(report.tables_markdown({TABLE1: results["pairs"], TABLE2: results["table2"]["pairs"]},
                                 per_pair=False))
    for method, m in results["methods"].items():
        print(f"{method}: accuracy {100 * m['accuracy']:.2f}%, AUC {100 * m['auc']:.2f}% "
              f"(mean over {m['pairs']} (G, G′) pairs)")
    print(f"report in {args.out}/ ({time.perf_counter() - start:.0f} s)")
    return 0
