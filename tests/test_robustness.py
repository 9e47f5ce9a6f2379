"""`flipad robustness`: the paper's Table 3 / Table 13 on the demo's GANs."""

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from converters.demo import DemoSettings  # noqa: E402
from converters.robustness import (METHODS, PIXEL_RANGE, _pixels,  # noqa: E402
                                   add_robustness_parser, parse_perturbations, perturbed_sets,
                                   run_robustness)
from flipad_jax.datasets import DEFAULT_FASHION_MNIST  # noqa: E402
from flipad_jax.detector import Detector  # noqa: E402
from flipad_jax.images import load_images, pixels_to_range  # noqa: E402
from flipad_jax.perturbations import PAPER_PERTURBATIONS, Perturbation  # noqa: E402

pytestmark = pytest.mark.torch
HAVE_DATA = Path(DEFAULT_FASHION_MNIST).is_dir()
TINY = DemoSettings(n_train=64, n_val=200, n_test=16, zbar_samples=256, epochs=1, max_iter=5)
NAMES = [p.name for p in PAPER_PERTURBATIONS]


def test_pixels_are_the_png_bytes(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 32, 32), dtype=np.uint8)
    images[0, 0], images[0, 1] = 0, 255  # both ends of the scale
    for i, img in enumerate(images):
        Image.fromarray(img).save(tmp_path / f"{i:06d}.png")
    decoded = load_images(tmp_path, PIXEL_RANGE)
    np.testing.assert_array_equal(_pixels(decoded), images[:, None])
    with pytest.raises(ValueError, match="outside"):
        _pixels(decoded * 1.01)


def test_perturbed_sets_decode_and_seed_noise_by_name():
    px = np.random.default_rng(1).integers(0, 256, (4, 1, 8, 8), dtype=np.uint8)
    clean = {"a": {"train": px}, "b": {"train": px.copy()}}
    same = perturbed_sets(clean, Perturbation("blur", 1), seed=0)  # blur 1 is the identity
    np.testing.assert_array_equal(same["a"]["train"], pixels_to_range(px, PIXEL_RANGE))
    noise = Perturbation("noise", 0.1)
    one, two = perturbed_sets(clean, noise, 0), perturbed_sets(clean, noise, 0)
    np.testing.assert_array_equal(one["a"]["train"], two["a"]["train"])  # seeded
    assert not np.array_equal(one["a"]["train"], one["b"]["train"])  # per-name noise
    # the first images of a longer set get the same noise: it depends on the name, not the set
    short = perturbed_sets({"a": {"train": px[:2]}}, noise, 0)
    np.testing.assert_array_equal(short["a"]["train"], one["a"]["train"][:2])
    assert not np.array_equal(perturbed_sets(clean, noise, 1)["a"]["train"], one["a"]["train"])


def test_perturbation_lists():
    assert parse_perturbations(None) == PAPER_PERTURBATIONS
    assert [p.name for p in parse_perturbations(["jpeg=80", "blur=3"])] == ["jpeg_80", "blur_3"]
    with pytest.raises(ValueError, match="'sharpen'"):
        parse_perturbations(["sharpen=2"])
    with pytest.raises(ValueError, match="blur=2"):
        parse_perturbations(["blur=2"])
    with pytest.raises(ValueError, match="blur_3 given more than once"):
        parse_perturbations(["blur=3", Perturbation("blur", 3)])
    with pytest.raises(ValueError, match="at least one"):
        parse_perturbations([])


def _cli(argv):
    parser = argparse.ArgumentParser()
    add_robustness_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["robustness", *argv])
    return args.func(args)


def test_bad_input_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="'warp'"):
        _cli(["--out", str(tmp_path / "new"), "--perturbations", "warp=3", "--quiet"])
    with pytest.raises(ValueError, match="jpeg=99"):
        run_robustness(tmp_path / "new", perturbations=["jpeg=99"], settings=TINY,
                       progress=False)
    assert not (tmp_path / "new").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not a robustness folder"):
        run_robustness(other, settings=TINY, progress=False)
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_DATA, reason="Debian's dataset-fashion-mnist is not installed "
                                          "(CI installs it)")
def test_end_to_end_shape_and_rerun_reuses_every_stage(tmp_path, monkeypatch):
    out = tmp_path / "rob"
    results = run_robustness(out, settings=TINY, progress=False)
    assert list(results["perturbations"]) == NAMES  # the paper's order (the file sorts keys)
    on_disk = json.loads((out / "robustness.json").read_text())
    assert on_disk["fnr"] == 0.005
    for key, fields in (("perturbations", {"accuracy", "auc"}), ("accuracy_fnr_0.05", None)):
        table = on_disk[key]
        assert set(table) == set(NAMES)
        for cells in table.values():
            assert set(cells) == set(METHODS) == {"flipad", "rawpad", "dctpad", "sm_f"}
            for cell in cells.values():
                values = [cell] if fields is None else [cell[f] for f in fields]
                assert fields is None or set(cell) == fields
                assert all(0.0 <= v <= 1.0 for v in values)
    # 8 perturbations × 4 G × 4 methods, each G against real and the 3 other families
    assert len(on_disk["pairs"]) == 8 * 4 * 4 * 4
    assert on_disk["timings_s"]["fit flipad"] > 0
    markdown = (out / "robustness.md").read_text()
    assert "fnr 0.005" in markdown and "fnr 0.05" in markdown
    assert all(f"| {n} " in markdown for n in NAMES)

    def refuse(*args, **kwargs):
        raise AssertionError("a stage ran again")

    with monkeypatch.context() as m:  # every cell's records are reused: nothing fitted or scored
        m.setattr(Detector, "fit", refuse)
        m.setattr(Detector, "anomaly_score", refuse)
        again = run_robustness(out, settings=TINY, progress=False)
    assert again["perturbations"] == results["perturbations"]

    # a cell whose records were lost is scored again with its saved detector, not refitted
    (out / "work" / "records" / "jpeg_80" / "sm_f_lsgan.json").unlink()
    scored = []
    original = Detector.anomaly_score
    monkeypatch.setattr(Detector, "fit", refuse)
    monkeypatch.setattr(Detector, "anomaly_score",
                        lambda self, *a, **k: scored.append(1) or original(self, *a, **k))
    run_robustness(out, settings=TINY, progress=False)
    assert len(scored) == 5  # G, real and the 3 other families

    with pytest.raises(ValueError, match="other settings"):
        run_robustness(out, settings=TINY._replace(epochs=2), progress=False)
