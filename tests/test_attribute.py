"""`flipad attribute` / `flipad registry add` (flipad_jax.attribute): the stacked inversion equals
each head's own solve, scores and p-values equal per-model `Detector.anomaly_score` /
`p_value`, the open-world answer (none, one, several), refusals, resume and sharding. Tiny
FLIPAD detectors on 3×8×8 images: heads A and A′ (A's weights × 1.001) of one geometry, C of
another."""

import csv
import json
import shutil

import numpy as np
import pytest

import flipad_jax as fj
from flipad_jax import _partial
from flipad_jax.attribute import (Registry, claims_table, invert_stacked, scores_many)
from flipad_jax.bundle import Bundle, write_bundle
from flipad_jax.cli import main
from flipad_jax.detector import Detector
from tests.test_cli_score import _FailAfter, _error
from tests.test_head_bundle import _meta

SMALL = dict(training=fj.DeepSADConfig(epochs=3, batch_size=32,
                                       network_kwargs=dict(widths=(8, 8), rep_dim=16)),
             fnrs=(0.05,), progress=False)
# tol=0: every solve runs max_iter iterations, so stacked and own solves stop alike (a certified
# stop near its boundary may flip by one iteration under the batched convolution's rounding)
LASSO = fj.LassoOptions(max_iter=60, tol=0.0)
ALPHA = "0.05"

pytestmark = pytest.mark.slow  # end-to-end CLI runs: the full suite (CI) runs them


