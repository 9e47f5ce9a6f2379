"""DeepSAD networks (Flax linen): the reference's LeNets and MLP, bias-free, non-affine BatchNorm.

Every network maps a batch to a ``rep_dim`` embedding φ(x) with no bias term and no affine
BatchNorm anywhere: a bias (or a BatchNorm shift) lets Deep SVDD/DeepSAD map every input onto the
centre c and "solve" the objective by collapse (Ruff et al. 2018, Prop. 2). Blocks follow the
reference (``src/sad/networks/LeNet.py``, ``mlp.py``):

* CNN block: conv k5 p2 (no bias) → BatchNorm (eps 1e-4, no scale/shift) → leaky ReLU 0.01 →
  max-pool 2×2; after the last block, flatten (channel-first order, as PyTorch) → Linear, no bias.
* MLP block: Linear (no bias) → BatchNorm1d (same) → leaky ReLU 0.01; then Linear to rep_dim.

Named architectures (:data:`ARCHITECTURES`, built by :func:`build_network`):

=========================  ==================  ====================================================
name                       input               reference
=========================  ==================  ====================================================
``lenet_cifar10``          C×32×32 (C=3)       ``CIFAR10_LeNet``: widths 32, 64, 128 → 128·4·4 → 128
``lenet_64channels``       C×32×32 (C=64)      ``LeNet_64Channels``: widths 128, 256, 128
``lenet_64channels_64x64`` C×64×64 (C=64)      the same after a stem conv k4 s2 p1 + leaky ReLU
                                               (no BN), as ``LeNet_64Channels(input_spatial_size=64)``
``lenet_128x128``          C×128×128 (C=1)     ``LeNet_128x128``: widths 32, 16, 8, 4 → 4·8·8 → 128
``biglenet_128x128``       C×128×128           ``CIFAR10_BigLeNet``: widths 32, 64, 128, 64 → 4096 → 128
``mlp``                    D                   ``MLP``: 512, 1024, 512, 256, 128 → rep_dim (32 tabular)
=========================  ==================  ====================================================

Input channels and spatial size are configurable for every CNN (the reference hard-wires some);
``channels=(i, j, ...)`` selects input channels at the network's entry, so a network can be fed
the full feature tensor and see only the chosen channels.

Layout: the API is channel-first ``(B, C, H, W)``; the convolutions run channel-last (NHWC),
which XLA:CPU runs ~18× faster than NCHW. The input is transposed once at the entry and back once
before the flatten, so the final Linear's weight has PyTorch's ordering (``kernel = W.T``).

Initialisation matches PyTorch's defaults (kaiming-uniform with a = √5, i.e. U(±1/√fan_in)), so a
network has the same distribution of weights as the reference's at the start of training.
"""

from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
from flax.linen.dtypes import promote_dtype
import jax.numpy as jnp
from jax import lax

from flipad_jax.nn_ops import batch_normalize, conv_same, max_pool_2x2

LEAKY_SLOPE = 0.01
BN_EPS = 1e-4
BN_MOMENTUM = 0.1  # PyTorch's convention: running = (1 − m)·running + m·batch

# U(±1/√fan_in), PyTorch's default for Conv2d and Linear weights.
_torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class BatchNorm(nn.Module):
    """``torch.nn.BatchNorm{1,2}d(affine=False)`` over the last axis (channels-last inputs).

    Training mode (``train=True``) normalises with the batch's mean and biased variance and
    updates the running statistics with PyTorch's rule, including its *unbiased* running
    variance (n/(n−1) correction); eval mode uses the running statistics. No scale, no shift.

    Collection ``batch_stats``: ``mean`` and ``var``, ``(C,)`` float32, initialised to 0 and 1.
    """

    epsilon: float = BN_EPS
    momentum: float = BN_MOMENTUM

    @nn.compact
    def __call__(self, x, train: bool):
        features = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        if train:
            y, mean, var = batch_normalize(x, self.epsilon)
            if not self.is_initializing():
                n = x.size // features
                m = self.momentum
                ra_mean.value = (1 - m) * ra_mean.value + m * lax.stop_gradient(mean)
                ra_var.value = (1 - m) * ra_var.value + m * lax.stop_gradient(var) * (n / (n - 1))
            return y
        per_channel = (1,) * (x.ndim - 1) + (features,)  # (C,) statistics against (..., C) x
        return ((x - ra_mean.value.reshape(per_channel))
                * lax.rsqrt(ra_var.value + self.epsilon).reshape(per_channel))


