"""Final activations: closed-form inverses, the clip and its count."""

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from flipad_jax.activations import (ACTIVATIONS, check_clip, clipped_inverse, get_activation)


def test_inverses_match_closed_forms():
    x = np.linspace(-0.99, 0.99, 41, dtype=np.float32)[None]
    o, n = clipped_inverse(get_activation("tanh"), x, 1e-4)
    np.testing.assert_allclose(o, np.arctanh(x), rtol=1e-6)
    assert int(n[0]) == 0
    p = np.linspace(0.01, 0.99, 41, dtype=np.float32)[None]
    o, _ = clipped_inverse(get_activation("sigmoid"), p, 1e-4)
    np.testing.assert_allclose(o, np.log(p / (1 - p)), rtol=1e-5, atol=1e-6)
    o, n = clipped_inverse(get_activation("identity"), 7 * x, 1e-4)
    np.testing.assert_array_equal(o, 7 * x)
    assert int(n[0]) == 0


def test_clip_values_and_counts_by_hand():
    # Pixels 0, 1, 254, 255 of an 8-bit PNG mapped to [-1, 1] (the reference's decoding).
    x = (np.array([[0, 1, 254, 255, 128]], np.float64) / 127.5 - 1).astype(np.float32)
    o, n = clipped_inverse(get_activation("tanh"), x, 1e-4)
    np.testing.assert_allclose(o[0, [0, 3]], [-4.951719, 4.951719], rtol=1e-4)  # atanh(1-1e-4)
    np.testing.assert_allclose(o[0, [1, 2]], [-2.7687, 2.7687], rtol=1e-3)
    assert n.tolist() == [2]
    s = np.array([[0.0, 1.0, 1.5, 0.5], [0.2, 0.3, 0.4, 0.5]], np.float32)
    o, n = clipped_inverse(get_activation("sigmoid"), s, 1e-3)
    assert n.tolist() == [3, 0]
    np.testing.assert_allclose(o[0, :3], [np.log(1e-3 / (1 - 1e-3)), np.log((1 - 1e-3) / 1e-3),
                                          np.log((1 - 1e-3) / 1e-3)], rtol=1e-4)


@settings(max_examples=50, deadline=None)
@given(st.sampled_from(["tanh", "sigmoid", "identity"]),
       st.lists(st.floats(-12, 12), min_size=1, max_size=20))
def test_inverse_undoes_forward_inside_the_clip(name, values):
    act = get_activation(name)
    y = np.array([values], np.float64)
    x = np.asarray(act.forward(y))
    o, n = clipped_inverse(act, x, 1e-4)
    inside = (np.abs(y) < 4.0) if name != "identity" else np.ones_like(y, bool)
    np.testing.assert_allclose(np.asarray(o)[inside], y[inside], rtol=1e-3, atol=1e-3)
    # Clipped are the values whose pre-activation lies beyond σ⁻¹ of the clipped range's ends:
    # |y| > atanh(1 − 1e-4) ≈ 4.95 for tanh, |y| > logit(1 − 1e-4) ≈ 9.21 for sigmoid.
    edge = {"tanh": np.arctanh(1 - 1e-4), "sigmoid": np.log((1 - 1e-4) / 1e-4),
            "identity": np.inf}[name]
    assume(np.all(np.abs(np.abs(y) - edge) > 1e-6))  # not on the edge, where rounding decides
    assert int(n[0]) == int(np.sum(np.abs(y) > edge))


def test_bad_names_and_clips():
    with pytest.raises(ValueError, match="activation='relu'"):
        get_activation("relu")
    for clip in (0, 0.5, -1, "x"):
        with pytest.raises(ValueError, match="clip="):
            check_clip(clip)
    assert set(ACTIVATIONS) == {"tanh", "sigmoid", "identity"}
