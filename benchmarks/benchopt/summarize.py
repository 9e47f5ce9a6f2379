"""Turn a ``benchopt run`` result (parquet) into the recorded files of benchmarks/results/benchopt/.

Suboptimality is relative, (P − P̂)/P̂, where P̂ is the lowest batch-mean objective any solver
reached on that dataset (an estimate of the optimum, so the best solver's last point reads 0).
Writes ``curves.csv`` (dataset, solver, sampling strategy, stop_val — iterations, or the
tolerance for the scikit-learn style solvers — seconds, objective, suboptimality),
``time_to_suboptimality.csv`` (per dataset and solver, the first run in order of effort whose
suboptimality is ≤ each threshold, its stop_val and seconds; empty where never reached) and
``suboptimality.png`` (suboptimality against time, one panel per dataset), and prints the
threshold table as markdown.

    python benchmarks/benchopt/summarize.py benchmarks/benchopt/outputs/RUN.parquet \
        benchmarks/results/benchopt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

THRESHOLDS = (1e-2, 1e-4, 1e-6)


def curves(results: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, solver, run): the columns this summary needs, with suboptimality."""
    out = pd.DataFrame({"dataset": results["dataset_name"], "solver": results["solver_name"],
                        "strategy": results["sampling_strategy"], "stop_val": results["stop_val"], "seconds": results["time"],
                        "objective": results["objective_value"]})
    best = out.groupby("dataset")["objective"].transform("min")
    out["suboptimality"] = (out["objective"] - best) / best
    # runs in order of effort: more iterations, or a smaller tolerance
    out["effort"] = np.where(out["strategy"] == "tolerance", -out["stop_val"], out["stop_val"])
    return out.sort_values(["dataset", "solver", "effort"]).drop(columns="effort").reset_index(drop=True)


def time_to(curve: pd.DataFrame, thresholds=THRESHOLDS) -> pd.DataFrame:
    rows = []
    for (dataset, solver), runs in curve.groupby(["dataset", "solver"], sort=True):
        row = {"dataset": dataset, "solver": solver}
        for thr in thresholds:
            reached = runs[runs["suboptimality"] <= thr]
            first = reached.iloc[0] if len(reached) else None
            row[f"stop_val@{thr:g}"] = None if first is None else float(first["stop_val"])
            row[f"seconds@{thr:g}"] = None if first is None else float(first["seconds"])
        rows.append(row)
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame, thresholds=THRESHOLDS) -> str:
    head = "| dataset | solver | " + " | ".join(f"≤ {t:g}" for t in thresholds) + " |"
    lines = [head, "|---|---|" + "---|" * len(thresholds)]
    for _, row in table.iterrows():
        cells = []
        for t in thresholds:
            s = row[f"seconds@{t:g}"]
            cells.append("not reached" if pd.isna(s) else f"{s:.3g} s")
        lines.append(f"| {row['dataset']} | {row['solver']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(curve: pd.DataFrame, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted(curve["dataset"].unique())
    colours = {s: f"C{i}" for i, s in enumerate(sorted(curve["solver"].unique()))}
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4.2), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for solver, runs in curve[curve["dataset"] == dataset].groupby("solver"):
            # a run at 0 iterations takes ~0 s: start the log axis at the first timed run
            runs = runs[runs["seconds"] > 0]
            ax.loglog(runs["seconds"], np.maximum(runs["suboptimality"], 1e-10), ".-",
                      color=colours[solver], label=solver)
        ax.set_title(dataset, fontsize=8)
        ax.set_xlabel("seconds")
        ax.set_ylabel("relative suboptimality (floor 1e-10)")
        ax.grid(True, which="major", alpha=0.3)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=len(colours),
               fontsize=7)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110, format="png")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("parquet", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    from flipad_jax._files import atomic_file

    curve = curves(pd.read_parquet(args.parquet))
    table = time_to(curve)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, frame in (("curves.csv", curve), ("time_to_suboptimality.csv", table)):
        with atomic_file(args.out / name) as tmp:
            frame.to_csv(tmp, index=False, float_format="%.6g")
    with atomic_file(args.out / "suboptimality.png") as tmp:
        plot(curve, Path(tmp))
    print(markdown(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
