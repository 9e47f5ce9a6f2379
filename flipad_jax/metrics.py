"""Attribution metrics: thresholds, accuracy, TPR/TNR, AUC, realised FNR and the paper's tables.

Convention (the detector's): a score s is higher for samples *less* likely made by G; a sample is
attributed to G iff s ≤ τ. The positive class is G.

* τ(fnr) = the (1 − fnr) quantile of G's validation scores (linear interpolation, as
  ``torch.quantile`` and ``numpy.quantile``), so a fraction ≈ fnr of G's samples is rejected.
* accuracy (the paper's measure) on a test set of n G-samples and n G′-samples:
  (#{s_G ≤ τ} + #{s_G′ > τ}) / 2n. With unequal sizes we report the balanced accuracy
  (TPR + TNR) / 2, which equals it when the sizes match.
* AUC: P(s_G < s_G′) + ½ P(s_G = s_G′) (Mann–Whitney), as ``roc_auc_score(y, −s)``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Mapping, Sequence

import numpy as np


def check_fnr(fnr) -> float:
    """fnr as a float in the open interval (0, 1); ValueError otherwise."""
    if isinstance(fnr, bool) or not np.isscalar(fnr) or not 0.0 < float(fnr) < 1.0:
        raise ValueError(f"fnr={fnr!r}: expected a number in the open interval (0, 1)")
    return float(fnr)


def _scores(name, s):
    s = np.asarray(s, np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"{name} has shape {s.shape}: expected a non-empty (n,) array of scores")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{name} holds NaN/inf: expected finite scores")
    return s


def min_validation_samples(fnr: float) -> int:
    """Validation samples needed for τ(fnr): ⌈1/fnr⌉. The realised false-negative rate on the
    validation set moves in steps of 1/n, so with fewer samples no threshold can realise the
    requested fnr (n = 100 supports fnr = 0.05, the paper's Stable Diffusion setting, but not
    0.005)."""
    return int(np.ceil(1.0 / check_fnr(fnr) - 1e-9))


def threshold(val_scores, fnr: float) -> float:
    """τ = (1 − fnr) quantile of G's validation scores (linear interpolation)."""
    fnr = check_fnr(fnr)
    s = _scores("val_scores", val_scores)
    need = min_validation_samples(fnr)
    if s.size < need:
        raise ValueError(f"fnr={fnr}: {s.size} validation scores, expected at least {need} "
                         f"(⌈1/fnr⌉) for a (1 − fnr) quantile")
    return float(np.quantile(s, 1.0 - fnr))


def made_by_g(scores, tau: float) -> np.ndarray:
    """The verdict (paper eq. 7), written once: x is attributed to G iff s(x) ≤ τ. ``(n,)``
    bool."""
    return np.asarray(scores) <= tau


def p_values(val_scores, scores) -> np.ndarray:
    """Split-conformal p-values of "made by G": p(x) = (1 + #{v ≥ s(x)}) / (n_val + 1) over G's
    validation scores v, ``(n,)`` float64.

    For a sample of G exchangeable with the validation samples, P(p(x) ≤ α) ≤ α for every α,
    whatever the detector; rejecting "made by G" when p(x) ≤ α therefore has false-negative rate
    at most α. The threshold τ(fnr) rejects where s(x) > τ, i.e. roughly where p(x) < fnr (the
    two differ by the quantile's interpolation and the +1 of the conformal count).
    """
    v = np.sort(_scores("val_scores", val_scores))
    s = np.asarray(scores, np.float64)
    at_least = v.size - np.searchsorted(v, s, side="left")
    return (1.0 + at_least) / (v.size + 1.0)


def rates(scores_model, scores_other, tau: float) -> dict:
    """``tpr`` (G attributed to G), ``fnr`` = 1 − tpr, ``tnr`` (G′ rejected), ``fpr`` = 1 − tnr."""
    sg = _scores("scores_model", scores_model)
    so = _scores("scores_other", scores_other)
    tpr = float(np.mean(made_by_g(sg, tau)))
    tnr = float(np.mean(~made_by_g(so, tau)))
    return {"tpr": tpr, "fnr": 1.0 - tpr, "tnr": tnr, "fpr": 1.0 - tnr}


