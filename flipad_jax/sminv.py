"""SM-Inv₂: single-model attribution by inverting the whole generator (paper App. G).

For a sample x of size D and a generator G, R restarts each solve

    ẑ_r = argmin_z  d(x, G(z)),    d(x, y) = (1/D) ‖x − y‖₂²   (per-pixel mean squared error)

by Adam (learning rate 0.1, 1000 steps) from z⁽⁰⁾_r ~ N(0, I); the score is the distance of the
best restart, s(x) = min_r d(x, G(ẑ_r)), where each restart is judged by its loss after the last
step (REFERENCE.md §6.2). Lower means "more likely made by G". The paper writes the score as
(1/D)‖x − G(ẑ)‖₂; the authors' code scores with the per-pixel MSE above (``MSELoss``), a
monotone function of it, so rankings, AUC and accuracies agree; we follow the code.

The threshold is τ(fnr) = the (1 − fnr) quantile of the scores of G's *training* samples
(:func:`flipad_jax.metrics.threshold`): inversion fits nothing, so the reference spends its large
training set on the threshold instead of the small validation set. "Made by G" ⇔ s(x) ≤ τ.

Differences from the reference, on purpose:

* G runs in eval mode (BatchNorm running statistics), see :mod:`flipad_jax.generators`; the
  reference leaves BatchNorm in training mode, so its reconstructions depend on the batch.
* Each latent minimises its own d(x, G(z)); the reference minimises the batch mean, whose
  gradient with respect to one latent is 1/B of that. Adam is invariant to that scale except
  for its ε = 1e-8, so the two runs match up to ε's effect, and here a score does not depend on
  the batch size.
* Initial latents are drawn per (restart, sample index) from an explicit key
  (:func:`initial_latents`), so a sample's score does not depend on how the set is batched.

SM-Inv_inc (the Inception-V3 variant) measures d between feature maps instead of pixels:
``reconstruct(..., features=phi)`` with ``phi`` mapping images ``(B, C, H, W)`` to features
``(B, ...)``, d = per-element MSE of ``phi(x)`` and ``phi(G(z))``. The paper's ``phi`` is
Inception-V3 up to ``Mixed_5d`` with pre-trained weights, which cannot be fetched offline; this
package ships no such ``phi``.

Cost: restarts × steps forward+backward passes of G per sample (10 000 for the paper's settings),
the most expensive method of the paper's Table 6. All restarts and a batch of samples run as one
batch of R·B latents through one jitted Adam step (see ``_reconstruct_batch`` for why a loop of
jitted steps and not a ``lax.scan``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from flipad_jax._checks import check_finite, check_floating, check_int, check_positive
from flipad_jax._files import atomic_dir, check_new_path
from flipad_jax._optax import standard_promotion
from flipad_jax.cpu_convolutions import eigen_jit
from flipad_jax.detector import DEFAULT_FNRS, check_fnrs
from flipad_jax.generators import Generator
from flipad_jax.metrics import (check_fnr, made_by_g, min_validation_samples, p_values,
                                threshold)

FORMAT = "flipad_sm_inv2"
META_FILE = "sm_inv2.json"

RESTARTS = 10    # paper App. G / reference --num-inits-inv
STEPS = 1000     # reference --num-steps-inv
LR = 0.1         # reference --lr-inv
BATCH_SIZE = 256  # samples per jitted call (the reference's --batch-size)


class Reconstruction(NamedTuple):
    """Per-sample result of :func:`reconstruct` (numpy arrays, N samples, R restarts).

    Attributes:
      z: ``(N, *latent_shape)`` the kept latent ẑ (of the restart with the lowest final loss).
      distance: ``(N,)`` its d(x, G(ẑ)): the SM-Inv₂ score.
      restart: ``(N,)`` int, index of the kept restart.
      restart_distances: ``(N, R)`` the final d of every restart.
    """

    z: np.ndarray
    distance: np.ndarray
    restart: np.ndarray
    restart_distances: np.ndarray


def initial_latents(key, restarts: int, indices, latent_shape, dtype=jnp.float32):
    """z⁽⁰⁾ ~ N(0, I): ``(restarts, len(indices), *latent_shape)``.

    Restart r of sample i draws from ``fold_in(split(key, restarts)[r], i)``: one key per
    restart, and a sample's start depends only on its index, not on the batch around it."""
    def one(k, i):
        return jax.random.normal(jax.random.fold_in(k, i), tuple(latent_shape), dtype)

    keys = jax.random.split(key, restarts)
    return jax.vmap(lambda k: jax.vmap(lambda i: one(k, i))(jnp.asarray(indices)))(keys)


