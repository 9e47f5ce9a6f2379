"""Batch-axis sharding (flipad_jax.sharding): padding, and inversion and scoring on eight forced
CPU devices equal to one device."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flipad_jax as fj
from flipad_jax.detector import Detector
from flipad_jax.sharding import (batch_sharding, bucket_size, device_batches, map_batches,
                                 pad_rows)

EIGHT = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")


def _run_on_eight_devices(code: str):
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=EIGHT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def tiny_head(w):
    """ConvT 4→3 (k4 s2 p1), 8×8 → 16×16, tanh; built in the subprocesses too, from ``w``."""
    op = fj.ConvTranspose2d(jnp.asarray(w), stride=2, padding=1, in_size=(8, 8))
    return fj.Head(op, "tanh", jnp.full((4, 8, 8), 1.0 / np.sqrt(2 * np.pi)))


def spy_on(head):
    """Record (rows, devices holding z, z's partition spec or None) of each later
    ``head.invert``."""
    seen, invert = [], head.invert

    def spied(x, *args, **kwargs):
        res = invert(x, *args, **kwargs)
        sharding = res.z.sharding
        seen.append((x.shape[0], len(sharding.device_set), getattr(sharding, "spec", None)))
        return res

    head.invert = spied
    return seen


def _tiny_head_weight():
    return np.asarray(jax.random.normal(jax.random.key(0), (4, 3, 4, 4)) * 0.3, np.float32)


def _tiny_images(w, n, seed, noise=0.0):
    """``n`` images of ``tiny_head(w)`` from ReLU(N(0, 1)) activations, plus Gaussian noise."""
    head, rng = tiny_head(w), np.random.default_rng(seed)
    z = np.maximum(rng.normal(size=(n,) + head.in_shape), 0).astype(np.float32)
    x = np.asarray(head.forward(z)) + noise * rng.normal(size=(n,) + head.out_shape)
    return np.clip(x, -0.99, 0.99).astype(np.float32)


# The subprocess imports the helpers above from this file.
PRELUDE = f"""
    import sys
    sys.path.insert(0, {os.path.dirname(__file__)!r})
    import jax, numpy as np
    from test_sharding import spy_on, tiny_head
    assert len(jax.local_devices()) == 8, jax.local_devices()
"""


@pytest.mark.parametrize("k", [1, 3, 8])
def test_bucket_sizes_are_few_device_multiples_covering_the_batch(k):
    for batch_size in (1, 5, 12, 16, 1000):
        full = -(-batch_size // k) * k
        sizes = {bucket_size(n, batch_size, k) for n in range(1, batch_size + 1)}
        assert all(s % k == 0 for s in sizes)
        assert bucket_size(batch_size, batch_size, k) == full  # full batches are not grown
        assert all(n <= bucket_size(n, batch_size, k) <= full for n in range(1, batch_size + 1))
    assert bucket_size(1, 1000, 8) == 8 and bucket_size(37, 1000, 8) == 64
    assert len({bucket_size(n, 1000, 8) for n in range(1, 1001)}) == 8  # 8, 16, ..., 512, 1000
    assert bucket_size(1, 12, 8) == 8 and bucket_size(12, 12, 8) == 16
    with pytest.raises(ValueError, match="size=0"):
        bucket_size(0, 12, 8)


def test_padding_repeats_the_last_row_and_is_dropped_again():
    x = np.arange(5 * 2, dtype=np.uint8).reshape(5, 2)
    padded = pad_rows(x, 8)
    assert padded.shape == (8, 2) and padded.dtype == np.uint8
    np.testing.assert_array_equal(padded[:5], x)
    np.testing.assert_array_equal(padded[5:], np.repeat(x[-1:], 3, axis=0))
    assert pad_rows(x, 5) is x
    with pytest.raises(ValueError, match="x has 5 rows"):
        pad_rows(x, 4)

    x = np.random.default_rng(0).normal(size=(37, 3)).astype(np.float32)
    k = batch_sharding().mesh.size
    batches = list(device_batches(x, 12))
    assert [size for _, size in batches] == [12, 12, 12, 1]
    assert [b.shape[0] for b, _ in batches] == [bucket_size(n, 12, k) for n in (12, 12, 12, 1)]
    np.testing.assert_array_equal(np.concatenate([np.asarray(b)[:n] for b, n in batches]), x)
    np.testing.assert_array_equal(map_batches(lambda b: 2 * b, x, 12), 2 * x)


def test_invert_in_batches_cuts_padding_from_every_output():
    w = _tiny_head_weight()
    head, x = tiny_head(w), _tiny_images(w, 11, seed=1, noise=0.05)
    whole = head.invert(x, max_iter=144)
    # Some samples stop on their own and some hit the cap, so equal statuses and iteration
    # counts below say something.
    assert set(np.asarray(whole.status).tolist()) == {0, 1}
    res = head.invert_batches(x, batch_size=4, max_iter=144)  # 4, 4, 3 (padded to 4)
    assert res.z.shape == (11,) + head.in_shape
    assert all(getattr(res, k).shape == (11,) for k in ("iterations", "objective", "gap",
                                                        "status", "clipped"))
    np.testing.assert_allclose(res.z, np.asarray(whole.z), atol=1e-6)
    np.testing.assert_array_equal(res.iterations, np.asarray(whole.iterations))


def test_cpu_chunks_change_the_time_not_the_result(monkeypatch):
    """On a CPU a batch is solved in cache-sized chunks under a per-sample stop rule, with the
    same result; the reference's batch-wide rule keeps the whole batch in one solve."""
    import flipad_jax.head as head_module

    w = _tiny_head_weight()
    head, x = tiny_head(w), _tiny_images(w, 11, seed=1, noise=0.05)
    row_bytes = 4 * int(np.prod(head.in_shape))
    monkeypatch.setattr(head_module, "CPU_SOLVE_BYTES", 3 * row_bytes + row_bytes // 2)
    assert head.solve_rows() == 3
    seen = spy_on(head)
    for stop in ("gap", "change"):
        kw = dict(max_iter=55, stop=stop, tol=1e-4)
        whole = head.invert(x, **kw)
        seen.clear()
        res = head.invert_batches(x, batch_size=8, **kw)
        assert [rows for rows, _, _ in seen] == [bucket_size(3, 3, 1)] * 3 + [bucket_size(2, 3, 1)]
        np.testing.assert_allclose(res.z, np.asarray(whole.z), atol=1e-6)
        np.testing.assert_array_equal(res.iterations, np.asarray(whole.iterations))

    kw = dict(stop="reference", tol=1e-3, max_iter=300)
    seen.clear()
    res = head.invert_batches(x, batch_size=8, **kw)
    assert [rows for rows, _, _ in seen] == [8, bucket_size(3, 8, 1)]
    first = head.invert(x[:8], **kw)  # one batch-wide stop over all 8 rows
    np.testing.assert_array_equal(res.iterations[:8], np.asarray(first.iterations))
    np.testing.assert_allclose(res.z[:8], np.asarray(first.z), atol=1e-6)
    assert len(set(np.asarray(first.iterations).tolist())) == 1


@pytest.mark.slow
def test_inversion_on_eight_devices_equals_one_device(tmp_path):
    w = _tiny_head_weight()
    np.save(tmp_path / "w.npy", w)
    np.save(tmp_path / "x.npy", _tiny_images(w, 37, seed=1, noise=0.05))
    _run_on_eight_devices(PRELUDE + f"""
    head = tiny_head(np.load({str(tmp_path / 'w.npy')!r}))
    x = np.load({str(tmp_path / 'x.npy')!r})
    # Per-sample stopping: one unsharded solve of all 37 on device 0 is the reference.
    kw = dict(lam=5e-4, max_iter=144)
    single = head.invert(x, **kw)
    assert len(single.z.sharding.device_set) == 1
    assert set(np.asarray(single.status).tolist()) == {{0, 1}}  # some converged, some capped
    seen = spy_on(head)
    sharded = head.invert_batches(x, batch_size=12, **kw)
    # 12, 12, 12 real rows padded to 16, then 1 row padded to 8: all split over 8 devices.
    assert seen == [(16, 8, jax.sharding.PartitionSpec("batch"))] * 3 + \\
        [(8, 8, jax.sharding.PartitionSpec("batch"))], seen
    np.testing.assert_allclose(sharded.z, np.asarray(single.z), atol=1e-5)
    for k in ("status", "iterations", "clipped"):
        np.testing.assert_array_equal(getattr(sharded, k), np.asarray(getattr(single, k)),
                                      err_msg=k)
    np.testing.assert_allclose(sharded.objective, np.asarray(single.objective), rtol=1e-5)

    # A batch-wide stop rule (the reference's): the copies padding a batch do not move it, so
    # each sharded batch stops where its unpadded single-device solve does.
    kw = dict(lam=5e-4, stop="reference", tol=1e-3, max_iter=300)
    sharded = head.invert_batches(x, batch_size=12, **kw)
    parts = [head.invert(x[i:i + 12], **kw) for i in range(0, 37, 12)]
    iters = np.concatenate([np.asarray(p.iterations) for p in parts])
    assert np.all(np.concatenate([np.asarray(p.status) for p in parts]) == 0)  # stopped by rule
    np.testing.assert_array_equal(sharded.iterations, iters)
    np.testing.assert_allclose(sharded.z, np.concatenate([np.asarray(p.z) for p in parts]),
                               atol=1e-5)
    print("OK")
    """)


@pytest.mark.slow
def test_flipad_detector_scores_on_eight_devices_equal_one_device(tmp_path):
    w = _tiny_head_weight()
    head = tiny_head(w)
    model, val = _tiny_images(w, 32, seed=2), _tiny_images(w, 20, seed=3)
    other = np.tanh(np.random.default_rng(4).normal(0, 0.6, model.shape)).astype(np.float32)
    x = np.concatenate([_tiny_images(w, 15, seed=5), other[:14]])  # 29: padded tails
    det = Detector(fj.FeatureConfig("flipad", lam=5e-4, lasso=fj.LassoOptions(max_iter=40)),
                   training=fj.DeepSADConfig(epochs=2, batch_size=16, score_batch_size=12,
                                             network_kwargs=dict(widths=(4, 4, 4), rep_dim=8)),
                   head=head, fnrs=(0.05,), progress=False)
    det.fit(model, other, val)
    det.save(tmp_path / "det")
    np.save(tmp_path / "w.npy", w)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "s.npy", det.anomaly_score(x))
    _run_on_eight_devices(PRELUDE + f"""
    import dataclasses
    from flipad_jax.detector import Detector
    head = tiny_head(np.load({str(tmp_path / 'w.npy')!r}))
    det = Detector.load({str(tmp_path / 'det')!r}, head=head)
    # Batches of 12 images for the inversion too: three batches, the last one padded.
    det.feature_config = dataclasses.replace(det.feature_config, invert_batch_size=12)
    seen = spy_on(head)
    s = det.anomaly_score(np.load({str(tmp_path / 'x.npy')!r}))
    assert [rows for rows, _, _ in seen] == [16, 16, 8] and {{d for _, d, _ in seen}} == {{8}}
    np.testing.assert_allclose(s, np.load({str(tmp_path / 's.npy')!r}), rtol=1e-5, atol=1e-6)
    print("OK")
    """)