def _bundle(path, kind, weight, zbar):
    if kind == "conv_transpose2d":
        meta = _meta(kind, (5, 4, 4), (3, 8, 8), "tanh", False, stride=[2, 2], padding=[1, 1],
                     dilation=[1, 1], groups=1, output_padding=[0, 0])
        op = fj.ConvTranspose2d(weight, stride=2, padding=1, in_size=(4, 4))
    else:
        meta = _meta(kind, (4, 8, 8), (3, 8, 8), "tanh", False, stride=[1, 1], padding=[1, 1],
                     dilation=[1, 1], groups=1)
        op = fj.Conv2d(weight, padding=1, in_size=(8, 8))
    meta["lipschitz"] = float(op.lipschitz())
    write_bundle(path, Bundle(meta, weight, None, zbar))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Bundles, fitted detectors and a registry of the four models, and test images: samples
    of each generator and noise."""
    d = tmp_path_factory.mktemp("attribute")
    rng = np.random.default_rng(0)
    w_a = (0.3 * rng.normal(size=(5, 3, 4, 4))).astype(np.float32)
    bundles = {
        "A": _bundle(d / "bundles/A", "conv_transpose2d", w_a, np.full((5, 4, 4), 0.4, np.float32)),
        "A2": _bundle(d / "bundles/A2", "conv_transpose2d", w_a * np.float32(1.001),
                      np.full((5, 4, 4), 0.4, np.float32)),
        "C": _bundle(d / "bundles/C", "conv2d",
                     (0.2 * rng.normal(size=(3, 4, 3, 3))).astype(np.float32),
                     np.full((4, 8, 8), 0.4, np.float32)),
    }
    heads = {m: fj.Head.load(b) for m, b in bundles.items()}

    def sample(m, n):
        z = np.maximum(rng.normal(size=(n,) + heads[m].in_shape), 0).astype(np.float32)
        return np.asarray(heads[m].forward(z))

    noise = lambda n: np.tanh(0.6 * rng.normal(size=(n, 3, 8, 8))).astype(np.float32)
    for m in bundles:
        others = [o for o in bundles if o[0] != m[0]]
        x_other = np.concatenate([noise(16)] + [sample(o, 16 // len(others)) for o in others])
        det = Detector(fj.FeatureConfig("flipad", lasso=LASSO), head=heads[m], **SMALL)
        det.fit(sample(m, 32), x_other, sample(m, 20)).save(d / "det" / m)
        assert main(["registry", "add", str(d / "registry"), m, "--detector",
                     str(d / "det" / m), "--bundle", str(bundles[m])]) == 0
    test = np.concatenate([sample("A", 8), sample("C", 8), noise(8)])
    np.save(d / "test.npy", test.astype(np.float32))
    return d, heads, test


def _attribute(d, *inputs, out, extra=()):
    return main(["attribute", "--registry", str(d / "registry"), *map(str, inputs), "--out",
                 str(out), "--alpha", ALPHA, "--quiet", *extra])


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_stacked_inversion_equals_each_heads_own_solve(world):
    _, heads, x = world
    group = [heads["A"], heads["A2"], heads["A"]]
    lams = [5e-4, 1e-3, 2e-4]  # per-model λ, start and iteration cap stay per model
    options = [LASSO, LASSO.replace(max_iter=30, start="reference"),
               LASSO.replace(max_iter=90, lipschitz_margin=1.5)]
    res = invert_stacked(group, x, lams, options)
    for m, (head, lam, opts) in enumerate(zip(group, lams, options)):
        own = head.invert(x, lam, options=opts)
        np.testing.assert_allclose(res.z[m], own.z, rtol=0, atol=2e-5)
        np.testing.assert_array_equal(res.iterations[m], own.iterations)
        np.testing.assert_array_equal(res.status[m], own.status)
    # the growing step is per model and per image too
    grown = [opts.replace(step_growth=1.05) for opts in options]
    res = invert_stacked(group, x, lams, grown)
    for m, (head, lam, opts) in enumerate(zip(group, lams, grown)):
        own = head.invert(x, lam, options=opts)
        np.testing.assert_allclose(res.z[m], own.z, rtol=0, atol=2e-5)
        np.testing.assert_array_equal(res.iterations[m], own.iterations)
    with pytest.raises(ValueError, match="one geometry"):
        invert_stacked([heads["A"], heads["C"]], x, lams[:2], options[:2])


def test_scores_and_p_values_equal_per_model_scoring(world, tmp_path):
    d, _, x = world
    registry = Registry.load(d / "registry")
    assert registry.names == ["A", "A2", "C"]
    stacked = scores_many(registry.detectors, x, stack=True)
    for m, det in enumerate(registry.detectors):
        np.testing.assert_allclose(stacked[m], det.anomaly_score(x), rtol=1e-5, atol=1e-6)
    out = tmp_path / "claims.jsonl"
    assert _attribute(d, d / "test.npy", out=out, extra=["--stack"]) == 0
    rows = _jsonl(out)
    assert [r["path"] for r in rows] == [f"{d / 'test.npy'}[{i}]" for i in range(len(x))]
    for m, det in zip(registry.names, registry.detectors):
        np.testing.assert_allclose([r["models"][m]["score"] for r in rows],
                                   det.anomaly_score(x), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal([r["models"][m]["p_value"] for r in rows], det.p_value(x))


def test_open_world_answers_none_one_and_several(world, tmp_path):
    d, _, x = world
    registry = Registry.load(d / "registry")
    p = np.stack([det.p_value(x) for det in registry.detectors])  # per-model truth
    claimed = [{m for m, pm in zip(registry.names, p[:, i]) if pm >= float(ALPHA)}
               for i in range(len(x))]
    sizes = {len(c) for c in claimed}
    assert {0, 1} <= sizes and max(sizes) >= 2  # the case has all three answers
    assert {"A", "A2"} <= claimed[0]  # A and its near-copy A′ both claim A's sample
    out = tmp_path / "claims.csv"
    assert _attribute(d, d / "test.npy", out=out) == 0
    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0][:4] == ["path", f"claimed_by@alpha={float(ALPHA):g}", "score_A", "p_value_A"]
    assert [set(filter(None, r[1].split(";"))) for r in rows[1:]] == claimed


def test_claims_table_counts():
    p = {"A": {"real": np.array([0.001, 0.5, 0.002]), "A": np.array([0.5, 0.3, 0.01])},
         "B": {"real": np.array([0.001, 0.5, 0.9]), "A": np.array([0.004, 0.3, 0.001]),
               "B": np.array([0.5])}}
    markdown, counts = claims_table(p, 0.005)
    assert counts == {"real": {"n": 3, "A": 1, "B": 2, "none": 1, "several": 1},
                      "A": {"n": 3, "A": 3, "B": 1, "none": 0, "several": 1}}
    assert "| real | 33.3 | 66.7 | 33.3 | 33.3 |" in markdown


def test_resume_after_an_interrupted_run(world, tmp_path, monkeypatch, capsys):
    d, _, _ = world
    out = tmp_path / "c.jsonl"
    monkeypatch.setattr(_partial, "_write_all", _FailAfter(2))  # the third batch fails
    assert _attribute(d, d / "test.npy", out=out, extra=["--batch-size", "8"]) == 1
    assert "(the disk is full)" in _error(capsys) and not out.exists()
    assert len((tmp_path / "c.jsonl.partial").read_text().splitlines()) == 16
    monkeypatch.undo()
    assert _attribute(d, d / "test.npy", out=out, extra=["--batch-size", "8"]) == 0
    assert "16 rows resumed" in capsys.readouterr().out
    assert _attribute(d, d / "test.npy", out=tmp_path / "once.jsonl",
                      extra=["--batch-size", "8"]) == 0
    assert out.read_bytes() == (tmp_path / "once.jsonl").read_bytes()
    # a resumed run with another α would mix verdicts: refused
    monkeypatch.setattr(_partial, "_write_all", _FailAfter(1))
    assert _attribute(d, d / "test.npy", out=tmp_path / "a.csv", extra=["--batch-size", "8"]) == 1
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["attribute", "--registry", str(d / "registry"), str(d / "test.npy"), "--out",
                 str(tmp_path / "a.csv"), "--alpha", "0.01", "--quiet"]) == 1
    assert "other columns" in _error(capsys)


def test_shards_concatenate_to_the_whole_run(world, tmp_path):
    d, _, x = world
    assert _attribute(d, d / "test.npy", out=tmp_path / "all.jsonl") == 0
    parts = []
    for k in range(3):
        assert _attribute(d, d / "test.npy", out=tmp_path / f"{k}.jsonl",
                          extra=["--shard", f"{k}/3"]) == 0
        parts += _jsonl(tmp_path / f"{k}.jsonl")
    assert [r["path"] for r in parts] == [r["path"] for r in _jsonl(tmp_path / "all.jsonl")]
    assert len(parts) == len(x)


def test_refusals_name_the_value_and_write_nothing(world, tmp_path, capsys):
    d, _, _ = world
    # an output that exists
    out = tmp_path / "c.jsonl"
    out.write_text("old")
    assert _attribute(d, d / "test.npy", out=out) == 1
    assert f"out={str(out)!r} already exists" in _error(capsys)
    assert out.read_text() == "old" and not (tmp_path / "c.jsonl.partial").exists()
    # two detectors for one bundle (an entry copied under another name)
    reg = tmp_path / "reg"
    shutil.copytree(d / "registry", reg)
    shutil.copytree(reg / "A", reg / "A_again")
    assert main(["attribute", "--registry", str(reg), str(d / "test.npy"), "--out",
                 str(tmp_path / "x.jsonl"), "--quiet"]) == 1
    err = _error(capsys)
    assert "two detectors for one bundle" in err and "A and A_again" in err
    assert not list(tmp_path.glob("x.jsonl*"))
    # ... and `registry add` refuses to make such a registry, leaving it as it was
    before = sorted(p.name for p in (d / "registry").iterdir())
    assert main(["registry", "add", str(d / "registry"), "A_again", "--detector",
                 str(d / "det/A"), "--bundle", str(d / "bundles/A")]) == 1
    assert "two detectors for one bundle" in _error(capsys)
    assert sorted(p.name for p in (d / "registry").iterdir()) == before
    # a detector whose bundle is missing
    shutil.rmtree(reg / "A_again")
    shutil.rmtree(reg / "C" / "bundle")
    # the detector folder carries its head, so the entry is still complete ...
    assert main(["attribute", "--registry", str(reg), str(d / "test.npy"), "--out",
                 str(tmp_path / "embedded.jsonl"), "--quiet"]) == 0
    # ... until that copy goes too
    shutil.rmtree(reg / "C" / "detector" / "head")
    assert main(["attribute", "--registry", str(reg), str(d / "test.npy"), "--out",
                 str(tmp_path / "x.jsonl"), "--quiet"]) == 1
    assert f"{reg / 'C' / 'detector'}: a FLIPAD detector whose bundle is missing" in \
        _error(capsys)
    # a bundle that is not the detector's head
    assert main(["registry", "add", str(tmp_path / "new"), "A", "--detector",
                 str(d / "det/A"), "--bundle", str(d / "bundles/A2")]) == 1
    assert "is not the bundle of" in _error(capsys) and not (tmp_path / "new/A").exists()
    for bad, expected in ((["--alpha", "1.5"], "alpha=1.5"), (["--shard", "3/3"], "--shard")):
        assert _attribute(d, d / "test.npy", out=tmp_path / "y.jsonl", extra=bad) == 1
        assert expected in _error(capsys)


def test_a_non_finite_inversion_is_refused_naming_the_images():
    from flipad_jax.features import check_solved

    check_solved(np.array([fj.Status.CONVERGED, fj.Status.MAX_ITER]))
    with pytest.raises(ValueError, match=r"1 image\(s\) \(indices \[1\]\) went non-finite"):
        check_solved(np.array([fj.Status.MAX_ITER, fj.Status.NONFINITE]))
