"""Cost and quality of ``flipad demo``'s SM-Inv₂ stage at a preset's subset, on an existing run.

Runs :func:`converters.demo_sminv.sminv_scores` for each G with the SM-Inv₂ settings of the
default demo (or ``--preset``) on the PNG sets of a finished demo folder (``--work``: its
``work/``; the sets must hold at least the preset's ``sminv_n_thr`` training and ``sminv_n_test``
test images), into a fresh folder, and prints per G the CPU and wall seconds and the AUC and
accuracy at fnr 0.005 against each source. Real images are drawn as a demo with the source
run's sizes draws them. The source run's whole-generator bundles are reused (copied), so the
times are the inversions' alone, compilation included.

    python benchmarks/demo_sminv_cost.py --work /tmp/sminvdemo_q1/work --n-train 500 \
        --n-test 200 --into /tmp/sminv_full_cost/work
"""

import argparse
import json
import shutil
import time
from pathlib import Path

from converters.demo import FAMILIES, FULL, PAPER, QUICK, REAL, _real, _sources
from converters.demo_gans import WEIGHTS_DIR
from converters.demo_sminv import sminv_scores
from flipad_jax import metrics
from flipad_jax.images import load_images


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", required=True, help="a finished demo's work/ folder")
    p.add_argument("--n-train", type=int, required=True, help="that run's n_train")
    p.add_argument("--n-test", type=int, required=True, help="that run's n_test")
    p.add_argument("--into", required=True, help="a new folder for this run's stages")
    p.add_argument("--preset", choices=("quick", "full", "paper"), default="full")
    args = p.parse_args(argv)
    settings = {"quick": QUICK, "full": FULL, "paper": PAPER}[args.preset]
    src, work = Path(args.work), Path(args.into)
    real = _real(QUICK._replace(n_train=args.n_train, n_test=args.n_test), None)
    if (src / "generators").is_dir() and not (work / "generators").exists():
        shutil.copytree(src / "generators", work / "generators")

    def images(name: str, split: str):
        return real[split] if name == REAL else \
            load_images(src / "samples" / name / split, (-1.0, 1.0))

    for g in FAMILIES:
        shown = _sources(g)[1]
        cpu, wall = time.process_time(), time.perf_counter()
        thresholds, scores = sminv_scores(WEIGHTS_DIR, work, g, images(g, "train"),
                                          {s: images(s, "test") for s in shown}, settings, False)
        print(g, json.dumps({
            "cpu_s": round(time.process_time() - cpu, 1),
            "wall_s": round(time.perf_counter() - wall, 1),
            "auc": {s: round(metrics.roc_auc(scores[g], scores[s]), 4) for s in shown[1:]},
            "acc@0.005": {s: round(metrics.accuracy(scores[g], scores[s], thresholds[0.005]), 4)
                          for s in shown[1:]}}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
