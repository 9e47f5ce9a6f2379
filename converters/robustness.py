"""``flipad robustness``: attribution of perturbed images in the immunized setting, on the demo's
generators (the paper's Table 3 at fnr 0.005 and its Table 13 at fnr 0.05).

For each perturbation p (default: :data:`~flipad_jax.perturbations.PAPER_PERTURBATIONS`), each G
of the four demo families and each method (FLIPAD, RawPAD, DCTPAD, SM-F), a detector is fitted on
p(G's training samples) against p(real training images), thresholded on p(G's validation samples)
and tested on p(test samples) of G, of real images and of every other G′: the detectors are
immunized, trained on data perturbed the way their test data is. p acts on the 8-bit pixels (the
demo's PNG samples, Fashion-MNIST's bytes) before they are decoded, as in the reference; the
noise of each image is seeded by (``settings.seed``, its name ``SOURCE/SPLIT/INDEX``), so it
depends neither on the output folder nor on the order of the work.

Stages, written atomically under ``OUT/work`` and reused when the run is repeated with the same
settings (an interrupted run resumes; perturbations can be added later):

1. the demo's head bundles and PNG sample sets (its stage functions, :mod:`converters.demo`);
2. per (p, method, G): the fitted detector (``work/detectors/P/METHOD_G``), then its test records
   (``work/records/P/METHOD_G.json``: one row of :func:`flipad_jax.metrics.evaluate` per G′).

Report: ``robustness.json`` (per perturbation and method, accuracy at fnr 0.005 and AUC, each
the mean over the (G, G′) pairs; the fnr 0.05 accuracies under ``accuracy_fnr_0.05``; every pair
under ``pairs``) and ``robustness.md`` (the tables in the paper's layout).

Sizes (``--quick`` / default, :data:`QUICK` / :data:`FULL`, the demo's full sizes): 128 / 1000
training samples per class, 200 / 1000 validation samples (⌈1/0.005⌉ = 200 is the fewest fnr
0.005 allows) and 100 / 1000 test samples per source, DeepSAD for 15 / 50 epochs, at most 20 / 50
FISTA iterations per image; otherwise the demo's solver (λ = 5e-4, pool to 16×16) and networks
(:data:`converters.demo.NETWORK_WIDTHS`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from converters.demo import (FAMILIES, FULL as DEMO_FULL, METHODS as DEMO_METHODS, REAL,
                             DemoSettings)
from flipad_jax.detector import DEFAULT_FNRS
from flipad_jax.perturbations import PAPER_PERTURBATIONS, Perturbation

METHODS = {**DEMO_METHODS, "sm_f": "sm_f"}
FNR, LIBERAL_FNR = DEFAULT_FNRS  # Table 3's fnr and Table 13's
# The demo generators' tanh range, which the demo decodes real images to as well.
PIXEL_RANGE = (-1.0, 1.0)
# Quick: 8 × 4 × 4 = 128 detectors in at most about 6 minutes on 2 idle CPU cores (estimated
# from the CPU time of a run on a loaded machine; README). 128 samples a class make two full
# DeepSAD batches; 200 validation samples are the fewest fnr 0.005 allows; 20 FISTA iterations
# because at the demo's 50, LSGAN's 7 600 inversions alone would take about 150 s (at the quick
# demo's idle rate).
QUICK = DemoSettings(n_train=128, n_val=200, n_test=100, zbar_samples=2000, epochs=15,
                     max_iter=20)
FULL = DEMO_FULL
TABLES = (("Table 3 analog: accuracy (%) at fnr 0.005", f"acc@fnr={FNR:g}"),
          ("Table 13 analog: accuracy (%) at fnr 0.05", f"acc@fnr={LIBERAL_FNR:g}"),
          ("AUC (%)", "auc"))


class _Clock:
    """Wall and process CPU seconds per stage, summed over the stage's calls."""

    def __init__(self):
        self.wall: dict = {}
        self.cpu: dict = {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            for spent, now, start in ((self.wall, time.perf_counter(), wall),
                                      (self.cpu, time.process_time(), cpu)):
                spent[stage] = round(spent.get(stage, 0.0) + now - start, 2)


def parse_perturbations(specs: Optional[Sequence]) -> tuple:
    """``"NAME=STRENGTH"`` texts or :class:`Perturbation` objects → distinct perturbations, in
    order; None → the paper's eight."""
    if specs is None:
        return PAPER_PERTURBATIONS
    ps = tuple(p if isinstance(p, Perturbation) else Perturbation.parse(p) for p in specs)
    if not ps:
        raise ValueError("perturbations=[]: expected at least one NAME=STRENGTH")
    names = [p.name for p in ps]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"perturbations {', '.join(repeated)} given more than once: expected "
                         "each at most once")
    return ps