def accuracy(scores_model, scores_other, tau: float) -> float:
    """The paper's attribution accuracy at τ: (TPR + TNR)/2 (plain accuracy when balanced)."""
    r = rates(scores_model, scores_other, tau)
    return 0.5 * (r["tpr"] + r["tnr"])


def realised_fnr(val_scores, tau: float) -> float:
    """Fraction of G's (validation) scores above τ."""
    return float(np.mean(~made_by_g(_scores("val_scores", val_scores), tau)))


def roc_auc(scores_model, scores_other) -> float:
    """AUC of separating G (low scores) from G′ (high scores); ties count ½."""
    sg = _scores("scores_model", scores_model)
    so = _scores("scores_other", scores_other)
    both = np.concatenate([sg, so])
    order = np.argsort(both, kind="mergesort")
    ranks = np.empty(both.size, np.float64)
    sorted_vals = both[order]
    # midranks: each run of equal values gets the mean of its 1-based positions
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_vals)) + 1]
    ends = np.r_[starts[1:], both.size]
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = 0.5 * (a + b + 1)
    rank_other = ranks[sg.size:].sum()
    u = rank_other - so.size * (so.size + 1) / 2.0  # pairs with s_G′ above s_G
    return float(u / (sg.size * so.size))


def evaluate(scores_model, scores_others: Mapping[str, Sequence[float]],
             thresholds: Mapping[float, float]) -> list[dict]:
    """One record per G′: accuracy, TPR and TNR at each threshold, and the AUC.

    Args:
      scores_model: G's test scores.
      scores_others: G′ name → its test scores.
      thresholds: fnr → τ (e.g. ``detector.thresholds_``).

    Returns:
      ``[{"other": name, "auc": ..., "acc@fnr=0.005": ..., "tpr@fnr=0.005": ...,
      "tnr@fnr=0.005": ..., ...}, ...]``.
    """
    records = []
    for name, so in scores_others.items():
        rec = {"other": name, "auc": roc_auc(scores_model, so)}
        for fnr, tau in sorted(thresholds.items()):
            r = rates(scores_model, so, tau)
            rec[f"acc@fnr={fnr:g}"] = 0.5 * (r["tpr"] + r["tnr"])
            rec[f"tpr@fnr={fnr:g}"] = r["tpr"]
            rec[f"tnr@fnr={fnr:g}"] = r["tnr"]
        records.append(rec)
    return records


def attribution_table(records: Iterable[dict], *, value: str = "acc@fnr=0.005",
                      per_other: bool = False, scale: float = 100.0, digits: int = 2) -> str:
    """A Markdown table in the paper's layout from records with keys ``method``, ``model``,
    ``other`` and ``value`` (e.g. rows of :func:`evaluate` with method and model added).

    Table 1 (``per_other=False``): rows are methods, columns models G, each cell the mean over
    G′ and repetitions. Table 8 (``per_other=True``): one column per (G, G′) pair, the mean over
    repetitions.
    """
    cells = defaultdict(list)
    columns: list = []
    methods: list = []
    for rec in records:
        for key in ("method", "model", "other", value):
            if key not in rec:
                raise ValueError(f"record {rec!r}: expected a key {key!r}")
        col = (rec["model"], rec["other"]) if per_other else rec["model"]
        if col not in columns:
            columns.append(col)
        if rec["method"] not in methods:
            methods.append(rec["method"])
        cells[rec["method"], col].append(float(rec[value]))
    header = [" vs ".join(c) if per_other else c for c in columns]
    lines = ["| method | " + " | ".join(header) + " |",
             "|---|" + "---|" * len(columns)]
    for m in methods:
        row = [f"{scale * np.mean(cells[m, c]):.{digits}f}" if cells[m, c] else "–"
               for c in columns]
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    return "\n".join(lines)
