"""DeepSAD (Ruff et al., ICLR 2020) with Optax: centre, loss, training loop, batched scoring.

Objective, per batch of n samples with labels ỹ ∈ {+1 inlier, −1 outlier, 0 unlabelled} and
d(x) = ‖φ(x) − c‖² (paper eq. 6; the reference's per-sample form):

    loss = (1/n) Σ_i  { d(x_i)                     if ỹ_i = 0
                      { η · (d(x_i) + 1e-6)^{ỹ_i}   otherwise

so inliers are pulled to c and outliers pushed away through the inverse distance; weight decay is
Adam's coupled L2 term. The score is s(x) = d(x) with BatchNorm in eval mode (running statistics):
higher means less likely an inlier.

Centre c: the mean embedding of the whole training set under the freshly initialised network in
eval mode, then every coordinate with 0 < |c_j| < eps (0.1) set to ±eps by its sign, so no
coordinate is trivially reachable; an exact 0 stays 0, as in the reference.

Training (reference and paper, App. G.7): Adam(lr 5e-4, β (0.9, 0.999), eps 1e-8) with coupled
weight decay 5e-7 (added to the gradient before the moments, as ``torch.optim.Adam(weight_decay=)``),
learning rate ×0.1 at epochs 25, 50, 100 (PyTorch's ``MultiStepLR``, stepped per epoch), batch 128,
50 epochs, shuffled each epoch with ``fold_in(key, epoch)``, last partial batch dropped, BatchNorm in
train mode (batch statistics), last epoch's weights kept. No autoencoder pretraining: the
reference's attribution scripts never use it (METHOD.md §4).

The train step is one jit-compiled function (forward, loss, gradient, Adam update, BatchNorm
statistics) with donated state; it gathers its batch from the training set, which stays on the
device.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from tqdm.auto import tqdm

from flipad_jax._checks import check_finite, check_floating, check_int, check_labels
from flipad_jax._optax import standard_promotion
from flipad_jax.cpu_convolutions import eigen_jit
from flipad_jax.sharding import map_batches

DIST_EPS = 1e-6  # added to d before the power ỹ (the reference's ``eps``)


class DeepSADModel(NamedTuple):
    """A trained DeepSAD: everything needed to score (a pytree of arrays).

    Attributes:
      variables: Flax variables ``{"params": ..., "batch_stats": ...}``.
      center: ``(rep_dim,)`` float32, c.
    """

    variables: dict
    center: jax.Array


class TrainLog(NamedTuple):
    """Per epoch, ``(epochs,)``: mean training loss, learning rate, wall-clock seconds (the first
    epoch includes compilation; samples/s = n_batches · batch_size / seconds)."""

    loss: np.ndarray
    lr: np.ndarray
    seconds: np.ndarray


def deepsad_loss(dist, semi_targets, eta: float = 1.0):
    """Mean DeepSAD loss of a batch.

    Args:
      dist: ``(n,)`` squared distances d = ‖φ(x) − c‖².
      semi_targets: ``(n,)`` labels, +1 inlier, −1 outlier, 0 unlabelled (any numeric dtype).
      eta: weight η of the labelled terms.

    Returns:
      scalar, (1/n) Σ [d if ỹ = 0 else η (d + 1e-6)^ỹ].
    """
    y = jnp.asarray(semi_targets, dist.dtype)
    labelled = eta * jnp.power(dist + DIST_EPS, y)
    return jnp.mean(jnp.where(y == 0, dist, labelled))


def push_from_zero(center, eps: float = 0.1):
    """Coordinates with 0 < |c_j| < eps moved to sign(c_j)·eps; exact zeros stay (reference)."""
    small = jnp.abs(center) < eps
    return jnp.where(small & (center < 0), -eps, jnp.where(small & (center > 0), eps, center))


def lr_schedule(lr: float, steps_per_epoch: int, milestones: Sequence[int] = (25, 50, 100),
                gamma: float = 0.1):
    """Piecewise-constant schedule over optimiser steps: ×gamma from each milestone epoch on (a
    milestone listed twice applies gamma twice, as torch's MultiStepLR does)."""
    boundaries = {}
    for m in sorted(int(m) for m in milestones):
        step = m * steps_per_epoch
        boundaries[step] = boundaries.get(step, 1.0) * gamma
    return optax.piecewise_constant_schedule(lr, boundaries)


def adam_l2(schedule, weight_decay: float = 5e-7, b1: float = 0.9, b2: float = 0.999,
            eps: float = 1e-8) -> optax.GradientTransformation:
    """``torch.optim.Adam(weight_decay=wd)``: the decay wd·θ joins the gradient before Adam."""
    return standard_promotion(optax.chain(
        optax.add_decayed_weights(weight_decay), optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        optax.scale_by_schedule(lambda count: -schedule(count))))


# Rows per eval-mode call on a CPU: a 1024-row batch's activations (134 MB for lenet_cifar10's
# first block) overflow the cache, 128 rows' stay in it.
CPU_EVAL_ROWS = 128


@eigen_jit(static_argnums=0)
def _embed(net, variables, x):
    return net.apply(variables, x, train=False)


@eigen_jit(static_argnums=0)
def _score(net, model, x):
    z = net.apply(model.variables, x, train=False)
    return jnp.sum(jnp.square(z - model.center[None]), axis=-1)


def _in_chunks(fn, xb):
    """``fn(xb)``, on a CPU in row chunks of :data:`CPU_EVAL_ROWS` (rows are independent)."""
    if jax.default_backend() != "cpu" or xb.shape[0] <= CPU_EVAL_ROWS:
        return fn(xb)
    return jnp.concatenate([fn(xb[i:i + CPU_EVAL_ROWS])
                            for i in range(0, xb.shape[0], CPU_EVAL_ROWS)])


def embed(net: nn.Module, variables, x, *, batch_size: int = 1024, progress: bool = False):
    """φ(x) in eval mode: ``(n, *in_shape)`` → ``(n, rep_dim)`` numpy float32, batched."""
    fn = functools.partial(_embed, net, variables)
    return map_batches(lambda xb: _in_chunks(fn, xb), x, batch_size, progress=progress,
                       desc="embed")


def score(net: nn.Module, model: DeepSADModel, x, *, batch_size: int = 1024,
          progress: bool = False):
    """s(x) = ‖φ(x) − c‖² in eval mode: ``(n, *in_shape)`` → ``(n,)`` numpy float32, batched,
    jit-compiled, sharded over the local devices when there are several."""
    fn = functools.partial(_score, net, model)
    return map_batches(lambda xb: _in_chunks(fn, xb), x, batch_size, progress=progress,
                       desc="score")


def init_center(net: nn.Module, variables, x, *, eps: float = 0.1, batch_size: int = 1024):
    """c = mean of φ(x) over all of ``x`` (eval mode), then :func:`push_from_zero`."""
    z = embed(net, variables, x, batch_size=batch_size)
    return push_from_zero(jnp.asarray(z.astype(np.float64).mean(axis=0), jnp.float32), eps)


SEMI_TARGETS = {1: "inlier", -1: "outlier", 0: "unlabelled"}  # DeepSAD's label convention


def check_semi_targets(semi_targets, n: int):
    """``(n,)`` labels in {−1, 0, +1} as int32; ValueError otherwise."""
    return check_labels("semi_targets", semi_targets, n, SEMI_TARGETS)


def train_deepsad(net: nn.Module, x, semi_targets, *, key, epochs: int = 50, lr: float = 5e-4,
                  lr_milestones: Sequence[int] = (25, 50, 100), lr_gamma: float = 0.1,
                  weight_decay: float = 5e-7, batch_size: int = 128, eta: float = 1.0,
                  center_eps: float = 0.1, progress: bool = True
                  ) -> tuple[DeepSADModel, TrainLog]:
    """Train DeepSAD on ``x`` with labels ``semi_targets`` (see the module docstring).

    Args:
      net: a Flax module from :mod:`flipad_jax.networks`, called as ``net(x, train=...)``.
      x: ``(n, *in_shape)`` float32 training inputs (both classes).
      semi_targets: ``(n,)`` +1 inlier (G's samples), −1 outlier, 0 unlabelled.
      key: ``jax.random`` key; network init and shuffling derive from it, so the same key gives
        identical results.
      epochs, lr, lr_milestones, lr_gamma, weight_decay, batch_size, eta: as in the paper.
      center_eps: the eps of :func:`push_from_zero`.
      progress: show a progress bar with the epoch's mean loss.

    Returns:
      ``(DeepSADModel, TrainLog)``.
    """
    check_floating("x", x)
    x = jnp.asarray(x, jnp.float32)
    n = x.shape[0]
    y = jnp.asarray(check_semi_targets(semi_targets, n))
    check_finite("x", x)
    check_int("epochs", epochs)
    if not (isinstance(batch_size, (int, np.integer)) and 1 <= batch_size <= n):
        raise ValueError(f"batch_size={batch_size!r}: expected an int in [1, {n}] (the number "
                         "of training samples; the last partial batch is dropped)")
    for name, value in (("lr", lr), ("weight_decay", weight_decay), ("eta", eta),
                        ("center_eps", center_eps), ("lr_gamma", lr_gamma)):
        if not (np.isscalar(value) and np.isfinite(value) and value >= 0):
            raise ValueError(f"{name}={value!r}: expected a finite number >= 0")

    init_key, shuffle_key = jax.random.split(key)
    variables = _init(net, init_key, x[:1])
    center = init_center(net, variables, x, eps=center_eps)

    n_batches = n // batch_size
    step, tx, schedule = _trainer(net, float(eta), n_batches, float(lr),
                                  tuple(int(m) for m in lr_milestones), float(lr_gamma),
                                  float(weight_decay))
    params, batch_stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)

    losses, lrs, seconds = [], [], []
    bar = tqdm(range(epochs), desc="DeepSAD", disable=not progress)
    for e in bar:
        lrs.append(float(schedule(e * n_batches)))
        start = time.perf_counter()
        batches = _epoch_batches(jax.random.fold_in(shuffle_key, e), n, n_batches, batch_size)
        batch_losses = []
        for idx in batches:
            params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, center,
                                                        x, y, idx)
            batch_losses.append(loss)
        losses.append(float(np.mean(jax.device_get(batch_losses))))
        seconds.append(time.perf_counter() - start)
        bar.set_postfix(loss=f"{losses[-1]:.4g}", lr=f"{lrs[-1]:.1e}")
    if not np.all(np.isfinite(losses)):
        raise FloatingPointError(f"DeepSAD training diverged: epoch losses {losses}")
    model = DeepSADModel({"params": params, "batch_stats": batch_stats}, center)
    return model, TrainLog(np.asarray(losses, np.float32), np.asarray(lrs, np.float32),
                           np.asarray(seconds))


