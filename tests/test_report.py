"""The demo's report: summaries against hand-computed means, tables, and the figures' pixels."""

import numpy as np
from PIL import Image

from flipad_jax import report
from flipad_jax.report import _CMAP


def _records():
    rows = [("flipad", "g1", "real", 1.0, 0.99), ("flipad", "g1", "g2", 0.9, 0.95),
            ("flipad", "g2", "real", 0.8, 0.90), ("rawpad", "g1", "real", 0.6, 0.5)]
    return [{"method": m, "model": g, "other": o, "auc": auc, "acc@fnr=0.005": acc,
             "acc@fnr=0.05": acc} for m, g, o, auc, acc in rows]


def test_summary_averages_over_every_pair():
    s = report.summarize(_records())
    assert s["flipad"] == {"accuracy": np.mean([0.99, 0.95, 0.90]),
                           "auc": np.mean([1.0, 0.9, 0.8]), "pairs": 3}
    assert s["rawpad"] == {"accuracy": 0.5, "auc": 0.6, "pairs": 1}


def test_tables_hold_means_over_others_and_per_pair_values():
    md = report.tables_markdown({"Table 1": _records()})
    assert "| flipad | 97.00 | 90.00 |" in md          # g1: mean(99, 95); g2: 90
    assert "| flipad | 95.00 | 80.00 |" in md          # AUC
    assert "g1 vs real | g1 vs g2 | g2 vs real" in md  # Table 8 layout
    assert "per pair" not in report.tables_markdown({"T": _records()}, per_pair=False)
    two = report.tables_markdown({"T": _records()}, fnrs=(0.005, 0.05))
    assert "accuracy (%) at fnr 0.05" in two


def test_colorize_maps_the_ends_to_the_colour_map_ends():
    c = report.colorize(np.array([[0.0, 0.5, 1.0, 7.0]]), 0.0, 1.0)
    np.testing.assert_array_equal(c[0, 0], _CMAP[0])
    np.testing.assert_array_equal(c[0, 2], _CMAP[-1])
    np.testing.assert_array_equal(c[0, 3], _CMAP[-1])  # above the range: clipped for display
    np.testing.assert_array_equal(c[0, 1], _CMAP[2])


def test_feature_figure_panels_show_each_sources_mean(tmp_path):
    zbar = np.zeros((4, 2, 2))
    means = {"g": np.ones((4, 2, 2)), "real": np.full((4, 2, 2), 2.0)}
    path = report.feature_figure(tmp_path / "f.png", zbar, means, [1, 3], cell=10)
    img = np.asarray(Image.open(path).convert("RGB"))
    label_w, head_h, pad = 70, 34, 6
    row = head_h + 5
    left = [img[row, label_w + j * (10 + pad) + 5] for j in range(3)]
    np.testing.assert_array_equal(left[0], _CMAP[0])   # z̄ = 0, the row's minimum
    np.testing.assert_array_equal(left[2], _CMAP[-1])  # real = 2, the row's maximum
    assert not list(tmp_path.glob(".*"))                # no temporary file left behind


def test_histogram_figure_draws_every_source(tmp_path):
    rng = np.random.default_rng(0)
    scores = {"g": rng.lognormal(0, 1, 100), "real": rng.lognormal(3, 1, 100)}
    path = report.histogram_figure(tmp_path / "h.png", scores, {0.005: 10.0}, size=(400, 240))
    img = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    for colour in report._PALETTE[:2]:
        assert (img == colour).all(axis=1).sum() > 50, colour


def test_write_json_is_atomic_and_sorted(tmp_path):
    path = report.write_json(tmp_path / "r.json", {"b": 1, "a": [1.5]})
    assert path.read_text() == '{\n  "a": [\n    1.5\n  ],\n  "b": 1\n}\n'