def _distances(generator, features, z, target):
    """d per latent: z ``(R·B, *latent)``, target ``(B, F)`` flat features → ``(R, B)``."""
    out = generator(z)
    out = out if features is None else features(out)
    out = out.reshape((-1,) + target.shape)
    return jnp.mean(jnp.square(out - target[None]), axis=-1)


def _adam(lr):
    return standard_promotion(optax.adam(lr))  # PyTorch's defaults: betas (0.9, 0.999), eps 1e-8


def _target(images, features):
    """Flat ``(B, F)`` pixels or features of the images to reconstruct."""
    return (images if features is None else features(images)).reshape((images.shape[0], -1))


@eigen_jit(static_argnames=("features",), donate_argnums=(1, 2))
def _adam_step(generator: Generator, z, state, target, lr, *, features: Optional[Callable]):
    """One Adam step on every latent ``(R·B, *latent)``; each gets the gradient of its own d
    (the loss is the sum of the per-latent distances)."""
    def loss(z):
        return jnp.sum(_distances(generator, features, z, target))

    updates, state = _adam(lr).update(jax.grad(loss)(z), state)
    return optax.apply_updates(z, updates), state


@eigen_jit(static_argnames=("restarts", "features"))
def _best(generator: Generator, z, target, *, restarts: int, features: Optional[Callable]):
    """The restart with the lowest final d per sample: (ẑ ``(B, *latent)``, d ``(B,)``,
    restart ``(B,)``, d per restart ``(B, R)``)."""
    d = _distances(generator, features, z, target)                     # (R, B)
    batch = d.shape[1]
    best = jnp.argmin(d, axis=0)
    z_best = z.reshape((restarts, batch) + z.shape[1:])[best, jnp.arange(batch)]
    return z_best, d[best, jnp.arange(batch)], best, d.T


def _reconstruct_batch(generator: Generator, images, z0, lr, *, steps: int,
                       features: Optional[Callable]):
    """R restarts × B samples of Adam from ``z0`` ``(R, B, *latent)``.

    The steps run as a Python loop over one jitted, buffer-donating step rather than inside a
    ``lax.scan``: XLA:CPU runs convolutions inside a loop body far slower than at top level
    (measured on the demo DCGAN, 160 latents, 20 steps: scan 17 s, loop 0.96 s); on a GPU the
    per-step dispatch is asynchronous, so the loop costs little there either."""
    restarts, batch = z0.shape[:2]
    target = _target(images, features)
    z = z0.reshape((restarts * batch,) + z0.shape[2:])
    state = _adam(lr).init(z)
    for _ in range(steps):
        z, state = _adam_step(generator, z, state, target, lr, features=features)
    return _best(generator, z, target, restarts=restarts, features=features)


def check_images(generator: Generator, images):
    """``images`` as a float array; ValueError unless ``(N, *generator.out_shape)``, N ≥ 1,
    floating and finite."""
    images = jnp.asarray(images)
    if images.ndim != len(generator.out_shape) + 1 or images.shape[0] < 1 or \
            tuple(images.shape[1:]) != generator.out_shape:
        raise ValueError(f"images has shape {tuple(images.shape)}: expected (N, "
                         f"{', '.join(map(str, generator.out_shape))}) with N >= 1, the "
                         "generator's image shape")
    check_floating("images", images)
    check_finite("images", images)
    return images