class SameConv(nn.Module):
    """A bias-free stride-1 conv with padding ``k // 2`` (``nn.Conv``'s ``kernel`` parameter, same
    shape and initialisation), computed by :func:`~flipad_jax.nn_ops.conv_same`."""

    features: int
    kernel_size: int = 5

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", _torch_default_init,
                            (self.kernel_size, self.kernel_size, x.shape[-1], self.features),
                            jnp.float32)
        return conv_same(*promote_dtype(x, kernel))


def _leaky_relu(x):
    return nn.leaky_relu(x, LEAKY_SLOPE)


def _check_input(x, expected: tuple, name: str):
    if tuple(x.shape[1:]) != tuple(expected):
        raise ValueError(f"x has shape {tuple(x.shape)}: expected (B, {', '.join(map(str, expected))}) "
                         f"for network {name}")


class LeNet(nn.Module):
    """A DeepSAD LeNet: ``(B, in_channels, input_size, input_size)`` → ``(B, rep_dim)``.

    Attributes:
      in_channels: channels of the input tensor (before ``channels`` selection).
      input_size: spatial size H = W of the input.
      widths: output channels of the conv blocks; each block halves the spatial size.
      rep_dim: embedding dimension.
      stem: first a conv k4 s2 p1 (no bias) + leaky ReLU without BatchNorm, keeping the
        channel count (the reference's ``conv0`` for 64×64 activations).
      channels: indices of the input channels the network uses (None: all).
    """

    in_channels: int
    input_size: int
    widths: Sequence[int] = (32, 64, 128)
    rep_dim: int = 128
    stem: bool = False
    channels: Optional[Sequence[int]] = None

    def _final_size(self) -> int:
        size = self.input_size // 2 if self.stem else self.input_size
        scale = 2 ** len(self.widths)
        if self.stem and self.input_size % 2 or size % scale:
            raise ValueError(f"input_size={self.input_size}: expected a multiple of "
                             f"{scale * (2 if self.stem else 1)} for {len(self.widths)} pooling "
                             f"blocks{' after the stride-2 stem' if self.stem else ''}")
        return size // scale

    @nn.compact
    def __call__(self, x, train: bool = False):
        _check_input(x, (self.in_channels, self.input_size, self.input_size), "LeNet")
        final = self._final_size()
        if self.channels is not None:
            x = x[:, jnp.asarray(self.channels)]
        x = jnp.transpose(x, (0, 2, 3, 1))  # NCHW → NHWC, once
        if self.stem:
            x = nn.Conv(x.shape[-1], (4, 4), strides=2, padding=1, use_bias=False,
                        kernel_init=_torch_default_init, name="stem")(x)
            x = _leaky_relu(x)
        for i, width in enumerate(self.widths):
            x = SameConv(width, name=f"conv{i}")(x)
            x = BatchNorm(name=f"bn{i}")(x, train)
            x = max_pool_2x2(_leaky_relu(x))
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], self.widths[-1] * final * final)
        return nn.Dense(self.rep_dim, use_bias=False, kernel_init=_torch_default_init,
                        name="fc")(x)