# One compiled init, not one eager compile per layer's initialiser (3.0 s → 1.0 s for LeNet on
# CPU), and compiled once per network and input shape: a fresh jax.jit per fit recompiled it
# every time (1.5 s of each refit in the quick demo). The random draws are the same bits.
@functools.partial(jax.jit, static_argnums=0)
def _init(net, key, x):
    return net.init(key, x, train=False)


@functools.lru_cache(maxsize=32)
def _trainer(net, eta, n_batches, lr, milestones, gamma, weight_decay):
    """(compiled train step, optimiser, schedule) per network and settings; cached so that refits
    with the same settings reuse the compiled program."""
    schedule = lr_schedule(lr, n_batches, milestones, gamma)
    tx = adam_l2(schedule, weight_decay)

    # A Python loop over this step, not a lax.scan: XLA:CPU runs convolutions inside a while
    # loop far slower than as top-level ops (re-measured on jax 0.10.2: 2 steps 83 s against
    # 1.1 s unrolled). Unrolling k steps in one jit did not pay for its compile time either.
    @eigen_jit(donate_argnums=(0, 1, 2))
    def step(params, batch_stats, opt_state, center, x, y, idx):
        xb, yb = x[idx], y[idx]  # gather on the device: the training set is never copied

        def loss_fn(p):
            z, updates = net.apply({"params": p, "batch_stats": batch_stats}, xb, train=True,
                                   mutable=["batch_stats"])
            dist = jnp.sum(jnp.square(z - center[None]), axis=-1)
            return deepsad_loss(dist, yb, eta), updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    return step, tx, schedule


