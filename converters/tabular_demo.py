"""The tabular demo (``flipad demo --tabular``): the paper's Table 5 / Table 15 on the wine data.

G is the shipped KL-WGAN of each data set (Redwine, Whitewine; :mod:`converters.tabular_gans`);
the other generators are SDV's TVAE, CTGAN and CopulaGAN, whose shipped samples are read with
:func:`converters.tabular_gans.read_sdv_samples`. All rows live in the whitened space the
generators were trained in.

Stages (written atomically under ``OUT/work`` and reused when rerun with the same settings, as
:func:`converters.demo.run_demo`; :func:`converters._workdir.prepare_work` checks the settings):

1. convert KL-WGAN to a head bundle (its last Linear layer; z̄ over ``zbar_samples`` latents);
2. sample KL-WGAN's train / val / test rows (``.npy``, float32, one torch thread);
3. per method, fit a detector on KL-WGAN's training rows (+1) against TVAE's training rows (−1),
   thresholds on KL-WGAN's validation rows;
4. score the test rows of KL-WGAN, TVAE, CTGAN and CopulaGAN; accuracy at each fnr and AUC;
5. report ``tables.md`` and ``results.json``, with the paper's numbers beside ours.

Methods, as the authors' tabular launcher (``sma_deepsad_tabular.py``, ``tabular.sh``):

* FLIPAD: lasso features of the 300-wide penultimate activation, λ 5e-4 (Redwine) / 1e-4
  (Whitewine), no standardisation, the top 100 dimensions, the reference's solver
  (``LassoOptions.paper``: step 0.001, the batch-wide change rule at tol 1e-4, at most 10 000
  iterations, batches of 1000). The default certified solver is far slower on this
  ill-conditioned 11×300 problem.
* RawPAD: the 11 raw (whitened) columns, no standardisation. :func:`~flipad_jax.features.
  raw_features` takes images only, so the rows go to the detector as precomputed features.
* Both train DeepSAD's MLP (512, 1024, 512, 256, 128 → 32) with lr 1e-3, 100 epochs,
  milestones 25 / 50 (quick: scaled to its epochs), batches of 128.

* SM-Inv₂ (:class:`flipad_jax.sminv.SMInv2`, the paper's 10 restarts × 1000 steps on the whole
  KL-WGAN, converted by :func:`converters.full_generator.convert_generator`): thresholds on G's
  training rows, on a subset of ``sminv_rows`` rows per set, as it costs ~0.03 s a row on a CPU.

Sizes (:data:`QUICK` / :data:`FULL`): 5000 / 100 000 training rows per class, 1000 / 10 000
validation and test rows per source (the paper's), DeepSAD 10 / 100 epochs, SM-Inv₂ on 200 /
10 000 rows per set.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
from tqdm.auto import tqdm

from converters.demo import SAMPLE_SEEDS, _stage

DATASETS = ("redwine", "whitewine")
G = "klwgan"
TRAIN_OTHER = "tvae"  # the detectors' negative class
OTHERS = ("tvae", "ctgan", "copulagan")
LAMBDAS = {"redwine": 5e-4, "whitewine": 1e-4}  # the authors' λ per data set
METHODS = ("flipad", "rawpad")  # DeepSAD detectors; SM-Inv₂ ("sm_inv2") runs beside them
MLP = dict(hidden=(512, 1024, 512, 256, 128), rep_dim=32)  # the reference's tabular DeepSAD
# Accuracy (%) at fnr 0.005 against TVAE / CTGAN / CopulaGAN, mean of five runs: the paper's
# Table 5 (Redwine) and Table 15 (Whitewine).
PAPER = {
    "redwine": {"sm_inv2": (88.02, 95.74, 94.45), "rawpad": (90.61, 96.60, 94.93),
                "flipad": (91.18, 98.07, 96.70)},
    "whitewine": {"sm_inv2": (95.69, 96.38, 96.21), "rawpad": (84.22, 80.85, 81.44),
                  "flipad": (84.15, 80.58, 80.84)},
}
TABLES = {"redwine": "Table 5 (Redwine)", "whitewine": "Table 15 (Whitewine)"}


class TabularSettings(NamedTuple):
    """Sizes and training settings of one tabular demo run (JSON-able; saved in ``OUT/work``).

    ``n_train`` rows per class, ``n_val`` of G, ``n_test`` per source; ``lasso_max_iter`` caps
    the reference solver's 10 000 iterations; SM-Inv₂ calibrates on G's first ``sminv_rows``
    training rows and scores the first ``sminv_rows`` test rows of each source (0: not run),
    with ``sminv_steps`` Adam steps per restart (the paper's 1000); ``datasets``: a subset of
    :data:`DATASETS` to run.
    """

    n_train: int
    n_val: int
    n_test: int
    zbar_samples: int = 5000
    epochs: int = 100
    top_k: int = 100
    lasso_max_iter: int = 10_000
    sminv_rows: int = 10_000
    sminv_steps: int = 1000
    seed: int = 0
    datasets: tuple = DATASETS


# SM-Inv₂ (10 restarts × 1000 Adam steps per row) cost 0.033 s a row on the loaded 2-core CPU,
# so quick mode runs it on its first 200 calibration rows and 200 test rows per source (200:
# the fewest that realise fnr 0.005); the full mode on the paper's 10 000.
QUICK = TabularSettings(n_train=5000, n_val=1000, n_test=1000, epochs=10, sminv_rows=200)
FULL = TabularSettings(n_train=100_000, n_val=10_000, n_test=10_000)


@contextlib.contextmanager
def _one_torch_thread():
    """The KL-WGAN is tiny: on a busy 2-core machine two torch threads ran it up to 35× slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _head(weights: Path, work: Path, dataset: str, settings: TabularSettings):
    from converters.convert import convert
    from flipad_jax.head import Head

    folder = work / "bundles" / dataset
    if not folder.exists():
        with _one_torch_thread():
            convert(weights, folder, arch=G, samples=settings.zbar_samples, seed=0,
                    progress=False)
    return Head.load(folder)


def _g_rows(weights: Path, work: Path, dataset: str, split: str, n: int) -> np.ndarray:
    from converters.sampling import sample

    folder = work / "samples" / dataset / split
    if not folder.exists():
        with _one_torch_thread():
            sample(weights, n, folder, arch=G, seed=SAMPLE_SEEDS[split], fmt="npy",
                   progress=False)
    return np.load(folder / "samples.npy", allow_pickle=False)


def _sdv_rows(weights_dir: Path, dataset: str, settings: TabularSettings) -> dict:
    """TVAE's training rows and every SDV model's test rows, the first n of each set."""
    from converters.tabular_gans import read_sdv_samples, sdv_samples_file

    sets = read_sdv_samples(sdv_samples_file(weights_dir, dataset))
    rows = {"train": {TRAIN_OTHER: sets[f"{TRAIN_OTHER}_train"]},
            "test": {m: sets[f"{m}_test"] for m in OTHERS}}
    for split, n in (("train", settings.n_train), ("test", settings.n_test)):
        for model, x in rows[split].items():
            if len(x) < n:
                raise ValueError(f"n_{split}={n}: expected at most {len(x)}, the {model} "
                                 f"{split} rows shipped for {dataset}")
            rows[split][model] = x[:n]
    return rows


def _detector(method: str, dataset: str, head, settings: TabularSettings, progress: bool):
    from flipad_jax.deepsad import DeepSADConfig
    from flipad_jax.detector import Detector
    from flipad_jax.features import FeatureConfig
    from flipad_jax.lasso import LassoOptions

    e = settings.epochs
    training = DeepSADConfig(network_kwargs=MLP,  # the MLP: rows are vectors
                             lr=1e-3, epochs=e,
                             lr_milestones=(e // 4, e // 2, e),  # the reference: 25, 50, 100
                             batch_size=128, seed=settings.seed)
    if method == "flipad":
        features = FeatureConfig("flipad", lam=LAMBDAS[dataset], standardize=None,
                                 top_k=settings.top_k, pool_to=None,
                                 lasso=LassoOptions.paper(head.op,
                                                          max_iter=settings.lasso_max_iter))
        return Detector(features, training=training, head=head, progress=progress)
    return Detector(FeatureConfig("raw", size=None, standardize=None), training=training,
                    progress=progress)


def _sminv2_scores(weights: Path, work: Path, dataset: str, calibration: np.ndarray,
                   test: dict, settings: TabularSettings, progress: bool) -> dict:
    """SM-Inv₂'s scores ``{"calibration": (n,), source: (n,)}`` (cached in ``work/sminv2``)."""
    from converters.full_generator import convert_generator
    from flipad_jax._files import atomic_file
    from flipad_jax.generators import Generator
    from flipad_jax.sminv import SMInv2

    path = work / "sminv2" / f"{dataset}.npz"
    if not path.exists():
        folder = work / "generators" / dataset
        if not folder.exists():
            with _one_torch_thread():
                convert_generator(weights, folder, arch=G)
        det = SMInv2(Generator.load(folder), steps=settings.sminv_steps, seed=settings.seed,
                     progress=progress)
        scores = {"calibration": det.fit(calibration).train_scores_,
                  **{name: det.anomaly_score(x) for name, x in test.items()}}
        with atomic_file(path, suffix=".npz") as tmp:
            np.savez(tmp, **scores)
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def paper_tables(results: dict) -> str:
    """Markdown: per data set, our accuracy at fnr 0.005 beside the paper's (Table 5 / 15)."""
    parts = []
    for dataset in results["datasets"]:
        head = " | ".join(f"{o} ours | {o} paper" for o in OTHERS)
        parts += [f"### {TABLES[dataset]}: accuracy (%) at fnr 0.005, KL-WGAN vs G′", "",
                  f"| method | {head} |", "|---" * (1 + 2 * len(OTHERS)) + "|"]
        ours = {(r["method"], r["other"]): r for r in results["pairs"]
                if r["model"] == f"{G}_{dataset}"}
        for method in list(PAPER[dataset]):
            cells = []
            for i, other in enumerate(OTHERS):
                rec = ours.get((method, other))
                cells += ["—" if rec is None else f"{100 * rec['acc@fnr=0.005']:.2f}",
                          f"{PAPER[dataset][method][i]:.2f}"]
            parts.append(f"| {method} | " + " | ".join(cells) + " |")
        parts.append("")
    return "\n".join(parts)


def _report(results: dict) -> str:
    """``tables.md``: :func:`paper_tables`, then every metric per data set and G′."""
    from flipad_jax.detector import DEFAULT_FNRS
    from flipad_jax.report import tables_markdown

    sections = {f"{TABLES[d]}, all metrics": [r for r in results["pairs"]
                                               if r["model"] == f"{G}_{d}"]
                for d in results["datasets"]}
    return paper_tables(results) + "\n" + tables_markdown(sections, DEFAULT_FNRS)


def detector_dir(work: Path, method: str, dataset: str) -> Path:
    """The folder of the demo's ``method`` detector for ``dataset`` under ``work``."""
    return work / "detectors" / f"{method}_{dataset}"


def takes_rows(method: str) -> bool:
    """Whether ``method``'s detector scores the rows themselves (``precomputed=True``): RawPAD's
    features are the rows."""
    return method == "rawpad"


def load_detector(work: Path, method: str, dataset: str, head, progress: bool):
    """The saved ``method`` detector for ``dataset`` (FLIPAD's with the KL-WGAN ``head``)."""
    from flipad_jax.detector import Detector

    return Detector.load(detector_dir(work, method, dataset),
                         head=head if method == "flipad" else None, progress=progress)


def run_tabular_demo(out, *, quick: bool = False, overwrite: bool = False, progress: bool = True,
                     settings: Optional[TabularSettings] = None, generators=None) -> dict:
    """Run the tabular demo into the folder ``out``; returns the content of ``results.json``.

    Args:
      out: report folder (new, empty, or one of an earlier run with the same settings).
      quick: the :data:`QUICK` sizes instead of :data:`FULL` (ignored if ``settings``).
      overwrite: discard an earlier run in ``out``.
      progress: show progress bars.
      settings: explicit sizes (:class:`TabularSettings`).
      generators: a folder laid out as the shipped ``converters/demo_weights/tabular`` (KL-WGAN
        weights and SDV samples per data set, as :mod:`converters.tabular_gans` writes them),
        e.g. another training run's; default the shipped one.

    Returns:
      ``{"methods": {method: {"accuracy", "auc", "pairs"}}, "pairs": [records of
      :func:`flipad_jax.metrics.evaluate` with "method", "model" ("klwgan_<dataset>") and
      "dataset"], "datasets", "paper", "settings", "timings_s", "weights", "data"}``.
    """
    from converters._workdir import prepare_work
    from converters.tabular_gans import OUT_DIR, klwgan_weights, sdv_samples_file
    from flipad_jax import metrics, report
    from flipad_jax._files import sha256_file
    from flipad_jax.detector import DEFAULT_FNRS

    settings = settings or (QUICK if quick else FULL)
    unknown = [d for d in settings.datasets if d not in DATASETS]
    if unknown or not settings.datasets:
        raise ValueError(f"datasets={list(settings.datasets)!r}: expected a non-empty subset of "
                         f"{list(DATASETS)}")
    if not 0 <= settings.sminv_rows <= min(settings.n_train, settings.n_test):
        raise ValueError(f"sminv_rows={settings.sminv_rows}: expected 0 (no SM-Inv₂) up to "
                         f"min(n_train, n_test) = {min(settings.n_train, settings.n_test)}")
    # JSON's lists for tuples, as settings.json reads back
    wanted = json.loads(json.dumps({"settings": settings._asdict()}))
    generators = OUT_DIR if generators is None else Path(generators).resolve()
    files = [f for d in settings.datasets
             for f in (klwgan_weights(generators, d), sdv_samples_file(generators, d))]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"generators={str(generators)!r}: missing {missing}; expected a folder "
                         f"laid out as {OUT_DIR}")
    # the work folder's stages hold what these files gave: keyed by their content, not path
    wanted["generators"] = {f.name: sha256_file(f) for f in files}
    work = prepare_work(out, wanted, what="tabular demo", overwrite=overwrite)
    out = Path(out)
    timings: dict = {}
    pairs = []
    for dataset in settings.datasets:
        weights = klwgan_weights(generators, dataset)
        t = time.perf_counter()
        head = _head(weights, work, dataset, settings)
        _stage(timings, "convert", t)

        t = time.perf_counter()
        sizes = {"train": settings.n_train, "val": settings.n_val, "test": settings.n_test}
        g = {s: _g_rows(weights, work, dataset, s, n) for s, n in sizes.items()}
        sdv = _sdv_rows(generators, dataset, settings)
        _stage(timings, "sample", t)

        for method in tqdm(METHODS, desc=dataset, disable=not progress):
            det_dir = detector_dir(work, method, dataset)
            rows = takes_rows(method)
            t = time.perf_counter()
            if det_dir.exists():
                det = load_detector(work, method, dataset, head, progress)
            else:
                det = _detector(method, dataset, head, settings, progress)
                det.fit(g["train"], sdv["train"][TRAIN_OTHER], g["val"], precomputed=rows)
                det.save(det_dir)
            _stage(timings, f"fit {method}", t)
            t = time.perf_counter()
            scores = {name: det.anomaly_score(x, precomputed=rows)
                      for name, x in {G: g["test"], **sdv["test"]}.items()}
            _stage(timings, f"score {method}", t)
            for rec in metrics.evaluate(scores[G], {o: scores[o] for o in OTHERS},
                                        det.thresholds_):
                pairs.append({"method": method, "model": f"{G}_{dataset}",
                              "dataset": dataset, **rec})

        n = settings.sminv_rows
        if n:
            t = time.perf_counter()
            scores = _sminv2_scores(weights, work, dataset, g["train"][:n],
                                    {name: x[:n] for name, x in {G: g["test"],
                                                                 **sdv["test"]}.items()},
                                    settings, progress)
            _stage(timings, "sm_inv2", t)
            thresholds = {fnr: metrics.threshold(scores["calibration"], fnr)
                          for fnr in DEFAULT_FNRS}
            for rec in metrics.evaluate(scores[G], {o: scores[o] for o in OTHERS}, thresholds):
                pairs.append({"method": "sm_inv2", "model": f"{G}_{dataset}",
                              "dataset": dataset, **rec})

    results = {"methods": report.summarize(pairs), "pairs": pairs,
               "datasets": list(settings.datasets),
               "paper": {d: {m: dict(zip(OTHERS, v)) for m, v in p.items()}
                         for d, p in PAPER.items()},
               "settings": settings._asdict(), "timings_s": timings, "weights": str(generators),
               "data": "UCI Wine Quality (whitened, as the generators' training data)"}
    report.write_text(out / "tables.md", _report(results))
    report.write_json(out / "results.json", results)
    return results


def print_summary(results: dict) -> None:
    """The Table 5 / Table 15 analogs beside the paper's numbers, and the means per method."""
    print(paper_tables(results))
    for method, m in results["methods"].items():
        print(f"{method}: accuracy {100 * m['accuracy']:.2f}%, AUC {100 * m['auc']:.2f}% "
              f"(mean over {m['pairs']} (data set, G′) pairs)")
