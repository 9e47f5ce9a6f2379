"""Checkpoint module: round trip, atomic replace, refusals."""

import jax.numpy as jnp
import numpy as np
import pytest

from flipad_jax import checkpoint


def _tree():
    return {"a": jnp.arange(5.0), "b": {"c": np.ones((2, 3), np.float32),
                                        "d": np.arange(4, dtype=np.int32)}}


def test_round_trip_and_overwrite(tmp_path):
    path = tmp_path / "ck"
    checkpoint.save(path, _tree(), {"k": [1, 2.5]})
    assert checkpoint.load_meta(path) == {"k": [1, 2.5]}
    restored = checkpoint.load_arrays(path, _tree())
    np.testing.assert_array_equal(restored["a"], np.arange(5.0))
    np.testing.assert_array_equal(restored["b"]["c"], np.ones((2, 3)))
    np.testing.assert_array_equal(restored["b"]["d"], np.arange(4))
    assert (restored["b"]["c"].dtype, restored["b"]["d"].dtype) == (np.float32, np.int32)
    with pytest.raises(ValueError, match="exists"):
        checkpoint.save(path, _tree(), {})
    checkpoint.save(path, {"a": jnp.zeros(2)}, {"k": 2}, overwrite=True)
    assert checkpoint.load_meta(path) == {"k": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary folders left


def test_failed_save_leaves_nothing(tmp_path):
    with pytest.raises(TypeError):
        checkpoint.save(tmp_path / "ck", _tree(), {"bad": object()})
    assert list(tmp_path.iterdir()) == []


def test_mismatch_and_missing(tmp_path):
    path = tmp_path / "ck"
    checkpoint.save(path, _tree(), {})
    wrong = _tree()
    wrong["a"] = jnp.arange(6.0)
    with pytest.raises(ValueError, match=r"\['a'\].*expected \(6,\)"):
        checkpoint.load_arrays(path, wrong)
    with pytest.raises(ValueError, match="do not match"):
        checkpoint.load_arrays(path, {"zz": jnp.zeros(1)})
    with pytest.raises(ValueError, match="checkpoint folder"):
        checkpoint.load_meta(tmp_path / "nothing")
    (path / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        checkpoint.load_meta(path)
