"""The demo's report: tables (Markdown and JSON), ``results.json`` and figures as PNG.

Figures are drawn with Pillow alone (no plotting library is a dependency):

* :func:`feature_figure` — the paper's Fig. 4: for a generator G, rows of its top channels (most
  different between G's and real images' mean features), columns z̄ and then the mean inverted
  features of each source, all in one colour scale per row.
* :func:`histogram_figure` — score histograms per source (log10 of the DeepSAD score) with the
  thresholds τ(fnr) marked.

Files are written whole to a temporary name and moved into place (:func:`write_text`,
:func:`save_png`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from flipad_jax._files import atomic_dir, atomic_file
from flipad_jax.metrics import attribution_table

# Anchor colours of a perceptually ordered map (dark blue → green → yellow), interpolated.
_CMAP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]],
                 np.float64)
# Distinguishable line colours for sources in histograms.
_PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (127, 127, 127)]


def write_text(path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def save_png(image, path) -> Path:
    """Save a Pillow image to ``path`` atomically."""
    with atomic_file(path, suffix=".png") as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


# -- numbers ------------------------------------------------------------------------------------

def summarize(records: Sequence[dict], fnr: float = 0.005) -> dict:
    """Per method, accuracy at ``fnr`` and AUC averaged over all (G, G′) records.

    Args:
      records: rows of :func:`flipad_jax.metrics.evaluate` with ``method`` and ``model`` added.

    Returns:
      ``{method: {"accuracy": mean acc, "auc": mean AUC, "pairs": count}}``.
    """
    key = f"acc@fnr={fnr:g}"
    out: dict = {}
    for rec in records:
        m = out.setdefault(rec["method"], {"accuracy": [], "auc": []})
        m["accuracy"].append(float(rec[key]))
        m["auc"].append(float(rec["auc"]))
    return {name: {"accuracy": float(np.mean(v["accuracy"])), "auc": float(np.mean(v["auc"])),
                   "pairs": len(v["auc"])} for name, v in out.items()}


def tables_markdown(sections: Mapping[str, Sequence[dict]], fnrs: Sequence[float] = (0.005,),
                    per_pair: bool = True) -> str:
    """Markdown with, per section (e.g. "Table 1") and per metric (accuracy at each fnr, AUC),
    the table of means over G′ (the paper's Table 1 layout) and, with ``per_pair``, the table of
    each (G, G′) pair (its Table 8 layout)."""
    metrics = [(f"acc@fnr={f:g}", f"accuracy (%) at fnr {f:g}") for f in fnrs]
    parts = []
    for title, records in sections.items():
        for key, name in metrics + [("auc", "AUC (%)")]:
            parts += [f"### {title}: {name}, mean over G′", "",
                      attribution_table(records, value=key), ""]
            if per_pair:
                parts += [f"### {title}: {name} per pair (G vs G′)", "",
                          attribution_table(records, value=key, per_other=True), ""]
    return "\n".join(parts)


def evaluation_report(records: Sequence[dict], thresholds: Mapping[float, float], *, title: str,
                      meta: dict, out=None, overwrite: bool = False) -> tuple[str, bool]:
    """``flipad evaluate``'s report: the Markdown table of ``records`` (rows of
    :func:`flipad_jax.metrics.evaluate` with method and model) and, if ``out`` is given, the
    folder ``out`` with ``table.md`` and ``records.json`` (``meta``, the thresholds and the
    records), written atomically. Returns ``(table, written)``."""
    table = tables_markdown({title: records}, sorted(thresholds))
    if out is None:
        return table, False
    content = dict(meta, thresholds={f"{f:g}": t for f, t in sorted(thresholds.items())},
                   records=list(records))
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / "table.md").write_text(table + "\n")
        (tmp / "records.json").write_text(json.dumps(content, indent=2) + "\n")
    return table, True


def write_json(path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


# -- drawing ------------------------------------------------------------------------------------

def colorize(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """``(H, W)`` floats → ``(H, W, 3)`` uint8 through the colour map on [low, high]."""
    t = np.clip((np.asarray(values, np.float64) - low) / max(high - low, 1e-12), 0.0, 1.0)
    pos = t * (len(_CMAP) - 1)
    i = np.minimum(pos.astype(int), len(_CMAP) - 2)
    frac = (pos - i)[..., None]
    return np.rint(_CMAP[i] * (1 - frac) + _CMAP[i + 1] * frac).astype(np.uint8)


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def feature_figure(path, zbar: np.ndarray, means: Mapping[str, np.ndarray],
                   channels: Sequence[int], *, title: str = "", cell: int = 96) -> Path:
    """The paper's Fig. 4 as a PNG grid (:func:`feature_image` saved to ``path``)."""
    return save_png(feature_image(zbar, means, channels, title=title, cell=cell), path)