class MLP(nn.Module):
    """The DeepSAD MLP: ``(B, in_features)`` → ``(B, rep_dim)``.

    Attributes:
      in_features: input dimension D.
      hidden: widths of the hidden blocks (Linear → BatchNorm1d → leaky ReLU).
      rep_dim: embedding dimension (the reference's tabular runs: 32).
      channels: indices of the input features the network uses (None: all).
    """

    in_features: int
    hidden: Sequence[int] = (512, 1024, 512, 256, 128)
    rep_dim: int = 32
    channels: Optional[Sequence[int]] = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        _check_input(x, (self.in_features,), "MLP")
        if self.channels is not None:
            x = x[:, jnp.asarray(self.channels)]
        for i, width in enumerate(self.hidden):
            x = nn.Dense(width, use_bias=False, kernel_init=_torch_default_init, name=f"fc{i}")(x)
            x = _leaky_relu(BatchNorm(name=f"bn{i}")(x, train))
        return nn.Dense(self.rep_dim, use_bias=False, kernel_init=_torch_default_init,
                        name="code")(x)


ARCHITECTURES = {
    "lenet_cifar10": (LeNet, dict(in_channels=3, input_size=32, widths=(32, 64, 128))),
    "lenet_64channels": (LeNet, dict(in_channels=64, input_size=32, widths=(128, 256, 128))),
    "lenet_64channels_64x64": (LeNet, dict(in_channels=64, input_size=64,
                                           widths=(128, 256, 128), stem=True)),
    "lenet_128x128": (LeNet, dict(in_channels=1, input_size=128, widths=(32, 16, 8, 4))),
    "biglenet_128x128": (LeNet, dict(in_channels=3, input_size=128, widths=(32, 64, 128, 64))),
    "mlp": (MLP, dict(in_features=100)),
}


def build_network(name: str, **overrides) -> nn.Module:
    """The named architecture of :data:`ARCHITECTURES` with its settings overridden.

    Args:
      name: a key of :data:`ARCHITECTURES`.
      **overrides: module attributes, e.g. ``in_channels=1``, ``input_size=64``, ``rep_dim=32``,
        ``channels=(4, 0, 7)``. Sequences are stored as tuples (hashable, JSON-able).
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"network={name!r}: expected one of {sorted(ARCHITECTURES)}")
    cls, defaults = ARCHITECTURES[name]
    fields = set(cls.__dataclass_fields__) - {"parent", "name"}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"network_kwargs has {sorted(unknown)}: expected keys among "
                         f"{sorted(fields)} for {name!r}")
    kwargs = {**defaults, **overrides}
    kwargs = {k: tuple(int(i) for i in v) if isinstance(v, (list, tuple)) else v
              for k, v in kwargs.items()}
    if kwargs.get("channels") is not None:
        n_in = kwargs.get("in_channels", kwargs.get("in_features"))
        bad = [c for c in kwargs["channels"] if not 0 <= c < n_in]
        if bad or not kwargs["channels"]:
            raise ValueError(f"channels={kwargs['channels']}: expected a non-empty sequence of "
                             f"indices in [0, {n_in})")
    return cls(**kwargs)


def default_network(feature_shape: Sequence[int]) -> tuple[str, dict]:
    """The reference's choice of network for per-sample features of ``feature_shape``.

    Returns ``(name, overrides)`` for :func:`build_network`: the MLP for vectors, the 4-block
    LeNet for 128×128 (1 channel: ``lenet_128x128``, else ``biglenet_128x128``), the stem LeNet for
    64×64 with ≥ 32 channels, the 64-channel LeNet for ≥ 32 channels at 32×32, else the CIFAR-10
    LeNet; input channels and size taken from the shape.
    """
    shape = tuple(int(s) for s in feature_shape)
    if len(shape) == 1:
        return "mlp", dict(in_features=shape[0])
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ValueError(f"feature shape {shape}: expected (D,) or (C, S, S) with square "
                         "spatial size")
    c, s, _ = shape
    if s == 128:
        return ("lenet_128x128" if c == 1 else "biglenet_128x128"), dict(in_channels=c)
    if s == 64 and c >= 32:
        return "lenet_64channels_64x64", dict(in_channels=c)
    if c >= 32:
        return "lenet_64channels", dict(in_channels=c, input_size=s)
    return "lenet_cifar10", dict(in_channels=c, input_size=s)