@functools.partial(jax.jit, static_argnames=("n", "n_batches", "batch_size"))
def _epoch_batches(key, n, n_batches, batch_size):
    """The epoch's shuffled index batches, ``(n_batches, batch_size)``; the rest is dropped."""
    return jax.random.permutation(key, n)[:n_batches * batch_size].reshape(n_batches, batch_size)


@dataclasses.dataclass(frozen=True)
class DeepSADConfig:
    """DeepSAD's network and training settings, with the paper's defaults (App. G.7, the
    reference's image launchers); JSON-able (saved with a detector).

    Attributes:
      network: a name of :data:`flipad_jax.networks.ARCHITECTURES`; None: chosen from the input
        shape (:func:`~flipad_jax.networks.default_network`).
      network_kwargs: overrides for the network (e.g. ``rep_dim``, ``widths``).
      epochs, lr, lr_milestones, lr_gamma, weight_decay, batch_size, eta, center_eps: training,
        see :func:`train_deepsad` (tabular in the reference: lr 1e-3, 100 epochs, milestones
        25, 50).
      seed: seed of the network initialisation and the shuffling.
      score_batch_size: batch size of scoring (sharded over local devices).
    """

    network: Optional[str] = None
    network_kwargs: dict = dataclasses.field(default_factory=dict)
    epochs: int = 50
    lr: float = 5e-4
    lr_milestones: tuple = (25, 50, 100)
    lr_gamma: float = 0.1
    weight_decay: float = 5e-7
    batch_size: int = 128
    eta: float = 1.0
    center_eps: float = 0.1
    seed: int = 0
    score_batch_size: int = 1024

    def __post_init__(self):
        object.__setattr__(self, "lr_milestones", tuple(int(m) for m in self.lr_milestones))
        # JSON gives lists where Python code wrote tuples: one canonical form, so a loaded
        # config equals the one saved.
        object.__setattr__(self, "network_kwargs", {
            k: tuple(v) if isinstance(v, list) else v for k, v in self.network_kwargs.items()})
        check_int("epochs", self.epochs)
        check_int("batch_size", self.batch_size)
        check_int("score_batch_size", self.score_batch_size)
        check_int("seed", self.seed, minimum=0)

    def replace(self, **changes) -> "DeepSADConfig":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["lr_milestones"] = list(self.lr_milestones)
        return out

    def train_kwargs(self) -> dict:
        """The keyword arguments of :func:`train_deepsad` these settings give."""
        return dict(epochs=self.epochs, lr=self.lr, lr_milestones=self.lr_milestones,
                    lr_gamma=self.lr_gamma, weight_decay=self.weight_decay,
                    batch_size=self.batch_size, eta=self.eta, center_eps=self.center_eps)