def feature_image(zbar: np.ndarray, means: Mapping[str, np.ndarray], channels: Sequence[int],
                  *, title: str = "", cell: int = 96):
    """The paper's Fig. 4 as a Pillow image.

    Args:
      zbar: ``(C, H, W)`` mean activation of G before its last layer (same pooling as means).
      means: source name → ``(C, H, W)`` mean inverted features of that source's images.
      channels: channel indices, one row each.
      cell: pixel size of one panel.
    """
    from PIL import Image, ImageDraw

    # "zbar", not z̄: Pillow's default font has no combining macron.
    columns = [("zbar", np.asarray(zbar))] + [(k, np.asarray(v)) for k, v in means.items()]
    label_w, head_h, pad = 70, 34, 6
    width = label_w + len(columns) * (cell + pad)
    height = head_h + len(channels) * (cell + pad) + 4
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = _font()
    draw.text((4, 2), title, fill="black", font=font)
    for j, (name, _) in enumerate(columns):
        draw.text((label_w + j * (cell + pad), 18), name[:16], fill="black", font=font)
    for i, c in enumerate(channels):
        stack = np.stack([a[c] for _, a in columns])
        low, high = float(stack.min()), float(stack.max())
        y = head_h + i * (cell + pad)
        draw.text((4, y + cell // 2 - 12), f"channel {c}", fill="black", font=font)
        draw.text((4, y + cell // 2), f"[{low:.2g},{high:.2g}]", fill="gray", font=font)
        for j, panel in enumerate(stack):
            tile = Image.fromarray(colorize(panel, low, high)).resize((cell, cell),
                                                                      Image.NEAREST)
            img.paste(tile, (label_w + j * (cell + pad), y))
    return img


def histogram_figure(path, scores: Mapping[str, np.ndarray], thresholds: Mapping[float, float],
                     *, title: str = "", bins: int = 40, size=(640, 360)) -> Path:
    """Histograms of log10 scores per source (outlines), thresholds as dashed vertical lines."""
    from PIL import Image, ImageDraw

    logs = {k: np.log10(np.maximum(np.asarray(v, np.float64), 1e-30)) for k, v in scores.items()}
    taus = {f: np.log10(max(t, 1e-30)) for f, t in thresholds.items()}
    lo = min(min(v.min() for v in logs.values()), *taus.values())
    hi = max(max(v.max() for v in logs.values()), *taus.values())
    if hi <= lo:
        hi = lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    counts = {k: np.histogram(v, edges)[0] / len(v) for k, v in logs.items()}
    top = max(c.max() for c in counts.values()) or 1.0

    w, h = size
    left, right, top_m, bottom = 50, 150, 28, 36
    pw, ph = w - left - right, h - top_m - bottom
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = _font()

    def x_of(v):
        return left + (v - lo) / (hi - lo) * pw

    def y_of(c):
        return top_m + ph - c / top * ph

    draw.rectangle([left, top_m, left + pw, top_m + ph], outline="black")
    draw.text((4, 4), title, fill="black", font=font)
    for t in np.linspace(lo, hi, 5):
        draw.line([x_of(t), top_m + ph, x_of(t), top_m + ph + 4], fill="black")
        draw.text((x_of(t) - 12, top_m + ph + 6), f"{t:.1f}", fill="black", font=font)
    draw.text((left + pw // 2 - 60, h - 14), "log10 DeepSAD score", fill="black", font=font)
    for n, (name, c) in enumerate(counts.items()):
        color = _PALETTE[n % len(_PALETTE)]
        pts = [(x_of(edges[0]), y_of(0))]
        for k in range(bins):
            pts += [(x_of(edges[k]), y_of(c[k])), (x_of(edges[k + 1]), y_of(c[k]))]
        pts.append((x_of(edges[-1]), y_of(0)))
        draw.line(pts, fill=color, width=2)
        draw.line([left + pw + 10, top_m + 8 + 16 * n, left + pw + 30, top_m + 8 + 16 * n],
                  fill=color, width=3)
        draw.text((left + pw + 34, top_m + 2 + 16 * n), name[:16], fill="black", font=font)
    for m, (fnr, t) in enumerate(sorted(taus.items())):
        x = x_of(t)
        for y in range(top_m, top_m + ph, 8):
            draw.line([x, y, x, min(y + 4, top_m + ph)], fill="black", width=1)
        draw.text((x + 3, top_m + 2 + 12 * m), f"tau@{fnr:g}", fill="black", font=font)
    return save_png(img, path)
