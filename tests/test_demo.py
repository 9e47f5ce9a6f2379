"""The embedded default: GAN training (every family), the shipped weights, and `flipad demo`."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from converters.demo import (FAMILIES, FULL, METHODS, PAPER, PAPER_WIDTHS, QUICK,  # noqa: E402
                             _real, add_demo_parser, run_demo, settings_from_args,
                             table6_markdown)
from converters import demo_gans  # noqa: E402
from converters.demo_gans import (DEMO_MODELS, GEN_OPTIONS, RECORD_FILE, WEIGHTS_DIR,  # noqa: E402
                                  DemoModel, _pull_away, _Trainer, train_demo_generators,
                                  weights_fingerprint)
from converters.generators import build_generator  # noqa: E402
from converters.loading import load_generator  # noqa: E402
from flipad_jax.datasets import DEFAULT_FASHION_MNIST  # noqa: E402
from flipad_jax.detector import Detector  # noqa: E402
from flipad_jax.sminv import SMInv2  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tests.test_datasets import _fake_fashion, _idx_bytes  # noqa: E402

pytestmark = pytest.mark.torch
HAVE_DATA = Path(DEFAULT_FASHION_MNIST).is_dir()


def test_pull_away_term_closed_forms():
    assert float(_pull_away(torch.eye(4))) == pytest.approx(0.0)
    assert float(_pull_away(torch.ones(5, 3))) == pytest.approx(1.0)
    codes = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # cos 45° → squared cosine ½
    assert float(_pull_away(codes)) == pytest.approx(0.5)


@pytest.mark.slow
@pytest.mark.parametrize("arch", FAMILIES)
def test_every_family_trains_its_generator(arch):
    torch.manual_seed(0)
    gen = build_generator(arch, options=GEN_OPTIONS, seed=0)
    before = [p.detach().clone() for p in gen.parameters()]
    trainer = _Trainer(arch, gen, 16)
    real = torch.rand(16, 1, 32, 32) * 2 - 1
    g_steps = 0
    for step in range(5):
        d_loss, g_loss = trainer.step(real)
        assert np.isfinite(d_loss)
        g_steps += g_loss is not None
        changed = any(not torch.equal(a, b) for a, b in zip(before, gen.parameters()))
        # WGAN-GP: five critic steps per generator step; the others update G every step
        assert changed == (g_steps > 0)
    assert g_steps == (1 if arch == "wgangp" else 5)


def test_training_writes_loadable_weights_and_a_record(tmp_path):
    _fake_fashion(tmp_path / "fm", n=32)
    out = train_demo_generators(tmp_path / "w", data=tmp_path / "fm", batch=16, progress=False,
                                models=(DemoModel("tiny", "lsgan", 3, 1, init="torch",
                                                  betas=(0.5, 0.999)),))
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["models"]["tiny"]["seed"] == 3 and record["models"]["tiny"]["epochs"] == 1
    assert record["models"]["tiny"]["init"] == "torch"
    assert record["models"]["tiny"]["adam_betas"] == [0.5, 0.999]
    assert len(record["models"]["tiny"]["losses"]) == 1
    source = load_generator(out / "tiny.safetensors", arch="lsgan", arch_options=GEN_OPTIONS)
    assert source.model.latent_shape == (100,)
    with pytest.raises(ValueError, match="at least batch=128"):
        train_demo_generators(tmp_path / "w2", data=tmp_path / "fm", progress=False,
                              models=(DemoModel("tiny", "dcgan", 0, 1),))
    assert not (tmp_path / "w2").exists()


def test_shipped_weights_are_trained_and_recorded():
    record = json.loads((WEIGHTS_DIR / RECORD_FILE).read_text())
    for model in DEMO_MODELS:
        entry = record["models"][model.name]
        assert entry["command"].startswith("python -m converters.demo_gans")
        assert (entry["arch"], entry["seed"], entry["epochs"]) == (model.arch, model.seed,
                                                                   model.epochs)
        gen = load_generator(WEIGHTS_DIR / f"{model.name}.safetensors", arch=model.arch,
                             arch_options=GEN_OPTIONS).model
        variances = [m.running_var for m in gen.modules()
                     if isinstance(m, torch.nn.BatchNorm2d)]
        assert variances and not any(torch.allclose(v, torch.ones_like(v)) for v in variances)
    twins = [m for m in DEMO_MODELS if m.arch == "dcgan"]
    assert len({m.seed for m in twins}) == 2  # Table 2: the same architecture, another seed


def test_torch_init_keeps_pytorchs_defaults_and_dcgan_init_redraws_them():
    """init="torch" (the authors' WGAN-GP) leaves PyTorch's BatchNorm γ = 1, β = 0 and its
    uniform conv init; init="dcgan" draws γ ~ N(1, 0.02) and conv weights ~ N(0, 0.02)."""
    torch_init = build_generator("wgangp", options=GEN_OPTIONS, seed=2, init="torch")
    dcgan_init = build_generator("wgangp", options=GEN_OPTIONS, seed=2)
    bn = [m for m in torch_init.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn and all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in bn)
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in bn)
    bn = [m for m in dcgan_init.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert not any(torch.equal(m.weight, torch.ones_like(m.weight)) for m in bn)
    last = [m for m in torch_init.modules() if isinstance(m, torch.nn.ConvTranspose2d)][-1]
    fan_in = last.weight.shape[1] * last.weight[0, 0].numel()  # PyTorch's for ConvTranspose
    # kaiming_uniform(√5)
    assert float(last.weight.detach().abs().max()) <= 1 / np.sqrt(fan_in) + 1e-7
    last = [m for m in dcgan_init.modules() if isinstance(m, torch.nn.ConvTranspose2d)][-1]
    assert float(last.weight.detach().std()) == pytest.approx(0.02, rel=0.1)
    with pytest.raises(ValueError, match="init='xavier'"):
        build_generator("wgangp", options=GEN_OPTIONS, seed=2, init="xavier")


def test_generators_of_one_architecture_never_share_initial_weights():
    """DCGAN, WGAN-GP and EBGAN share the generator layers; from one seed they would start from
    the same weights and stay close after a few epochs, unlike independently trained models."""
    def shapes(model):
        gen = build_generator(model.arch, options=GEN_OPTIONS)
        return tuple(tuple(p.shape) for p in gen.parameters())

    by_shapes = {}
    for model in DEMO_MODELS:
        by_shapes.setdefault(shapes(model), []).append(model.seed)
    for seeds in by_shapes.values():
        assert len(seeds) == len(set(seeds)), seeds


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_DATA, reason="Debian's dataset-fashion-mnist is not installed "
                                          "(CI installs it)")
def test_quick_demo_end_to_end_quality_and_resume(tmp_path, monkeypatch):
    """`flipad demo --quick`, end to end: the README's claims on its tables, then a rerun."""
    out = tmp_path / "demo"
    results = run_demo(out, quick=True, progress=False)
    assert set(METHODS) == {"flipad", "rawpad", "dctpad", "sm_f"}
    assert set(results["methods"]) == {*METHODS, "sm_inv2"}
    for m in results["methods"].values():
        assert 0.0 <= m["accuracy"] <= 1.0 and 0.0 <= m["auc"] <= 1.0
        assert m["pairs"] == len(FAMILIES) * len(FAMILIES)  # each G vs real and 3 other Gs
    # FLIPAD tells every G from real images (mean AUC ≥ 0.99) and is the best method on average
    # by the paper's measure, accuracy at fnr 0.005, and by AUC among the DeepSAD methods (SM-F's
    # mean AUC measured 88.0 and SM-Inv₂'s 96.7 against FLIPAD's 87.4 in the quick demo, their
    # accuracies 72.0 and 69.4 against 74.3).
    vs_real = [p["auc"] for p in results["pairs"] if p["method"] == "flipad"
               and p["other"] == "real"]
    assert len(vs_real) == len(FAMILIES) and np.mean(vs_real) >= 0.99, vs_real
    mean_acc = {method: m["accuracy"] for method, m in results["methods"].items()}
    assert max(mean_acc, key=mean_acc.get) == "flipad", mean_acc
    mean_auc = {method: m["auc"] for method, m in results["methods"].items()
                if method in ("flipad", "rawpad", "dctpad")}
    assert max(mean_auc, key=mean_auc.get) == "flipad", mean_auc
    # SM-Inv₂ (1 restart × 100 steps, 20 test images a source): G's own images reconstruct
    # closer than real ones for every G (measured AUC 0.935 to 0.995; 0.5 is chance)
    settings = results["settings"]
    assert (settings["sminv_n_thr"], settings["sminv_n_test"], settings["sminv_restarts"],
            settings["sminv_steps"]) == (200, 20, 1, 100)
    sminv_vs_real = [p["auc"] for p in results["pairs"] if p["method"] == "sm_inv2"
                     and p["other"] == "real"]
    assert len(sminv_vs_real) == len(FAMILIES) and min(sminv_vs_real) >= 0.9, sminv_vs_real
    assert {(p["model"], p["other"]) for p in results["table2"]["pairs"]} == {
        ("dcgan", "dcgan_seed1")}
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["methods"] == results["methods"]
    for g in FAMILIES:
        assert (out / f"fig4_{g}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        for method in results["methods"]:
            assert (out / f"hist_{method}_{g}.png").is_file()
        # SM-Inv₂ scored its subset only: 200 of G's training images, 20 test images a source
        with np.load(out / "work" / "sminv2" / f"{g}.npz") as npz:
            assert {k: len(npz[k]) for k in npz.files} == {
                "calibration": 200, "real": 20, **{f: 20 for f in FAMILIES},
                **({"dcgan_seed1": 20} if g == "dcgan" else {})}
    tables = (out / "tables.md").read_text()
    assert "Table 2" in tables and "Table 6 analog" in tables
    claims = results["claims"]["0.05"]  # the table of claims (flipad_jax.attribute)
    assert "Claims at α = 0.05" in tables and set(claims) == {"real", *FAMILIES}
    for g in FAMILIES:  # each G claims its own test images at about 1 − α (conformal validity)
        assert claims[g][g] >= 0.9 * claims[g]["n"], claims[g]
    assert "SM-Inv₂ on 20 test images per source, 1 restart × 100 steps" in tables
    # the Table-6 analog: every method's features and fit timed, SM-Inv₂'s inversion, per 1000
    assert set(results["timings_per_1000"]) == {*METHODS, "sm_inv2"}
    for method, cost in results["timings_per_1000"].items():
        keys = {"invert_s"} if method == "sm_inv2" else {"features_s", "fit_s"}
        assert set(cost) == keys and all(v > 0 for v in cost.values())
    assert "| sm_inv2 | inverting samples | not" not in tables
    assert results["peak_rss_mib"] > 0
    # PNG round trip: every generated set went through 8-bit files
    assert len(list((out / "work" / "samples" / "dcgan" / "val").glob("*.png"))) == QUICK.n_val

    # A rerun reuses every detector and SM-Inv₂'s scores: none is fitted, none rewritten.
    detectors = sorted([*(out / "work" / "detectors").rglob("*"),
                        *(out / "work" / "sminv2").rglob("*")])
    stamps = [p.stat().st_mtime_ns for p in detectors]

    def no_fit(*args, **kwargs):
        raise AssertionError("a detector was refitted on rerun")

    monkeypatch.setattr(Detector, "fit", no_fit)
    monkeypatch.setattr(SMInv2, "fit", no_fit)
    again = run_demo(out, quick=True, progress=False)
    assert sorted([*(out / "work" / "detectors").rglob("*"),
                   *(out / "work" / "sminv2").rglob("*")]) == detectors
    assert [p.stat().st_mtime_ns for p in detectors] == stamps
    assert again["pairs"] == results["pairs"]
    monkeypatch.undo()
    for change in (dict(epochs=2), dict(sminv_steps=50)):
        with pytest.raises(ValueError, match="other settings"):
            run_demo(out, settings=QUICK._replace(**change), progress=False)
    # New shipped weights (the same folder, other bytes) do not reuse the old weights' stages
    changed = tmp_path / "shipped_changed"
    shutil.copytree(WEIGHTS_DIR, changed)
    state = load_file(str(changed / "ebgan.safetensors"))
    save_file({k: v + 1e-3 if v.is_floating_point() else v for k, v in state.items()},
              str(changed / "ebgan.safetensors"))
    monkeypatch.setattr(demo_gans, "WEIGHTS_DIR", changed)
    with pytest.raises(ValueError, match="other settings"):
        run_demo(out, quick=True, progress=False)
    monkeypatch.undo()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file").write_text("x")
    with pytest.raises(ValueError, match="not a demo folder"):
        run_demo(tmp_path / "other", quick=True, progress=False)


def test_weights_fingerprint_follows_the_bytes_not_the_folder(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        folder.mkdir()
        (folder / "g.safetensors").write_bytes(b"12345")
    (b / "training.json").write_text("{}")  # not weights: ignored
    assert weights_fingerprint(a) == weights_fingerprint(b)
    (b / "g.safetensors").write_bytes(b"12346")
    assert weights_fingerprint(a) != weights_fingerprint(b)
    (b / "g.safetensors").rename(b / "h.safetensors")  # a renamed generator is another set
    (b / "h.safetensors").write_bytes(b"12345")
    assert weights_fingerprint(a) != weights_fingerprint(b)
    with pytest.raises(ValueError, match="no generator weights"):
        weights_fingerprint(tmp_path / "missing")


def _parse(*argv):
    import argparse
    parser = argparse.ArgumentParser()
    add_demo_parser(parser.add_subparsers())
    return parser.parse_args(["demo", *argv])


def test_size_flags_override_the_preset():
    assert settings_from_args(_parse("--paper-scale")) == PAPER
    assert (PAPER.n_train, PAPER.n_val, PAPER.n_test) == (10000, 1000, 1000)  # App. G.1
    assert PAPER_WIDTHS["flipad"] == (128, 256, 128) and PAPER.rep_dim == 128
    assert settings_from_args(_parse("--quick", "--n-train", "300", "--n-test", "50")) == \
        QUICK._replace(n_train=300, n_test=50)
    # SM-Inv₂ at paper scale: the paper's 10 restarts × 1000 steps, threshold on all of G's
    # training samples
    assert (PAPER.sminv_restarts, PAPER.sminv_steps, PAPER.sminv_n_thr, PAPER.sminv_n_test) == \
        (10, 1000, PAPER.n_train, PAPER.n_test)
    assert settings_from_args(_parse("--quick", "--sminv-steps", "7", "--sminv-n-test", "0")) \
        == QUICK._replace(sminv_steps=7, sminv_n_test=0)
    converged = settings_from_args(_parse("--quick", "--converged", "--real-train", "train"))
    assert (converged.tol, converged.real_train) == (1e-3, "train")
    assert settings_from_args(_parse("--seed", "2")) == FULL._replace(seed=2)
    with pytest.raises(SystemExit):
        _parse("--quick", "--paper-scale")


@pytest.mark.parametrize("change, message", [
    (dict(n_val=199), "n_val=199: expected at least 200"),
    (dict(n_train=0), "n_train=0"),
    (dict(n_test=2.5), "n_test=2.5"),
    (dict(n_train=9900, n_test=101), "n_train \\+ n_test .* = 10001: expected at most 10000"),
    (dict(n_train=60001, real_train="train"), "n_train = 60001: expected at most 60000"),
    (dict(real_train="val"), "real_train='val'"),
    (dict(sminv_n_thr=199), "sminv_n_thr=199: expected 200 .* to n_train=500"),
    (dict(sminv_n_thr=501), "sminv_n_thr=501: expected 200 .* to n_train=500"),
    (dict(sminv_n_test=201), "sminv_n_test=201: expected at most n_test=200"),
    (dict(sminv_n_test=-1), "sminv_n_test=-1"),
    (dict(sminv_steps=0), "sminv_steps=0"),
    (dict(seed=-1), "seed=-1"),
])
@pytest.mark.skipif(not HAVE_DATA, reason="Debian's dataset-fashion-mnist is not installed")
def test_bad_sizes_are_refused_before_anything_is_written(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        run_demo(tmp_path / "demo", settings=QUICK._replace(**change), progress=False)
    assert not (tmp_path / "demo").exists()


def test_table6_row_of_sminv_scales_its_cost_to_the_papers_settings():
    row = next(line for line in table6_markdown({"sm_inv2": {"invert_s": 2.5}}, QUICK)
               .splitlines() if line.startswith("| sm_inv2"))
    # 1 restart × 100 steps is 1/100 of the paper's 10 × 1000 latent updates per image
    assert row == ("| sm_inv2 | inverting samples | 2.50 at 1 × 100 (× 100 for the paper's "
                   "10 × 1000: 250) | 300.75 |")
    off = table6_markdown({}, QUICK._replace(sminv_n_test=0))
    assert "| sm_inv2 | inverting samples | not run (sminv_n_test = 0) |" in off


def test_real_training_images_come_from_the_named_split(tmp_path):
    import gzip
    folder = tmp_path / "fm"
    folder.mkdir()
    for stem, values in (("train", range(10, 16)), ("t10k", range(200, 204))):
        images = np.stack([np.full((28, 28), v, np.uint8) for v in values])
        (folder / f"{stem}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(images,
                                                                                      0x08)))
        (folder / f"{stem}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress(_idx_bytes(np.zeros(len(images), np.uint8), 0x08)))

    def pixels(x):  # the constant value of each image, back on the 0–255 scale
        return set(np.round((x[:, 0, 16, 16] + 1) * 127.5).astype(int).tolist())

    real = _real(QUICK._replace(n_train=5, n_test=3, real_train="train"), folder)
    assert len(real["train"]) == 5 and pixels(real["train"]) <= set(range(10, 16))
    assert len(real["test"]) == 3 and pixels(real["test"]) <= set(range(200, 204))
    real = _real(QUICK._replace(n_train=1, n_test=3), folder)  # both from the test split
    assert pixels(real["train"]) | pixels(real["test"]) == set(range(200, 204))
    with pytest.raises(ValueError, match="n_train \\+ n_test"):
        _real(QUICK._replace(n_train=2, n_test=3), folder)
