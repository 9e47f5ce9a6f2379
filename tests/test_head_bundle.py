"""Head bundle schema and fj.Head, without torch: numpy truth and sklearn's lasso."""

import copy
import json

import numpy as np
import pytest

import flipad_jax as fj
from flipad_jax.bundle import (Bundle, META_FILE, WEIGHTS_FILE, atomic_dir, read_bundle,
                               write_bundle)


def _meta(kind="linear", in_shape=(6,), out_shape=(4,), activation="tanh", has_bias=True,
          **layer):
    natural = {"tanh": [-1.0, 1.0], "sigmoid": [0.0, 1.0], "identity": None}[activation]
    return {
        "schema_version": 1,
        "layer": {"kind": kind, "name": "net.4", "has_bias": has_bias, **layer},
        "in_shape": list(in_shape), "out_shape": list(out_shape), "activation": activation,
        "output_range": natural,
        "zbar": {"n_samples": 10, "seed": 0, "batch_size": 5, "bn_mode": "eval",
                 "latent_shape": [3], "latent_scheme": "test"},
        "lipschitz": 1.0,
        "source": {"format": "module", "file": None, "sha256": "0" * 64, "arch": None,
                   "arch_options": {}},
        "versions": {"torch": "none", "flipad_jax": fj.__version__},
        "self_check": {"n_samples": 1, "dtype": "float32", "max_abs_error": 0.0,
                       "tolerance": 1e-4},
    }


def _linear_bundle(activation="tanh", seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(4, 6)).astype(np.float32)
    meta = _meta(activation=activation)
    meta["lipschitz"] = float(np.linalg.norm(w, 2) ** 2)
    return Bundle(meta, w, rng.normal(size=4).astype(np.float32),
                  rng.normal(size=6).astype(np.float32))


def _conv_bundle():
    rng = np.random.default_rng(1)
    meta = _meta("conv_transpose2d", (5, 4, 4), (3, 8, 8), "tanh", False, stride=[2, 2],
                 padding=[1, 1], dilation=[1, 1], groups=1, output_padding=[0, 0])
    weight = rng.normal(size=(5, 3, 4, 4)).astype(np.float32)
    # ‖A‖² from the dense matrix of the layer (one column per input coordinate).
    basis = np.eye(5 * 4 * 4, dtype=np.float32).reshape(80, 5, 4, 4)
    dense = np.asarray(fj.ConvTranspose2d(weight, stride=2, padding=1, in_size=(4, 4))(basis))
    meta["lipschitz"] = float(np.linalg.norm(dense.reshape(80, -1).astype(np.float64), 2) ** 2)
    return Bundle(meta, weight, None, rng.normal(size=(5, 4, 4)).astype(np.float32))


