"""The tabular generators: the shipped KL-WGANs convert through ``flipad convert`` to Linear heads
that reproduce PyTorch, their lasso features agree with scikit-learn's Lasso, the training is
seeded, and the shipped SDV samples are what the experiment reads."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import flipad_jax as fj  # noqa: E402
from converters.generators import build_generator  # noqa: E402
from converters.loading import load_generator  # noqa: E402
from converters.tabular_gans import (DATASETS, KLWGAN_RECORD, OUT_DIR, SDV_RECORD,  # noqa: E402
                                     SDV_SAMPLES, klwgan_discriminator, klwgan_weights, mmd,
                                     read_sdv_samples, sdv_samples_file, train_klwgan)
from flipad_jax.cli import main  # noqa: E402
from flipad_jax.tabular import WINE_SHA256, wine_splits  # noqa: E402

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """The shipped KL-WGANs converted by ``flipad convert`` with the float64 self-check."""
    out = tmp_path_factory.mktemp("bundles")
    for dataset in DATASETS:
        assert main(["convert", str(klwgan_weights(OUT_DIR, dataset)), "--arch", "klwgan",
                     "--out", str(out / dataset), "--samples", "2000", "--check-dtype",
                     "float64", "--quiet"]) == 0
    return out


@pytest.mark.parametrize("dataset", DATASETS)
def test_shipped_klwgan_converts_to_a_linear_head(dataset, bundles, x64):
    weights = klwgan_weights(OUT_DIR, dataset)
    meta = json.loads((bundles / dataset / "head.json").read_text())
    assert meta["layer"] == {**meta["layer"], "kind": "linear", "name": "net.4"}
    assert meta["activation"] == "identity" and meta["in_shape"] == [300]
    assert meta["out_shape"] == [11] and meta["self_check"]["max_abs_error"] <= 1e-5
    # Independent truth: the torch generator's rows from its own penultimate activation.
    g = load_generator(weights, arch="klwgan").model.double().eval()
    seen = {}
    g.net[4].register_forward_hook(lambda m, i, o: seen.update(z=i[0]))
    with torch.no_grad():
        x = g(torch.randn(64, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(9)))
    head = fj.Head.load(bundles / dataset, dtype="float64")
    np.testing.assert_allclose(np.asarray(head.forward(seen["z"].numpy())), x.numpy(),
                               rtol=0, atol=1e-12)


def test_linear_head_inversion_matches_sklearn_lasso(bundles, x64):
    from sklearn.linear_model import Lasso

    head = fj.Head.load(bundles / "redwine", dtype="float64")
    a, b, zbar = (np.asarray(v, np.float64) for v in (head.op.weight, head.bias, head.zbar))
    rows = np.concatenate([wine_splits("redwine").test[:3],
                           read_sdv_samples(sdv_samples_file(OUT_DIR, "redwine"))["tvae_test"][:3]
                           .astype(np.float64)])
    lam = 5e-4  # the authors' λ on Redwine
    # A tolerance beyond what the pessimistic gap certifies: some rows run to max_iter, which is
    # fine, since scikit-learn's solution is the truth here.
    res = head.invert(rows, lam, tol=1e-12, max_iter=100_000)
    for row, z in zip(rows, np.asarray(res.z)):
        # sklearn minimises 1/(2n)‖r − Aδ‖² + α‖δ‖₁ over δ = z − z̄, n = 11 rows of A: α = λ/n.
        fit = Lasso(alpha=lam / len(a), fit_intercept=False, tol=1e-14, max_iter=1_000_000)
        fit.fit(a, row - b - a @ zbar)
        z_sk = zbar + fit.coef_

        def objective(v):
            return 0.5 * np.sum((a @ v + b - row) ** 2) + lam * np.abs(v - zbar).sum()

        assert objective(z) <= objective(z_sk) * (1 + 1e-9)
        np.testing.assert_allclose(z, z_sk, rtol=0, atol=1e-7)


@pytest.fixture
def one_thread():
    # Tiny networks: on a busy 2-core machine two torch threads ran these steps 35× slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_klwgan_training_is_seeded_and_uses_the_reference_networks(one_thread):
    rows = wine_splits("redwine").train[:300]
    g1, rec = train_klwgan(rows, seed=3, epochs=2, progress=False)
    g2, _ = train_klwgan(rows, seed=3, epochs=2, progress=False)
    g3, _ = train_klwgan(rows, seed=4, epochs=2, progress=False)
    for k, v in g1.state_dict().items():
        assert torch.equal(v, g2.state_dict()[k]), k
    assert not torch.equal(g1.net[0].weight, g3.net[0].weight)
    assert rec["epochs"] == 2 and rec["batch_size"] == 256
    # The reference's networks: spectral norm on G's middle layer only and on all of D's layers.
    assert set(g1.state_dict()) == set(build_generator("klwgan").state_dict())
    assert [k for k in g1.state_dict() if k.endswith("weight_orig")] == ["net.2.weight_orig"]
    d = klwgan_discriminator(11)
    assert [k for k in d.state_dict() if k.endswith("weight_orig")] == \
        ["0.weight_orig", "2.weight_orig", "4.weight_orig"]
    assert [tuple(m.weight_orig.shape) for m in d if hasattr(m, "weight_orig")] == \
        [(300, 11), (300, 300), (1, 300)]


def test_mmd_closed_forms():
    x = np.random.default_rng(0).normal(size=(50, 4))
    assert mmd(x, x) == pytest.approx(0.0, abs=1e-12)
    # One point each at distance d·t: 2 − 2 exp(−t²).
    assert mmd(np.zeros((1, 4)), np.full((1, 4), 2.0)) == pytest.approx(2 - 2 * np.exp(-1.0))


def test_shipped_records_and_samples():
    klwgan = json.loads((OUT_DIR / KLWGAN_RECORD).read_text())
    sdv = json.loads((OUT_DIR / SDV_RECORD).read_text())
    for dataset in DATASETS:
        record = klwgan["models"][dataset]
        assert record["epochs"] == 500 and record["seed"] == 0
        assert record["data"]["wine_csv_sha256"] == WINE_SHA256
        samples = read_sdv_samples(sdv_samples_file(OUT_DIR, dataset))
        assert {k: v.shape for k, v in samples.items()} == {
            f"{m}_{s}": (n, 11) for m, splits in SDV_SAMPLES.items() for s, n in splits.items()}
        for model in SDV_SAMPLES:
            assert sdv["models"][dataset][model]["epochs"] == 500


def test_read_sdv_samples_refuses_bad_files(tmp_path):
    good = {f"{m}_{s}": np.zeros((n, 11), np.float32) for m, splits in SDV_SAMPLES.items()
            for s, n in splits.items()}
    np.savez(tmp_path / "missing.npz", **{k: v for k, v in good.items() if k != "ctgan_test"})
    with pytest.raises(ValueError, match=r"missing sample sets \['ctgan_test'\]"):
        read_sdv_samples(tmp_path / "missing.npz")
    np.savez(tmp_path / "f64.npz", **{**good, "tvae_test": good["tvae_test"].astype(np.float64)})
    with pytest.raises(ValueError, match="tvae_test is float64"):
        read_sdv_samples(tmp_path / "f64.npz")
    np.savez(tmp_path / "obj.npz", **{**good, "tvae_test": np.array([{}], dtype=object)})
    with pytest.raises(ValueError, match="not a readable npz"):
        read_sdv_samples(tmp_path / "obj.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable npz"):
        read_sdv_samples(tmp_path / "junk.npz")


@pytest.mark.slow
def test_sdv_training_samples_finite_float32_rows():
    pytest.importorskip("sdv")
    from converters.tabular_gans import train_sdv

    rows = wine_splits("redwine").train[:200]
    samples, record = train_sdv(rows, "tvae", epochs=1, samples={"train": 30, "test": 20})
    assert {k: (v.shape, v.dtype) for k, v in samples.items()} == {
        "train": ((30, 11), np.float32), "test": ((20, 11), np.float32)}
    assert all(np.isfinite(v).all() for v in samples.values())
    assert record["epochs"] == 1 and record["samples"] == {"train": 30, "test": 20}


@pytest.mark.slow
def test_copulagan_fits_truncated_gaussian_marginals_as_the_authors_sdv():
    # The authors pin sdv 0.18.0, whose CopulaGAN default was truncated Gaussian marginals
    # (sdv >= 1: beta); every column's fitted marginal must be one.
    pytest.importorskip("sdv")
    import pandas as pd

    from converters.tabular_gans import TABLE, _sdv_synthesizer

    rows = wine_splits("redwine").train[:200].astype(np.float64)
    columns = [f"x{j}" for j in range(rows.shape[1])]
    synthesizer = _sdv_synthesizer("copulagan", columns, epochs=1)
    synthesizer.fit({TABLE: pd.DataFrame(rows, columns=columns)})
    learned = synthesizer.get_learned_distributions()
    assert {d["distribution"] for d in learned.values()} == {"truncnorm"}


def test_refitting_some_sdv_models_keeps_the_others(tmp_path, monkeypatch):
    pytest.importorskip("sdv")
    import converters.tabular_gans as tg

    def fake_fit(value):
        def train_sdv(train, model, *, seed, epochs):
            rows = {s: np.full((n, train.shape[1]), value, np.float32)
                    for s, n in SDV_SAMPLES[model].items()}
            return rows, {"seed": seed, "epochs": epochs, "fit": value, "fit_seconds": 0.0}
        return train_sdv

    monkeypatch.setattr(tg, "mmd", lambda x, y: 0.0)
    monkeypatch.setattr(tg, "train_sdv", fake_fit(1.0))
    tg.train_sdv_models(tmp_path, datasets=("redwine",), command="all")
    monkeypatch.setattr(tg, "train_sdv", fake_fit(2.0))
    tg.train_sdv_models(tmp_path, datasets=("redwine",), models=("copulagan",), command="one")
    samples = read_sdv_samples(sdv_samples_file(tmp_path, "redwine"))
    assert {k: float(v[0, 0]) for k, v in samples.items()} == {
        "tvae_train": 1.0, "tvae_test": 1.0, "ctgan_test": 1.0, "copulagan_test": 2.0}
    record = json.loads((tmp_path / SDV_RECORD).read_text())["models"]["redwine"]
    assert {m: (record[m]["fit"], record[m]["command"]) for m in SDV_SAMPLES} == {
        "tvae": (1.0, "all"), "ctgan": (1.0, "all"), "copulagan": (2.0, "one")}
    with pytest.raises(ValueError, match=r"models \['gan'\]"):
        tg.train_sdv_models(tmp_path, models=("gan",))
    # a subset needs the other models' samples, fitted on the same data
    with pytest.raises(ValueError, match="the other models' samples and their record"):
        tg.train_sdv_models(tmp_path / "empty", datasets=("redwine",), models=("copulagan",))
    assert not (tmp_path / "empty").exists()