def reconstruct(generator: Generator, images, *, key, restarts: int = RESTARTS,
                steps: int = STEPS, lr: float = LR, batch_size: int = BATCH_SIZE,
                features: Optional[Callable] = None, progress: bool = True) -> Reconstruction:
    """Invert G on every image: the best of ``restarts`` Adam runs per sample (module doc).

    Args:
      generator: a :class:`flipad_jax.generators.Generator` (eval mode).
      images: ``(N, *generator.out_shape)`` floating, in the generator's output range (the
        demo's: [−1, 1]); nothing is clipped.
      key: a ``jax.random`` key for the initial latents (:func:`initial_latents`).
      restarts, steps, lr: the paper's 10, 1000, 0.1 by default.
      batch_size: samples per jitted call (each call runs restarts × batch_size latents); the
        last batch is padded by repeating its last image, so all calls share one compilation.
        The results do not depend on it.
      features: optional image → feature map for d (SM-Inv_inc's place); None = pixels.
      progress: show a progress bar over batches.

    Returns:
      :class:`Reconstruction` of numpy arrays in the images' dtype.
    """
    restarts = check_int("restarts", restarts)
    steps = check_int("steps", steps)
    batch_size = check_int("batch_size", batch_size)
    lr = check_positive("lr", lr)
    images = check_images(generator, images)
    n = images.shape[0]
    batch = min(batch_size, n)
    parts = []
    for start in tqdm(range(0, n, batch), desc="SM-Inv₂", unit="batch", disable=not progress,
                      leave=False):
        x = images[start:start + batch]
        real = x.shape[0]
        if real < batch:
            x = jnp.concatenate([x, jnp.repeat(x[-1:], batch - real, axis=0)])
        z0 = initial_latents(key, restarts, np.arange(start, start + batch),
                             generator.latent_shape, images.dtype)
        out = _reconstruct_batch(generator, x, z0, jnp.asarray(lr, images.dtype), steps=steps,
                                 features=features)
        parts.append([np.asarray(a)[:real] for a in out])
    return Reconstruction(*(np.concatenate(p) for p in zip(*parts)))