def test_round_trip_and_forward_against_numpy(tmp_path):
    b = _linear_bundle()
    write_bundle(tmp_path / "h", b)
    r = read_bundle(tmp_path / "h")
    assert r.meta == b.meta
    for a, c in ((r.weight, b.weight), (r.bias, b.bias), (r.zbar, b.zbar)):
        np.testing.assert_array_equal(a, c)
    head = fj.Head.load(tmp_path / "h")
    z = np.random.default_rng(2).normal(size=(3, 6)).astype(np.float32)
    np.testing.assert_allclose(head.forward(z), np.tanh(z @ b.weight.T + b.bias), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_array_equal(head.zbar, b.zbar)
    assert head.output_range == (-1.0, 1.0) and head.lipschitz == b.meta["lipschitz"]
    assert head.meta["layer"]["name"] == "net.4"


def test_conv_bundle_loads_with_geometry(tmp_path):
    write_bundle(tmp_path / "c", _conv_bundle())
    head = fj.Head.load(tmp_path / "c")
    assert head.in_shape == (5, 4, 4) and head.out_shape == (3, 8, 8)
    assert head.op.stride == (2, 2) and head.bias is None


def test_float64_load(tmp_path, x64):
    write_bundle(tmp_path / "h", _linear_bundle())
    head = fj.Head.load(tmp_path / "h", dtype="float64")
    assert head.zbar.dtype == np.float64 and head.op.dtype == np.float64


def test_float64_needs_x64(tmp_path):
    write_bundle(tmp_path / "h", _linear_bundle())
    with pytest.raises(ValueError, match="jax_enable_x64"):
        fj.Head.load(tmp_path / "h", dtype="float64")


def test_target_maps_pixels_and_counts_clips(tmp_path):
    write_bundle(tmp_path / "h", _linear_bundle())
    head = fj.Head.load(tmp_path / "h")
    pixels = np.array([[0, 1, 128, 254], [10, 20, 30, 255]], np.uint8)
    o, clipped = head.target(pixels, x_range=(0, 255), return_clipped=True)
    x = pixels / 127.5 - 1
    expected = np.arctanh(np.clip(x, -1 + 1e-4, 1 - 1e-4))
    np.testing.assert_allclose(o, expected, rtol=1e-4)
    assert clipped.tolist() == [1, 1]
    with pytest.raises(ValueError, match="expected \\(B, 4\\)"):
        head.target(np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        head.target(np.full((1, 4), np.nan, np.float32))


def test_float_images_outside_the_output_range_are_refused_not_clipped(tmp_path):
    write_bundle(tmp_path / "h", _linear_bundle())
    head = fj.Head.load(tmp_path / "h")
    pixels = np.array([[0.0, 12.0, 128.0, 255.0]], np.float32)  # 0–255 floats, tanh head
    with pytest.raises(ValueError, match=r"x spans \[0, 255\]: expected the head's output range "
                                         r"\(-1.0, 1.0\)"):
        head.target(pixels)
    with pytest.raises(ValueError, match=r"x spans"):
        head.invert(pixels)
    # The scale stated: mapped, not clipped. Clipping asked for: clipped and counted.
    o, clipped = head.target(pixels, x_range=(0, 255), return_clipped=True)
    assert clipped.tolist() == [2]  # 0 → −1 and 255 → 1, at the ends of the range
    _, clipped = head.target(pixels, clip=1e-4, return_clipped=True)
    assert clipped.tolist() == [3]  # 12, 128 and 255 are above 1 − 1e-4
    # The range's own ends are inside it.
    assert np.isfinite(np.asarray(head.target(np.array([[-1.0, 1.0, 0.0, 0.5]], np.float32)))).all()


@pytest.mark.parametrize("factor", [0.5, 0.98, 1.2, 10.0])
def test_a_wrong_stored_lipschitz_constant_is_refused_on_load(tmp_path, factor):
    b = _conv_bundle()
    true = b.meta["lipschitz"]
    write_bundle(tmp_path / "c", b._replace(meta=dict(b.meta, lipschitz=true * factor)))
    with pytest.raises(ValueError, match=rf"'lipschitz' is {true * factor:.6g} but the weights "
                                         r"give \|\|A\|\|\^2 = ") as refused:
        fj.Head.load(tmp_path / "c")
    estimate = float(str(refused.value).split("= ")[1].split(" ")[0])
    assert estimate == pytest.approx(true, rel=1e-4)
    write_bundle(tmp_path / "ok", b)
    assert fj.Head.load(tmp_path / "ok").lipschitz == true


def test_identity_head_without_range_refuses_x_range(tmp_path):
    write_bundle(tmp_path / "h", _linear_bundle("identity"))
    head = fj.Head.load(tmp_path / "h")
    x = np.ones((1, 4), np.float32) * 3
    np.testing.assert_array_equal(head.target(x), x)
    with pytest.raises(ValueError, match="x_range"):
        head.target(x, x_range=(0, 255))


def test_invert_matches_sklearn_lasso(tmp_path):
    sklearn = pytest.importorskip("sklearn.linear_model")
    b = _linear_bundle("identity")
    write_bundle(tmp_path / "h", b)
    head = fj.Head.load(tmp_path / "h")
    x = np.random.default_rng(3).normal(size=(2, 4)).astype(np.float32)
    lam = 0.05
    res = head.invert(x, lam, max_iter=20000)
    assert res.converged.all() and res.clipped.tolist() == [0, 0]
    for i in range(2):
        # δ = z − z̄ solves ½‖Wδ − r‖² + λ‖δ‖₁ with r = x − b − W z̄; sklearn scales by 1/rows.
        r = x[i] - b.bias - b.weight @ b.zbar
        ref = sklearn.Lasso(alpha=lam / 4, fit_intercept=False, tol=1e-12, max_iter=100000)
        ref.fit(b.weight.astype(np.float64), r.astype(np.float64))
        np.testing.assert_allclose(np.asarray(res.z[i]), ref.coef_ + b.zbar, atol=2e-3)
    with pytest.raises(ValueError, match="anchor"):
        head.invert(x, lam, anchor=b.zbar)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(schema_version=2), "'schema_version' is 2"),
    (lambda m: m["layer"].update(kind="conv3d"), "'layer.kind'"),
    (lambda m: m.update(activation="relu"), "'activation'"),
    (lambda m: m.update(output_range=[0.0, 1.0]), "'output_range'"),
    (lambda m: m.update(in_shape=[7]), "in_shape"),
    (lambda m: m.update(out_shape=[5]), "out_shape"),
    (lambda m: m["zbar"].pop("seed"), "'zbar.seed' is missing"),
    (lambda m: m["source"].update(sha256="xyz"), "'source.sha256'"),
    (lambda m: m.update(lipschitz=-1.0), "'lipschitz'"),
    (lambda m: m["layer"].update(stride=[1, 1]), "'layer.stride'"),
    (lambda m: m["layer"].update(has_bias=False), "has_bias"),
])
def test_bad_head_json_names_the_field(tmp_path, edit, message):
    b = _linear_bundle()
    write_bundle(tmp_path / "h", b)
    meta = copy.deepcopy(b.meta)
    edit(meta)
    (tmp_path / "h" / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=message):
        fj.Head.load(tmp_path / "h")


def test_mismatched_arrays_and_corrupt_files(tmp_path):
    b = _conv_bundle()
    with pytest.raises(ValueError, match="'zbar' has shape"):
        write_bundle(tmp_path / "a", b._replace(zbar=np.zeros((5, 3, 3), np.float32)))
    with pytest.raises(ValueError, match="'weight'"):
        write_bundle(tmp_path / "b", b._replace(weight=np.zeros((4, 3, 4, 4), np.float32)))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    write_bundle(tmp_path / "c", b)
    (tmp_path / "c" / WEIGHTS_FILE).write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="safetensors"):
        fj.Head.load(tmp_path / "c")
    write_bundle(tmp_path / "d", b)
    (tmp_path / "d" / META_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        fj.Head.load(tmp_path / "d")
    with pytest.raises(ValueError, match="bundle folder"):
        fj.Head.load(tmp_path / "missing")


def test_atomic_dir_leaves_nothing_on_failure_and_never_overwrites(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "x") as tmp:
            (tmp / "f").write_text("partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    write_bundle(tmp_path / "h", _linear_bundle())
    with pytest.raises(ValueError, match="already exists"):
        write_bundle(tmp_path / "h", _linear_bundle(seed=1))
    write_bundle(tmp_path / "h", _linear_bundle(seed=1), overwrite=True)
    np.testing.assert_array_equal(read_bundle(tmp_path / "h").weight, _linear_bundle(seed=1).weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h"]
