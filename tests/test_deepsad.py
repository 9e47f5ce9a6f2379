"""DeepSAD: centre, loss, optimiser, training behaviour and determinism."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flipad_jax.deepsad import (adam_l2, deepsad_loss, init_center, lr_schedule, push_from_zero,
                                score, train_deepsad)
from flipad_jax.networks import build_network


def test_push_from_zero_hand_example():
    c = jnp.array([0.05, -0.02, 0.0, 0.3, -0.5, 0.1, -0.0999])
    np.testing.assert_array_equal(push_from_zero(c, 0.1),
                                  np.float32([0.1, -0.1, 0.0, 0.3, -0.5, 0.1, -0.1]))


def test_center_is_mean_initial_embedding_in_eval_mode():
    net = build_network("mlp", in_features=4, hidden=(8,), rep_dim=6)
    x = jax.random.normal(jax.random.key(3), (37, 4)) + 2.0
    v = net.init(jax.random.key(0), x[:1])
    c = init_center(net, v, x, batch_size=10)  # several batches, the last one partial
    # The mean over all 37 in one eval-mode pass; the push off zero is the rule checked by hand
    # in test_push_from_zero_hand_example.
    z = np.asarray(net.apply(v, x, train=False), np.float64).mean(axis=0)
    np.testing.assert_allclose(c, push_from_zero(jnp.asarray(z, jnp.float32), 0.1), rtol=1e-5)


def test_loss_hand_computed():
    dist = jnp.array([1.0, 4.0, 0.5, 2.0])
    y = jnp.array([1, -1, 0, 1])
    eta = 2.0
    expected = np.mean([2 * (1 + 1e-6), 2 / (4 + 1e-6), 0.5, 2 * (2 + 1e-6)])
    np.testing.assert_allclose(deepsad_loss(dist, y, eta), expected, rtol=1e-6)


@pytest.mark.torch
def test_adam_l2_with_milestones_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 3)), rng.normal(size=5)
    w0 = rng.normal(size=3)
    wt = torch.tensor(w0, requires_grad=True)
    opt = torch.optim.Adam([wt], lr=0.05, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=(2, 4), gamma=0.1)
    steps_per_epoch = 3
    tx = adam_l2(lr_schedule(0.05, steps_per_epoch, (2, 4), 0.1), 0.1)
    with jax.enable_x64(True):
        w = jnp.asarray(w0)
        state = tx.init(w)
        loss = lambda w: jnp.sum(jnp.square(jnp.asarray(a) @ w - jnp.asarray(b)))
        for _ in range(6):
            for _ in range(steps_per_epoch):
                opt.zero_grad()
                ((torch.tensor(a) @ wt - torch.tensor(b)) ** 2).sum().backward()
                opt.step()
                upd, state = tx.update(jax.grad(loss)(w), state, w)
                w = w + upd
            sched.step()
        np.testing.assert_allclose(w, wt.detach().numpy(), rtol=1e-10, atol=1e-12)


def _gaussians(key, n, d=8, shift=8.0):
    k1, k2 = jax.random.split(key)
    inl = jax.random.normal(k1, (n, d))
    out = jax.random.normal(k2, (n, d)) + shift / np.sqrt(d)
    return np.asarray(inl, np.float32), np.asarray(out, np.float32)


def _fit_gaussians(seed=0, epochs=8):
    net = build_network("mlp", in_features=8, hidden=(32, 16), rep_dim=8)
    inl, out = _gaussians(jax.random.key(100), 512)
    x = np.concatenate([inl, out])
    y = np.r_[np.ones(512), -np.ones(512)]
    model, log = train_deepsad(net, x, y, key=jax.random.key(seed), epochs=epochs, lr=1e-3,
                               lr_milestones=(6,), batch_size=64, progress=False)
    return net, model, log


def test_separates_two_shifted_gaussians():
    net, model, log = _fit_gaussians()
    assert log.loss[-1] < log.loss[0]
    np.testing.assert_allclose(log.lr, [1e-3] * 6 + [1e-4] * 2, rtol=1e-6)
    inl, out = _gaussians(jax.random.key(7), 1000)
    s_in, s_out = score(net, model, inl), score(net, model, out)
    assert np.std(s_in) > 0 and np.std(s_out) > 0  # not collapsed
    tau = np.quantile(s_in, 0.99)
    acc = 0.5 * (np.mean(s_in <= tau) + np.mean(s_out > tau))
    assert acc >= 0.99, acc


def test_same_seed_same_result_and_other_seed_differs():
    _, m1, l1 = _fit_gaussians(seed=3, epochs=2)
    _, m2, l2 = _fit_gaussians(seed=3, epochs=2)
    _, m3, _ = _fit_gaussians(seed=4, epochs=2)
    for a, b in zip(jax.tree_util.tree_leaves(m1), jax.tree_util.tree_leaves(m2)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(l1.loss, l2.loss)
    assert not np.array_equal(m1.center, m3.center)


def test_bad_input():
    net = build_network("mlp", in_features=3, hidden=(4,), rep_dim=2)
    x = np.zeros((10, 3), np.float32)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="semi_targets holds"):
        train_deepsad(net, x, np.full(10, 2), key=key, progress=False)
    with pytest.raises(ValueError, match="semi_targets has shape"):
        train_deepsad(net, x, np.ones(9), key=key, progress=False)
    with pytest.raises(ValueError, match="batch_size=128"):
        train_deepsad(net, x, np.ones(10), key=key, progress=False)
    with pytest.raises(ValueError, match="NaN"):
        train_deepsad(net, np.full((10, 3), np.nan, np.float32), np.ones(10), key=key,
                      batch_size=5, progress=False)


def test_pyod_form_fit_x_y():
    from flipad_jax.deepsad import DeepSAD
    inl, out = _gaussians(jax.random.key(11), 256)
    x = np.concatenate([inl, out[:32]])                 # mostly unlabelled normal data
    y = np.r_[np.zeros(256), np.ones(32)].astype(int)   # PyOD: 1 = known anomaly
    kw = dict(network="mlp", network_kwargs=dict(in_features=8, hidden=(16,), rep_dim=4),
              epochs=6, batch_size=32, lr=1e-3, progress=False)
    a = DeepSAD(**kw).fit(x, y)
    b = DeepSAD(**kw).fit(x, semi_targets=np.where(y == 1, -1, 0))
    np.testing.assert_array_equal(a.decision_function(out), b.decision_function(out))
    test_in, test_out = _gaussians(jax.random.key(12), 200)
    assert np.median(a.decision_function(test_out)) > np.quantile(a.decision_function(test_in), 0.9)
    with pytest.raises(ValueError, match="at most one"):
        DeepSAD(**kw).fit(x, y, semi_targets=y)
    with pytest.raises(ValueError, match=r"1 \(known anomaly\)"):
        DeepSAD(**kw).fit(x, -np.ones(len(x)))
    with pytest.raises(ValueError, match="not fitted"):
        DeepSAD().decision_function(x)


def test_repeated_milestone_applies_gamma_twice_like_torch():
    torch = pytest.importorskip("torch")
    from flipad_jax.deepsad import lr_schedule
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[1, 1, 3], gamma=0.1)
    ours = lr_schedule(1.0, 1, (1, 1, 3))
    for epoch in range(5):
        np.testing.assert_allclose(float(ours(epoch)), opt.param_groups[0]["lr"], rtol=1e-6)
        opt.step()
        sched.step()


def test_score_in_cpu_chunks_equals_one_forward():
    """Scoring splits large batches into row chunks on a CPU; the scores are those of one
    eval-mode forward over all rows."""
    from flipad_jax.deepsad import CPU_EVAL_ROWS, DeepSADModel
    net = build_network("lenet_cifar10", in_channels=2, input_size=8, widths=(4, 3), rep_dim=5)
    x = np.asarray(jax.random.normal(jax.random.key(4), (2 * CPU_EVAL_ROWS + 37, 2, 8, 8)))
    v = net.init(jax.random.key(0), x[:1])
    model = DeepSADModel(v, jnp.full((5,), 0.3))
    z = np.asarray(net.apply(v, x, train=False), np.float64)
    expected = np.sum(np.square(z - 0.3), axis=-1)
    np.testing.assert_allclose(score(net, model, x, batch_size=1024), expected, rtol=1e-5)
