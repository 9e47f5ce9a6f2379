"""The evidence report's one self-contained HTML page (no external assets: inline CSS, figures
as ``data:`` URIs of PNGs drawn with Pillow).

Per sample: the image, its score against the histogram of G's validation scores (thresholds
dashed), for FLIPAD its inverted activations beside z̄ on the channels that matter (the
detector's selected channels, else those where the sample departs most from z̄; the paper's
Fig. 4 for one image), and the record's numbers.
"""

from __future__ import annotations

import base64
import html
import io
import json

import numpy as np

from flipad_jax.report import feature_image

FIGURE_CHANNELS = 4
_STYLE = """
body{font-family:sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:2px 8px;text-align:left;font-size:90%}
.sample{border-top:2px solid #444;margin-top:2em;padding-top:.5em}
.figs img{margin-right:1em;vertical-align:top}
.g{color:#1a7f37;font-weight:bold}.not{color:#b42318;font-weight:bold}
code{font-size:85%;word-break:break-all}
"""


def _data_uri(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _image_tile(x: np.ndarray, output_range, size: int = 128):
    """``(C, H, W)`` decoded image → 8-bit Pillow image (min–max scaled without a range)."""
    from PIL import Image

    x = np.asarray(x, np.float64)
    low, high = output_range if output_range is not None else (x.min(), x.max() + 1e-12)
    pixels = np.rint(np.clip((x - low) / (high - low), 0.0, 1.0) * 255).astype(np.uint8)
    img = Image.fromarray(pixels[0] if len(pixels) == 1 else pixels[:3].transpose(1, 2, 0))
    scale = max(1, size // max(img.size))
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def score_image(val_scores, score: float, thresholds: dict, *, bins: int = 30,
                size=(420, 200)):
    """Histogram of G's validation scores (grey), thresholds τ(fnr) dashed, the sample's score
    as a red line; linear score axis (SM-F scores may be negative)."""
    from PIL import Image, ImageDraw, ImageFont

    v = np.asarray(val_scores, np.float64)
    lo = min(v.min(), score, *thresholds.values())
    hi = max(v.max(), score, *thresholds.values())
    if hi <= lo:
        hi = lo + 1.0
    lo, hi = lo - 0.02 * (hi - lo), hi + 0.02 * (hi - lo)
    counts, edges = np.histogram(v, np.linspace(lo, hi, bins + 1))
    w, h = size
    left, right, top, bottom = 10, 10, 22, 30
    pw, ph = w - left - right, h - top - bottom
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()

    def x_of(s):
        return left + (s - lo) / (hi - lo) * pw

    peak = max(int(counts.max()), 1)
    for c, a, b in zip(counts, edges[:-1], edges[1:]):
        if c:
            draw.rectangle([x_of(a), top + ph - c / peak * ph, x_of(b) - 1, top + ph],
                           fill=(170, 170, 170))
    draw.line([left, top + ph, left + pw, top + ph], fill="black")
    for t in np.linspace(lo, hi, 5):
        draw.text((min(max(x_of(t) - 14, 2), w - 44), top + ph + 6), f"{t:.3g}", fill="black",
                  font=font)
    for fnr, tau in sorted(thresholds.items()):
        for y in range(top, top + ph, 6):
            draw.line([x_of(tau), y, x_of(tau), min(y + 3, top + ph)], fill="black")
    draw.line([x_of(score), top - 4, x_of(score), top + ph], fill=(200, 30, 30), width=3)
    draw.text((4, 4), f"validation scores of G (n={len(v)}), this sample in red, "
                      "tau dashed", fill="black", font=font)
    return img


def _channels(z: np.ndarray, zbar: np.ndarray, selected) -> list:
    if selected:
        return [int(c) for c in selected[:FIGURE_CHANNELS]]
    departure = np.abs(z - zbar).reshape(len(z), -1).mean(axis=1)
    return np.argsort(-departure, kind="stable")[:FIGURE_CHANNELS].tolist()


def _rows(pairs) -> str:
    return "".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in pairs)


def _sample_html(rec: dict, x, z, detector) -> str:
    esc = html.escape
    verdicts = "".join(
        f"<tr><td>{d['fnr']:g}</td><td>{d['threshold']:.6g}</td><td>{d['realised_fnr']:.4g}"
        f"</td><td class={'g' if d['made_by_g'] else 'not'}>"
        f"{'made by G' if d['made_by_g'] else 'not made by G'}</td></tr>"
        for d in rec["decisions"])
    figs = [_image_tile(x, rec["input"]["output_range"]),
            score_image(detector.val_scores_, rec["score"], detector.thresholds_)]
    if z is not None and np.ndim(z) == 3:
        zbar = np.asarray(detector.head.zbar)
        figs.append(feature_image(zbar, {"this image": z},
                                  _channels(z, zbar, detector.channels_),
                                  title="inverted activations vs zbar", cell=72))
    cert = rec["certificate"]
    cert_html = "" if cert is None else "<h4>Lasso certificate</h4><table>" + _rows(
        (k, esc(str(cert[k]))) for k in ("lam", "objective", "gap", "kkt", "iterations",
                                         "status", "clipped")) + "</table>"
    return (f"<div class=sample><h3>{esc(rec['image']['name'])}</h3>"
            f"<p>image SHA-256 <code>{esc(rec['image']['sha256'])}</code></p>"
            "<div class=figs>" + "".join(f"<img alt='' src='{_data_uri(f)}'>" for f in figs)
            + "</div><table>" + _rows([("score", f"{rec['score']:.6g}"),
                                       ("p-value", f"{rec['p_value']:.4g}")]) + "</table>"
            "<table><tr><th>fnr</th><th>threshold</th><th>realised fnr (validation)</th>"
            f"<th>verdict</th></tr>{verdicts}</table>{cert_html}</div>")


def render_page(records: list, panels: list, detector) -> str:
    """The page for ``records`` (one run's), with ``panels`` = per record ``(x, z)``: the
    decoded image ``(C, H, W)`` and FLIPAD's inverted activations (None otherwise)."""
    esc = html.escape
    first = records[0]
    det, bundle = first["detector"], first["bundle"]
    head = [("detector", f"<code>{esc(det['path'])}</code> ({esc(det['kind'])})"),
            ("detector SHA-256", f"<code>{det['sha256']}</code>")]
    if bundle is not None:
        source = bundle["source"] or {}
        head += [("bundle", f"<code>{esc(bundle['path'])}</code>"),
                 ("head.safetensors SHA-256", f"<code>{bundle['weights_sha256']}</code>"),
                 ("head.json SHA-256", f"<code>{bundle['meta_sha256']}</code>"),
                 ("source model SHA-256", f"<code>{esc(str(source.get('sha256')))}</code>")]
    head += [("command", f"<code>{esc(' '.join(first['command']))}</code>"),
             ("versions", f"<code>{esc(json.dumps(first['versions']))}</code>"),
             ("created", esc(first["created"]))]
    body = "".join(_sample_html(rec, x, z, detector) for rec, (x, z) in zip(records, panels))
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>FLIPAD evidence</title>"
            f"<style>{_STYLE}</style></head><body><h1>Attribution evidence</h1>"
            "<p>Scores are higher for images less likely made by G; an image is attributed to "
            "G where its score is at most the threshold of an fnr. The p-value is the chance, "
            "for an image of G, of a score at least this high. Check the JSON records with "
            "<code>flipad verify</code>.</p>"
            f"<table>{_rows(head)}</table>{body}</body></html>\n")