class SMInv2:
    """The SM-Inv₂ detector: scores by :func:`reconstruct`, thresholds on G's training samples.

    The names of :class:`flipad_jax.Detector`: ``anomaly_score`` is higher for less likely made
    by G; ``made_by_g`` is True for "made by G" (anomaly score ≤ τ).

    Args:
      generator: the generator G to attribute to.
      restarts, steps, lr, batch_size, features: as in :func:`reconstruct`.
      fnrs: false-negative rates whose thresholds :meth:`fit` computes.
      seed: seed of the initial latents (fit and score draw from separate streams).
      progress: show progress bars.

    Fitted attributes: ``train_scores_`` (n_train,), ``thresholds_`` {fnr: τ}; ``val_scores_``
    is ``train_scores_`` (the scores thresholds and p-values are calibrated on) and
    ``input_shape_`` the generator's image shape, as ``flipad score`` reads them off any
    detector.
    """

    kind = "sm_inv2"  # the method's name, as Detector.kind

    def __init__(self, generator: Generator, *, restarts: int = RESTARTS, steps: int = STEPS,
                 lr: float = LR, batch_size: int = BATCH_SIZE,
                 features: Optional[Callable] = None, fnrs: Sequence[float] = DEFAULT_FNRS,
                 seed: int = 0, progress: bool = True):
        check_int("seed", seed, minimum=0)
        fnrs = check_fnrs(fnrs)
        self.generator = generator
        self.features = features
        self.config = dict(restarts=check_int("restarts", restarts),
                           steps=check_int("steps", steps), lr=check_positive("lr", lr),
                           batch_size=check_int("batch_size", batch_size), fnrs=list(fnrs),
                           seed=int(seed), progress=bool(progress))

    def _reconstruct(self, x, stream: int) -> Reconstruction:
        c = self.config
        key = jax.random.fold_in(jax.random.key(c["seed"]), stream)
        return reconstruct(self.generator, x, key=key, restarts=c["restarts"], steps=c["steps"],
                           lr=c["lr"], batch_size=c["batch_size"], features=self.features,
                           progress=c["progress"])

    def fit(self, x_train) -> "SMInv2":
        """Score G's training samples ``(n, *out_shape)`` and fit τ(fnr) for every fnr on them."""
        x_train = check_images(self.generator, x_train)
        need = max(min_validation_samples(f) for f in self.config["fnrs"])
        if x_train.shape[0] < need:  # checked before the costly inversion
            raise ValueError(f"x_train has {x_train.shape[0]} samples: expected at least {need} "
                             f"(⌈1/fnr⌉ for fnrs={self.config['fnrs']}) for the thresholds")
        scores = self._reconstruct(x_train, 0).distance
        self.thresholds_ = {fnr: threshold(scores, fnr) for fnr in self.config["fnrs"]}
        self.train_scores_ = scores
        return self

    @property
    def val_scores_(self) -> np.ndarray:
        self._check_fitted()
        return self.train_scores_

    @property
    def input_shape_(self) -> tuple:
        return tuple(self.generator.out_shape)

    image_shape_ = input_shape_  # the image shape it takes, as Detector.image_shape_

    def anomaly_score(self, x) -> np.ndarray:
        """s(x) ``(n,)``: the best restart's reconstruction distance."""
        return self._reconstruct(x, 1).distance

    def p_value(self, x) -> np.ndarray:
        """Split-conformal p-values of "made by G", calibrated on the training scores."""
        return p_values(self.val_scores_, self.anomaly_score(x))

    def threshold(self, fnr: float) -> float:
        """τ(fnr), fitted or computed from the stored training scores."""
        self._check_fitted()
        fnr = check_fnr(fnr)
        return self.thresholds_[fnr] if fnr in self.thresholds_ else \
            threshold(self.train_scores_, fnr)

    def made_by_g(self, x, fnr: Optional[float] = None) -> np.ndarray:
        """True where x is attributed to G (s(x) ≤ τ(fnr)); fnr defaults to the smallest fitted."""
        tau = self.threshold(self.config["fnrs"][0] if fnr is None else fnr)
        return made_by_g(self.anomaly_score(x), tau)

    def _check_fitted(self):
        if not hasattr(self, "thresholds_"):
            raise ValueError("this SMInv2 is not fitted: call fit(x_train) first")

    def save(self, path, *, overwrite: bool = False):
        """Write settings, thresholds and training scores to the folder ``path`` (``sm_inv2.json``,
        atomically); returns the path. The generator is not copied; :meth:`load` takes it and
        checks it."""
        self._check_fitted()
        if self.features is not None:
            raise ValueError("features: a custom feature map cannot be saved; save the "
                             "pixel-space SM-Inv₂ only")
        meta = {"format": FORMAT, "format_version": 1, "config": self.config,
                "generator_source": self.generator.meta.get("source"),
                "thresholds": [[f, t] for f, t in sorted(self.thresholds_.items())],
                "train_scores": [float(s) for s in self.train_scores_]}
        with atomic_dir(check_new_path(path, overwrite=overwrite), overwrite=overwrite) as tmp:
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return path

    @staticmethod
    def is_saved(path) -> bool:
        """Whether ``path`` is a folder written by :meth:`save`."""
        return (Path(path) / META_FILE).is_file()

    @classmethod
    def load(cls, path, generator: Generator, *, progress: Optional[bool] = None) -> "SMInv2":
        """Read an :class:`SMInv2` written by :meth:`save`; ``generator`` must be the one it was
        fitted with (compared by its source's sha256)."""
        try:
            meta = json.loads((Path(path) / META_FILE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"path={str(path)!r}: not a readable SM-Inv₂ folder ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or \
                meta.get("format_version") != 1:
            raise ValueError(f"path={str(path)!r}: expected a folder written by SMInv2.save "
                             f"(format {FORMAT!r}, version 1)")
        if meta["generator_source"] != generator.meta.get("source"):
            raise ValueError(f"generator: its source {generator.meta.get('source')} differs from "
                             f"the fitted one's {meta['generator_source']}: expected the "
                             "generator the detector was fitted with")
        config = dict(meta["config"])
        if progress is not None:
            config["progress"] = progress
        det = cls(generator, **config)
        det.thresholds_ = {float(f): float(t) for f, t in meta["thresholds"]}
        det.train_scores_ = np.asarray(meta["train_scores"], np.float64)
        return det
