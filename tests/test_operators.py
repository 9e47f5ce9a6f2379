"""Operators: exact adjoints, shapes, Lipschitz constants, pytree behaviour, bad input."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flipad_jax as fj
from tests._geometry import build, conv_geometry, weight_shape

BOTH_MAPS = jax.jit(lambda op, z, y: (op(z), op.T(y)))  # one compile per geometry, not per op
SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def _random_op(g, transposed, seed):
    rng = np.random.default_rng(seed)
    op = build(fj, g, rng.normal(size=weight_shape(g, transposed)), transposed)
    return op, rng


def _dense(op):
    """The operator as a dense matrix, column j = A e_j."""
    n = int(np.prod(op.in_shape))
    basis = jnp.eye(n, dtype=op.dtype).reshape((n,) + op.in_shape)
    return np.asarray(op(basis)).reshape(n, -1).T


@pytest.mark.slow
@pytest.mark.parametrize("transposed", [False, True])
@SETTINGS
@given(data=st.data())
def test_adjoint_dot_product_and_linear_transpose(x64, transposed, data):
    g = data.draw(conv_geometry(transposed))
    g["layout"] = data.draw(st.sampled_from(["NHWC", "NCHW"]))
    op, rng = _random_op(g, transposed, data.draw(st.integers(0, 2**31)))
    z = jnp.asarray(rng.normal(size=(g["batch"],) + op.in_shape))
    y = jnp.asarray(rng.normal(size=(g["batch"],) + op.out_shape))
    lhs = jnp.vdot(op(z), y)
    rhs = jnp.vdot(z, op.T(y))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-10, atol=1e-10)
    # The autodiff transpose of the forward map is an independent oracle for the adjoint.
    (oracle,) = jax.linear_transpose(op, z)(y)
    np.testing.assert_allclose(op.T(y), oracle, rtol=1e-10, atol=1e-10)


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_polyphase_adjoint_dot_product(x64, data):
    """⟨Az, y⟩ = ⟨z, Aᵀy⟩ in float64 for the polyphase form (its own pair of maps)."""
    g = dict(data.draw(conv_geometry(True, max_dilation=1)),
             layout=data.draw(st.sampled_from(["NHWC", "NCHW"])))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    op = build(fj, g, rng.normal(size=weight_shape(g, True)), True, method="polyphase")
    z = jnp.asarray(rng.normal(size=(g["batch"],) + op.in_shape))
    y = jnp.asarray(rng.normal(size=(g["batch"],) + op.out_shape))
    out, back = BOTH_MAPS(op, z, y)
    np.testing.assert_allclose(jnp.vdot(out, y), jnp.vdot(z, back), rtol=1e-10, atol=1e-10)


def test_method_is_static_and_survives_the_pytree():
    w = np.random.default_rng(6).normal(size=(4, 3, 4, 4)).astype(np.float32)
    ops = [fj.ConvTranspose2d(w, stride=2, padding=1, in_size=(5, 5), method=m)
           for m in ("direct", "polyphase")]
    (leaves, direct), (_, polyphase) = (jax.tree_util.tree_flatten(op) for op in ops)
    assert all(isinstance(leaf, jax.Array) for leaf in leaves)
    assert direct != polyphase  # so jit compiles each form apart
    assert jax.tree_util.tree_unflatten(polyphase, leaves).method == "polyphase"
    assert fj.ConvTranspose2d(w, stride=2, padding=1, in_size=(5, 5)).method == "direct"


@pytest.mark.slow
@SETTINGS
@given(out_dim=st.integers(1, 7), in_dim=st.integers(1, 7), batch=st.integers(1, 3),
       seed=st.integers(0, 2**31))
def test_linear_adjoint(x64, out_dim, in_dim, batch, seed):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(out_dim, in_dim))
    op = fj.Linear(w)
    z, y = rng.normal(size=(batch, in_dim)), rng.normal(size=(batch, out_dim))
    np.testing.assert_allclose(op(z), z @ w.T, rtol=1e-12)
    np.testing.assert_allclose(jnp.vdot(op(z), y), jnp.vdot(z, op.T(y)), rtol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("make", [
    lambda w: fj.ConvTranspose2d(w, stride=2, padding=1, in_size=(5, 4)),
    lambda w: fj.Conv2d(w, stride=1, padding=1, in_size=(6, 5)),
    lambda w: fj.Conv2d(w, stride=2, padding=0, dilation=2, in_size=(9, 8)),
])
def test_lipschitz_matches_dense_singular_value(x64, make):
    w = np.random.default_rng(3).normal(size=(3, 4, 4, 4)) * 0.1
    op = make(w)
    sigma_max = np.linalg.norm(_dense(op), 2)
    np.testing.assert_allclose(op.lipschitz(), sigma_max ** 2, rtol=1e-8)


def test_lipschitz_of_linear(x64):
    w = np.random.default_rng(0).normal(size=(11, 30))
    np.testing.assert_allclose(fj.Linear(w).lipschitz(), np.linalg.norm(w, 2) ** 2, rtol=1e-5)


def test_bias_kept_apart_and_added_by_affine(x64):
    rng = np.random.default_rng(1)
    w, b = rng.normal(size=(3, 2, 3, 3)), rng.normal(size=3)
    op = fj.Conv2d(w, b, padding=1, in_size=(4, 4))
    z = rng.normal(size=(2, 2, 4, 4))
    plain = fj.Conv2d(w, padding=1, in_size=(4, 4))
    np.testing.assert_allclose(op(z), plain(z))
    np.testing.assert_allclose(op.affine(z), plain(z) + b[None, :, None, None])


def test_in_size_is_required():
    with pytest.raises(TypeError, match="in_size"):
        fj.Conv2d(np.ones((4, 3, 4, 4), np.float32), stride=2)


@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_block_diagonal_kernel_batching_equals_each_operator(x64, data):
    """vmap over M stacked operators with kernel_batching="block_diagonal" (one dense
    convolution) gives each operator's own forward and adjoint maps, for every geometry."""
    transposed = data.draw(st.booleans())
    polyphase = transposed and data.draw(st.booleans())
    g = dict(data.draw(conv_geometry(transposed, max_dilation=1 if polyphase else 2)),
             layout=data.draw(st.sampled_from(["NHWC", "NCHW"])))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    options = dict(method="polyphase") if polyphase else {}
    ops = [build(fj, g, rng.normal(size=weight_shape(g, transposed)), transposed,
                 kernel_batching="block_diagonal", **options)
           for _ in range(data.draw(st.integers(2, 3)))]
    z = np.stack([rng.normal(size=(g["batch"],) + ops[0].in_shape) for _ in ops])
    y = np.stack([rng.normal(size=(g["batch"],) + ops[0].out_shape) for _ in ops])
    treedef = jax.tree_util.tree_structure(ops[0])
    leaves = [jnp.stack(ls) for ls in zip(*map(jax.tree_util.tree_leaves, ops))]
    out, back = jax.vmap(lambda ls, z, y: BOTH_MAPS(treedef.unflatten(ls), z, y))(
        leaves, jnp.asarray(z), jnp.asarray(y))
    for m, op in enumerate(ops):
        own_out, own_back = BOTH_MAPS(op, z[m], y[m])
        np.testing.assert_allclose(out[m], own_out, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(back[m], own_back, rtol=1e-12, atol=1e-12)
    # a non-finite input of model 0's first sample stays there (its output is all NaN) and does
    # not leak through the zero blocks into the other models' outputs
    z_bad = z.copy()
    z_bad[0, 0].flat[0] = np.nan
    out_bad, _ = jax.vmap(lambda ls, z, y: BOTH_MAPS(treedef.unflatten(ls), z, y))(
        leaves, jnp.asarray(z_bad), jnp.asarray(y))
    assert np.all(np.isnan(out_bad[0, 0]))
    np.testing.assert_allclose(out_bad[0, 1:], out[0, 1:], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out_bad[1:], out[1:], rtol=1e-12, atol=1e-12)
    # one operator, stacked inputs: the model axis is more batch
    shared_out, shared_back = jax.vmap(BOTH_MAPS, in_axes=(None, 0, 0))(ops[0], z, y)
    np.testing.assert_allclose(shared_out[1], BOTH_MAPS(ops[0], z[1], y[1])[0], rtol=1e-12,
                               atol=1e-12)
    np.testing.assert_allclose(shared_back[1], BOTH_MAPS(ops[0], z[1], y[1])[1], rtol=1e-12,
                               atol=1e-12)


def test_operator_is_a_pytree_that_jits_and_vmaps():
    rng = np.random.default_rng(4)
    op = fj.ConvTranspose2d(rng.normal(size=(4, 3, 4, 4)).astype(np.float32), stride=2,
                            padding=1, in_size=(5, 5))
    z = jnp.asarray(rng.normal(size=(2, 4, 5, 5)), jnp.float32)
    leaves, treedef = jax.tree_util.tree_flatten(op)
    assert all(isinstance(leaf, jax.Array) for leaf in leaves)
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    np.testing.assert_allclose(jax.jit(lambda o, v: o(v))(rebuilt, z), op(z), rtol=1e-6)
    per_sample = jax.vmap(lambda v: op(v[None])[0])(z)
    np.testing.assert_allclose(per_sample, op(z), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(rebuilt.weight, op.weight)


def test_jit_traces_once_per_geometry():
    rng = np.random.default_rng(5)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def normal_map(op, z):
        return op.T(op(z))

    z = jnp.asarray(rng.normal(size=(2, 4, 5, 5)), jnp.float32)
    for _ in range(2):  # new weights, same geometry: the compiled program is reused
        w = rng.normal(size=(4, 3, 4, 4)).astype(np.float32)
        out = normal_map(fj.ConvTranspose2d(w, stride=2, padding=1, in_size=(5, 5)), z)
        chex.assert_shape(out, z.shape)
        chex.assert_type(out, jnp.float32)


@pytest.mark.parametrize("kwargs, match", [
    (dict(groups=3), "groups=3"),
    (dict(stride=0), "stride=0"),
    (dict(padding=-1), "padding=-1"),
    (dict(stride=(1, 2, 3)), "stride="),
    (dict(stride=2, output_padding=2), "output_padding="),
    (dict(in_size=(1, 1), padding=3), "empty output"),
    (dict(method="fft"), "method='fft'"),
    (dict(kernel_batching="dense"), "kernel_batching='dense'"),
    (dict(method="polyphase", dilation=(1, 2)), r"dilation=\(1, 2\)"),
])
def test_invalid_geometry_is_rejected(kwargs, match):
    w = np.ones((4, 2, 3, 3), np.float32)
    with pytest.raises(ValueError, match=match):
        fj.ConvTranspose2d(w, **{"in_size": (4, 4), **kwargs})


def test_bad_weights_are_rejected():
    with pytest.raises(ValueError, match="floating"):
        fj.Conv2d(np.ones((2, 2, 3, 3), np.int32), in_size=(4, 4))
    with pytest.raises(ValueError, match="NaN/inf"):
        fj.Linear(np.array([[1.0, np.nan]], np.float32))
    with pytest.raises(ValueError, match="4 dimensions"):
        fj.Conv2d(np.ones((2, 3), np.float32), in_size=(4, 4))
    with pytest.raises(ValueError, match="bias has shape"):
        fj.Conv2d(np.ones((2, 2, 3, 3), np.float32), np.ones(3, np.float32), in_size=(4, 4))
    with pytest.raises(TypeError, match="output_padding"):
        fj.Conv2d(np.ones((2, 2, 3, 3), np.float32), in_size=(4, 4), output_padding=1)


def test_wrong_input_shape_is_rejected():
    op = fj.Conv2d(np.ones((2, 3, 3, 3), np.float32), in_size=(5, 5))
    with pytest.raises(ValueError, match=r"expected \(B, 3, 5, 5\)"):
        op(jnp.ones((1, 3, 4, 5)))
    with pytest.raises(ValueError, match="floating"):
        op(jnp.ones((1, 3, 5, 5), jnp.int32))