def _pixels(images: np.ndarray) -> np.ndarray:
    """The 8-bit pixels ``(B, C, H, W)`` that decoded to ``images``: quantising is the exact
    inverse of the decoding for every level, so these are the PNG's (or data set's) bytes."""
    from converters.sampling import quantize

    pixels, clipped = quantize(images, PIXEL_RANGE)
    if clipped:
        raise ValueError(f"{clipped} pixel values lie outside {PIXEL_RANGE}: expected decoded "
                         "8-bit images")
    return pixels.transpose(0, 3, 1, 2)


def _clean_sets(weights: Path, work: Path, settings: DemoSettings, data) -> dict:
    """source → split → uint8 ``(n, C, H, W)``: the demo's PNG samples of each G (written on the
    first run) and the real images, unperturbed."""
    from converters.demo import _real, _samples

    sizes = {"train": settings.n_train, "val": settings.n_val, "test": settings.n_test}
    sets = {REAL: {split: _pixels(x) for split, x in _real(settings, data).items()}}
    for g in FAMILIES:
        sets[g] = {split: _pixels(_samples(weights, work, g, split, n, PIXEL_RANGE,
                                           settings.seed))
                   for split, n in sizes.items()}
    return sets


def perturbed_sets(clean: dict, p: Perturbation, seed: int) -> dict:
    """``clean`` (source → split → uint8 pixels) perturbed by ``p`` and decoded to float32 in
    :data:`PIXEL_RANGE`; image i of a set is named ``SOURCE/SPLIT/i`` for its noise seed."""
    from flipad_jax.images import perturb_refs, pixels_to_range

    return {source: {split: pixels_to_range(
        perturb_refs(px, [f"{source}/{split}/{i:06d}" for i in range(len(px))], p, seed),
        PIXEL_RANGE) for split, px in splits.items()} for source, splits in clean.items()}


def _new_detector(kind: str, head, settings: DemoSettings):
    from converters.demo import _detector
    from flipad_jax.detector import Detector
    from flipad_jax.features import FeatureConfig

    if kind == "sm_f":  # a fingerprint, no network to configure
        return Detector(FeatureConfig("sm_f"), progress=False)
    return _detector(kind, head, settings, False)


def _cell(work: Path, p: Perturbation, method: str, g: str, head, sets, settings: DemoSettings,
          clock: _Clock) -> list:
    """The test records of G's ``method`` detector under ``p`` (fitted, saved and scored unless
    an earlier run left them). ``sets()``: the perturbed images, computed on first use."""
    from flipad_jax import metrics, report
    from flipad_jax.detector import Detector

    records_file = work / "records" / p.name / f"{method}_{g}.json"
    if records_file.exists():
        return json.loads(records_file.read_text())
    x = sets()
    kind = METHODS[method]
    det_dir = work / "detectors" / p.name / f"{method}_{g}"
    with clock(f"fit {method}"):
        if det_dir.exists():
            det = Detector.load(det_dir, head=head if kind == "flipad" else None, progress=False)
        else:
            det = _new_detector(kind, head, settings)
            det.fit(x[g]["train"], x[REAL]["train"], x[g]["val"])
            det.save(det_dir)
    others = [REAL] + [f for f in FAMILIES if f != g]
    with clock(f"score {method}"):
        scores = {s: det.anomaly_score(x[s]["test"]) for s in [g] + others}
    records = [{"perturbation": p.name, "method": method, "model": g, **r}
               for r in metrics.evaluate(scores[g], {s: scores[s] for s in others},
                                         det.thresholds_)]
    report.write_json(records_file, records)
    return records


def robustness_markdown(records: Sequence[dict]) -> str:
    """The report's tables: rows methods, columns perturbations (the paper's Table 3 layout),
    each cell the mean over the (G, G′) pairs, at fnr 0.005, at fnr 0.05 and as AUC."""
    from flipad_jax.metrics import attribution_table

    by_perturbation = [{**r, "model": r["perturbation"]} for r in records]
    parts = []
    for title, key in TABLES:
        parts += [f"### {title}, mean over G and G′", "",
                  attribution_table(by_perturbation, value=key), ""]
    return "\n".join(parts)


