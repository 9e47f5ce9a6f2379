"""SM-Inv₂ through the command line: convert-generator, fit, score, evaluate, and the refusals."""

import json

import jax
import numpy as np
import pytest

from converters.demo_gans import GEN_OPTIONS, WEIGHTS_DIR
from flipad_jax.cli import main
from flipad_jax.datasets import fashion_mnist
from flipad_jax.generators import Generator

pytestmark = pytest.mark.torch
FAST = ["--restarts", "2", "--steps", "150", "--fnr", "0.05", "--quiet"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("sminv_cli")
    assert main(["convert-generator", str(WEIGHTS_DIR / "dcgan.safetensors"), "--arch", "dcgan",
                 *sum((["--arch-opt", f"{k}={v}"] for k, v in GEN_OPTIONS.items()), []),
                 "--out", str(d / "gen"), "--quiet"]) == 0
    gen = Generator.load(d / "gen")
    z = jax.random.normal(jax.random.key(0), (44,) + gen.latent_shape)
    pixels = np.round(127.5 * (np.asarray(gen(z)) + 1)).astype(np.uint8)  # as PNGs store them
    np.save(d / "g_train.npy", pixels[:24])
    np.save(d / "g_test.npy", pixels[24:])
    np.save(d / "real.npy", fashion_mnist("test", 32)[:20])
    return d


@pytest.mark.slow
def test_fit_score_evaluate_sm_inv2(setup, tmp_path):
    d = setup
    det = tmp_path / "det"
    assert main(["fit", "--features", "sm_inv2", "--generator", str(d / "gen"), "--model",
                 str(d / "g_train.npy"), "--out", str(det), *FAST]) == 0
    out = tmp_path / "s.jsonl"
    assert main(["score", str(det), str(d / "g_test.npy"), str(d / "real.npy"), "--generator",
                 str(d / "gen"), "--out", str(out), "--quiet"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    g_scores = [r["score"] for r in rows if "g_test" in r["path"]]
    real_scores = [r["score"] for r in rows if "real" in r["path"]]
    assert len(g_scores) == 20 and len(real_scores) == 20
    assert np.median(g_scores) < np.median(real_scores)  # G reconstructs its own images better
    assert main(["evaluate", str(det), "--generator", str(d / "gen"), "--model",
                 str(d / "g_test.npy"), "--other", f"real={d / 'real.npy'}", "--out",
                 str(tmp_path / "rep"), "--quiet"]) == 0
    records = json.loads((tmp_path / "rep" / "records.json").read_text())
    assert records["method"] == "SM-Inv₂" and records["records"][0]["auc"] > 0.8


@pytest.mark.slow
def test_sm_inv2_refusals(setup, tmp_path, capsys):
    d = setup
    assert main(["fit", "--features", "sm_inv2", "--model", str(d / "g_train.npy"), "--out",
                 str(tmp_path / "x"), *FAST]) == 1
    assert "expected --generator DIR" in capsys.readouterr().err
    det = tmp_path / "det"
    assert main(["fit", "--features", "sm_inv2", "--generator", str(d / "gen"), "--model",
                 str(d / "g_train.npy"), "--out", str(det), *FAST]) == 0
    assert main(["score", str(det), str(d / "real.npy"), "--out", str(tmp_path / "s.csv"),
                 "--quiet"]) == 1
    assert "an SM-Inv₂ detector: expected --generator DIR" in capsys.readouterr().err
    # weights of another architecture are refused, naming it, and nothing is written
    assert main(["convert-generator", str(WEIGHTS_DIR / "dcgan.safetensors"), "--arch",
                 "sd_vae_last", "--out", str(tmp_path / "g2"), "--quiet"]) == 1
    assert "does not fit the architecture SDVAELastBlock" in capsys.readouterr().err
    assert not (tmp_path / "g2").exists()
