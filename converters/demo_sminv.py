"""SM-Inv₂ in ``flipad demo``: the whole-generator inversion baseline (paper App. G) on a subset.

Inverting one image costs restarts × steps forward and backward passes of G: at the paper's
10 × 1000 about 6 s for the demo DCGAN and 48 s for LSGAN on the 2-core CPU
(``benchmarks/results/sminv_cpu_*.json``), so the demo runs :class:`flipad_jax.sminv.SMInv2`
on a stated subset with the restarts and steps of :class:`converters.demo.DemoSettings`'
``sminv_*`` fields: the threshold τ(fnr) on G's first ``sminv_n_thr`` *training* samples (the
paper thresholds SM-Inv₂ on the training set), the scores on the first ``sminv_n_test`` test
images of every source (G, real, each G′, G's twin). Stage results, reused on rerun, under
``OUT/work``: the whole-generator bundle ``generators/<G>``, the scores ``sminv2/<G>.npz`` and
the inversion's wall time ``costs/sm_inv2_<G>.json`` (compilation included, as for the other
methods; the conversion is not counted).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

KIND = "sm_inv2"
CALIBRATION = "calibration"  # npz key of the threshold set's scores (no source has this name)


def subset_note(settings) -> str:
    """The subset and settings SM-Inv₂ ran with, for table headings."""
    r, s = settings.sminv_restarts, settings.sminv_steps
    return (f"SM-Inv₂ on {settings.sminv_n_test} test images per source, {r} restart"
            f"{'s' if r != 1 else ''} × {s} steps, threshold on {settings.sminv_n_thr} of G's "
            "training images")


def _generator(weights: Path, work: Path, name: str):
    """G as a whole-generator bundle (converted once into ``work/generators``)."""
    from converters.demo_gans import GEN_OPTIONS, arch_of
    from converters.full_generator import convert_generator
    from flipad_jax.generators import Generator

    folder = work / "generators" / name
    if not folder.exists():
        convert_generator(weights / f"{name}.safetensors", folder, arch=arch_of(name),
                          arch_options=GEN_OPTIONS)
    return Generator.load(folder)


def sminv_scores(weights: Path, work: Path, g: str, train, tests: dict, settings,
                 progress: bool) -> tuple[dict, dict]:
    """SM-Inv₂ of G on the demo's subset: ``(thresholds {fnr: τ}, {source: scores (m,)})``.

    Args:
      train: G's training images ``(n, C, H, W)``, n ≥ ``settings.sminv_n_thr``.
      tests: source → its test images ``(n_s, C, H, W)``, n_s ≥ ``settings.sminv_n_test``.
    """
    from flipad_jax import metrics, report
    from flipad_jax._files import atomic_file
    from flipad_jax.detector import DEFAULT_FNRS
    from flipad_jax.sminv import BATCH_SIZE, SMInv2

    m = settings.sminv_n_test
    path = work / "sminv2" / f"{g}.npz"
    if not path.exists():
        # batches of m images: every test set fills whole batches, one compilation per G
        det = SMInv2(_generator(weights, work, g), restarts=settings.sminv_restarts,
                     steps=settings.sminv_steps, batch_size=min(m, BATCH_SIZE),
                     fnrs=DEFAULT_FNRS, seed=settings.seed, progress=progress)
        start = time.perf_counter()
        det.fit(train[:settings.sminv_n_thr])
        scores = np.split(det.anomaly_score(np.concatenate([x[:m] for x in tests.values()])),
                          len(tests))
        report.write_json(work / "costs" / f"{KIND}_{g}.json",
                          {"invert_s": time.perf_counter() - start,
                           "invert_n": settings.sminv_n_thr + m * len(tests)})
        with atomic_file(path, suffix=".npz") as tmp:
            np.savez(tmp, **{CALIBRATION: det.train_scores_}, **dict(zip(tests, scores)))
    with np.load(path, allow_pickle=False) as npz:
        scores = {k: npz[k] for k in npz.files}
    calibration = scores.pop(CALIBRATION)
    return {fnr: metrics.threshold(calibration, fnr) for fnr in DEFAULT_FNRS}, scores

