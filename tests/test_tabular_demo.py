"""The tabular demo end to end on tiny sizes: report shape, stage reuse, refused folders."""

import json

import numpy as np
import pytest

pytest.importorskip("torch")

from converters.tabular_demo import OTHERS, TabularSettings, run_tabular_demo  # noqa: E402
from flipad_jax.detector import Detector  # noqa: E402
from flipad_jax.sminv import SMInv2  # noqa: E402

# 200 validation rows: the fewest that realise fnr 0.005 (metrics.min_validation_samples).
# SM-Inv₂ calibrates on 200 of G's training rows, for the same reason.
TINY = TabularSettings(n_train=200, n_val=200, n_test=200, zbar_samples=200, epochs=1,
                       lasso_max_iter=200, sminv_rows=200, sminv_steps=5)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("tabular") / "demo"
    return out, run_tabular_demo(out, settings=TINY, progress=False)


@pytest.mark.slow
def test_results_have_the_image_demos_shape(demo):
    out, results = demo
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert results["datasets"] == ["redwine", "whitewine"]
    assert set(results["methods"]) == {"flipad", "rawpad", "sm_inv2"}
    for m in results["methods"].values():
        assert 0 <= m["accuracy"] <= 1 and 0 <= m["auc"] <= 1 and m["pairs"] == 6
    assert len(results["pairs"]) == 3 * 2 * len(OTHERS)
    for rec in results["pairs"]:
        assert rec["other"] in OTHERS and rec["model"] == f"klwgan_{rec['dataset']}"
        rates = [v for k, v in rec.items() if k == "auc" or k.startswith(("acc@", "tpr@", "tnr@"))]
        assert all(0 <= v <= 1 for v in rates)
    assert set(results["timings_s"]) >= {"convert", "sample", "fit flipad", "fit rawpad",
                                         "sm_inv2"}
    tables = (out / "tables.md").read_text()
    assert "Table 5 (Redwine)" in tables and "Table 15 (Whitewine)" in tables
    assert "91.18" in tables  # the paper's FLIPAD accuracy against TVAE beside ours


@pytest.mark.slow
def test_the_detectors_use_the_authors_settings(demo):
    out, _ = demo
    meta = json.loads((out / "work" / "detectors" / "flipad_whitewine" / "meta.json").read_text())
    features = meta["features"]
    assert (features["lam"], features["top_k"], features["standardize"]) == (1e-4, 100, None)
    assert (features["lasso"]["step"], features["lasso"]["tol"]) == (1e-3, 1e-4)
    assert len(meta["channels"]) == 100 and meta["feature_shape"] == [300]
    # RawPAD's rows are precomputed features: (11,) in, no image shape.
    raw = Detector.load(out / "work" / "detectors" / "rawpad_redwine", progress=False)
    assert raw.feature_shape_ == (11,) and raw.input_shape_ is None
    name, kwargs = raw.network_
    assert name == "mlp" and list(kwargs["hidden"]) == [512, 1024, 512, 256, 128]


@pytest.mark.slow
def test_a_rerun_reuses_every_stage(demo, monkeypatch):
    out, first = demo
    work = out / "work"
    stamps = {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file()
              and p.name != "settings.json"}

    def refit(*args, **kwargs):
        raise AssertionError("a detector was fitted again")

    monkeypatch.setattr(Detector, "fit", refit)
    monkeypatch.setattr(SMInv2, "fit", refit)
    again = run_tabular_demo(out, settings=TINY, progress=False)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    for a, b in zip(first["pairs"], again["pairs"]):
        assert a.keys() == b.keys()
        np.testing.assert_allclose([a[k] for k in a if k not in ("method", "model", "other",
                                                                 "dataset")],
                                   [b[k] for k in b if k not in ("method", "model", "other",
                                                                 "dataset")], atol=1e-6)


def test_refuses_a_folder_that_is_not_a_demo_run(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a tabular demo folder"):
        run_tabular_demo(tmp_path, settings=TINY, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_refuses_more_sminv2_rows_than_the_sets_have(tmp_path):
    with pytest.raises(ValueError, match="sminv_rows=300"):
        run_tabular_demo(tmp_path / "demo", settings=TINY._replace(sminv_rows=300),
                         progress=False)
    assert not (tmp_path / "demo").exists()


def test_refuses_unknown_datasets(tmp_path):
    with pytest.raises(ValueError, match="rosewine"):
        run_tabular_demo(tmp_path / "demo", settings=TINY._replace(datasets=("rosewine",)),
                         progress=False)


@pytest.mark.slow
def test_refuses_a_run_with_other_settings(demo):
    out, _ = demo
    with pytest.raises(ValueError, match="other settings"):
        run_tabular_demo(out, settings=TINY._replace(epochs=2), progress=False)


def test_cli_tabular_refuses_the_image_demo_s_options(capsys):
    from flipad_jax.cli import main

    assert main(["demo", "--tabular", "--paper-scale", "--n-train", "5"]) == 1
    err = capsys.readouterr().err
    assert "--tabular with --paper-scale, --n-train: expected none of the image demo" in err


@pytest.mark.slow
def test_reads_the_generators_folder_it_is_given(tmp_path):
    # Another run's generators: here the shipped ones with CopulaGAN's test rows replaced by
    # TVAE's, so every detector must score the two alike; the folder is part of the run's key.
    import shutil

    from converters.tabular_gans import (OUT_DIR, klwgan_weights, read_sdv_samples,
                                         sdv_samples_file)

    gens = tmp_path / "generators"
    gens.mkdir()
    shutil.copy(klwgan_weights(OUT_DIR, "redwine"), klwgan_weights(gens, "redwine"))
    sets = read_sdv_samples(sdv_samples_file(OUT_DIR, "redwine"))
    np.savez(sdv_samples_file(gens, "redwine"), **{**sets, "copulagan_test": sets["tvae_test"]})
    settings = TINY._replace(datasets=("redwine",), sminv_rows=0)
    results = run_tabular_demo(tmp_path / "demo", settings=settings, generators=gens,
                               progress=False)
    by = {(r["method"], r["other"]): r for r in results["pairs"]}
    for method in ("flipad", "rawpad"):
        assert by[(method, "copulagan")]["auc"] == by[(method, "tvae")]["auc"]
        assert by[(method, "copulagan")]["acc@fnr=0.005"] == by[(method, "tvae")]["acc@fnr=0.005"]
    assert results["weights"] == str(gens.resolve())
    with pytest.raises(ValueError, match="other settings"):
        run_tabular_demo(tmp_path / "demo", settings=settings, progress=False)
    with pytest.raises(ValueError, match=r"missing \[.*klwgan_redwine.safetensors"):
        run_tabular_demo(tmp_path / "other", settings=settings, generators=tmp_path / "none",
                         progress=False)
    assert not (tmp_path / "other").exists()