class FittedDeepSAD(NamedTuple):
    """What :func:`fit_deepsad` returns: the network's name and keyword arguments, the built
    Flax module, the trained model and the training log."""

    network: tuple
    net: nn.Module
    model: DeepSADModel
    log: TrainLog


def fit_deepsad(x, semi_targets, config: DeepSADConfig, *, extra_network_kwargs=None,
                progress: bool = True) -> FittedDeepSAD:
    """Build the network ``config`` names for inputs shaped like ``x`` and train it.

    Args:
      x: ``(n, *in_shape)`` float32 training inputs; semi_targets: ``(n,)`` +1 / −1 / 0.
      config: :class:`DeepSADConfig`.
      extra_network_kwargs: network keyword arguments decided at fit time (e.g. the selected
        ``channels``), applied over the config's.
    """
    from flipad_jax.networks import build_network, default_network

    name, kwargs = ((config.network, {}) if config.network
                    else default_network(np.shape(x)[1:]))
    kwargs = {**kwargs, **config.network_kwargs, **(extra_network_kwargs or {})}
    net = build_network(name, **kwargs)
    model, log = train_deepsad(net, x, semi_targets, key=jax.random.key(config.seed),
                               progress=progress, **config.train_kwargs())
    return FittedDeepSAD((name, kwargs), net, model, log)


class DeepSAD:
    """DeepSAD as a PyOD-style estimator on arrays (features, not images).

    ``fit(X, y)`` takes PyOD's labels: ``y == 1`` a known anomaly (DeepSAD label −1), ``y == 0``
    unlabelled (label 0, pulled to c like Deep SVDD); or ``semi_targets=`` in DeepSAD's own
    convention (+1 inlier, −1 outlier, 0 unlabelled). ``decision_function(X)`` is PyOD's:
    ‖φ(x) − c‖², higher = more anomalous.

    Args:
      config: :class:`DeepSADConfig` (default: the paper's settings).
      progress: show a progress bar while training.
      **overrides: fields of ``config`` to change (network, epochs, lr, ...).

    Fitted attributes: ``network_`` (name, kwargs), ``net_`` (the Flax module), ``model_``
    (:class:`DeepSADModel`), ``center_``, ``losses_``, ``log_`` (:class:`TrainLog`).
    """

    def __init__(self, config: Optional[DeepSADConfig] = None, *, progress: bool = True,
                 **overrides):
        self.config = (config or DeepSADConfig()).replace(**overrides)
        self.progress = progress

    def fit(self, X, y=None, *, semi_targets=None) -> "DeepSAD":
        n = len(X)
        if y is not None and semi_targets is not None:
            raise ValueError("y and semi_targets: expected at most one of them")
        if y is not None:
            y = check_labels("y", y, n, {1: "known anomaly", 0: "unlabelled"})
            semi_targets = np.where(y == 1, -1, 0)
        elif semi_targets is None:
            semi_targets = np.zeros(n, np.int32)  # all unlabelled: Deep SVDD
        fitted = fit_deepsad(X, semi_targets, self.config, progress=self.progress)
        self.network_, self.net_, self.model_, self.log_ = fitted
        self.losses_ = self.log_.loss
        return self

    @property
    def center_(self):
        return self.model_.center

    def decision_function(self, X):
        """``(n,)`` float32 scores ‖φ(x) − c‖² (eval mode)."""
        if not hasattr(self, "model_"):
            raise ValueError("this DeepSAD is not fitted: call fit(X, y) first")
        check_floating("X", X)
        check_finite("X", X)
        return score(self.net_, self.model_, X, batch_size=self.config.score_batch_size)