def run_robustness(out, *, quick: bool = False, perturbations: Optional[Sequence] = None,
                   data=None, weights=None, overwrite: bool = False, progress: bool = True,
                   settings: Optional[DemoSettings] = None) -> dict:
    """Run the robustness study into the folder ``out``; returns the content of
    ``robustness.json``.

    Args:
      quick: :data:`QUICK` sizes instead of :data:`FULL` (ignored when ``settings`` is given).
      perturbations: ``"NAME=STRENGTH"`` texts or :class:`Perturbation` objects (default: the
        paper's eight).
      data: Fashion-MNIST IDX folder (default: :func:`flipad_jax.datasets.fashion_mnist`'s).
      weights: folder of demo generator weights (default: the shipped ones).
      overwrite: discard an earlier run's stages in ``out``.
    """
    from converters._workdir import prepare_work
    from converters.demo import _bundles
    from converters.demo_gans import WEIGHTS_DIR, weights_fingerprint
    from flipad_jax import report

    ps = parse_perturbations(perturbations)
    settings = settings or (QUICK if quick else FULL)
    weights = Path(weights or WEIGHTS_DIR)
    work = prepare_work(out, {"settings": settings._asdict(), "weights": str(weights),
                              "weights_sha256": weights_fingerprint(weights)},
                        what="robustness", overwrite=overwrite)
    clock = _Clock()
    with clock("convert"):
        heads = _bundles(weights, work, settings, FAMILIES, progress)
    for g, head in heads.items():
        if tuple(head.output_range or ()) != PIXEL_RANGE:
            raise ValueError(f"{g}: output range {head.output_range}, expected the demo "
                             f"generators' {PIXEL_RANGE}")
    with clock("sample"):
        clean = _clean_sets(weights, work, settings, data)

    records = []
    bar = tqdm(total=len(ps) * len(FAMILIES) * len(METHODS), desc="robustness",
               disable=not progress)
    for p in ps:
        perturbed: dict = {}

        def sets():  # p's sets, perturbed once and only if some cell of p is not done yet
            if not perturbed:
                with clock("perturb"):
                    perturbed.update(perturbed_sets(clean, p, settings.seed))
            return perturbed

        for g in FAMILIES:
            for method in METHODS:
                bar.set_postfix_str(f"{p.name} {method} {g}")
                records += _cell(work, p, method, g, heads[g], sets, settings, clock)
                bar.update()
    bar.close()

    def summary(key):
        return {p.name: {m: float(np.mean([r[key] for r in records
                                           if r["perturbation"] == p.name and r["method"] == m]))
                         for m in METHODS} for p in ps}

    accuracy, liberal, auc = (summary(key) for _, key in TABLES)
    results = {
        "perturbations": {p: {m: {"accuracy": accuracy[p][m], "auc": auc[p][m]} for m in METHODS}
                          for p in accuracy},
        "fnr": FNR,
        f"accuracy_fnr_{LIBERAL_FNR:g}": liberal,
        "pairs": records, "settings": settings._asdict(), "noise_seed": settings.seed,
        "timings_s": clock.wall, "cpu_s": clock.cpu, "weights": str(weights),
        "data": "Fashion-MNIST (real: test split)",
    }
    report.write_text(Path(out) / "robustness.md", robustness_markdown(records))
    report.write_json(Path(out) / "robustness.json", results)
    return results


EXAMPLES = """\
examples:
  flipad robustness --quick                       # the paper's 8 perturbations, small sets
  flipad robustness --out rob --perturbations blur=3 jpeg=80
"""


def add_robustness_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``flipad robustness`` on an argparse subparsers object."""
    from flipad_jax._argparse import add_output_flags, subparser

    p = subparser(
        subparsers, "robustness", EXAMPLES,
        help="attribution of perturbed images on the demo's GANs (the paper's Table 3)",
        description="For each perturbation (blur, crop, noise, JPEG at the paper's strengths), "
                    "each demo GAN G and each method (FLIPAD, RawPAD, DCTPAD, SM-F): fit and "
                    "threshold a detector on perturbed samples, test it on perturbed samples "
                    "of G, real images and the other GANs; print and write the tables at fnr "
                    "0.005 (Table 3) and 0.05 (Table 13).")
    p.add_argument("--out", default="flipad-robustness",
                   help="report folder (default flipad-robustness)")
    p.add_argument("--quick", action="store_true", help="smaller sets and shorter training")
    p.add_argument("--perturbations", nargs="+", metavar="NAME=STRENGTH",
                   help="blur=K, crop=S, noise=STD or jpeg=Q (default: the paper's eight, "
                        + ", ".join(str(q) for q in PAPER_PERTURBATIONS) + ")")
    p.add_argument("--data", help="Fashion-MNIST IDX folder (default: $FLIPAD_FASHION_MNIST or "
                   "Debian's /usr/share/datasets/fashion-mnist)")
    p.add_argument("--weights", help="folder of demo generator weights (default: shipped)")
    add_output_flags(p, "discard an earlier run in --out")
    p.set_defaults(func=_run_robustness)
    return p


def _run_robustness(args) -> int:
    start = time.perf_counter()
    results = run_robustness(args.out, quick=args.quick, perturbations=args.perturbations,
                             data=args.data, weights=args.weights, overwrite=args.overwrite,
                             progress=args.progress)
    print(robustness_markdown(results["pairs"]))
    print(f"report in {args.out}/ ({time.perf_counter() - start:.0f} s)")
    return 0
