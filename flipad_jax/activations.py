"""The generator's final activation σ_L: forward, clipped inverse, and the range of its outputs.

FLIPAD needs σ_L invertible (METHOD.md §2): the target of the lasso is o = σ⁻¹(x). Images that
reach the boundary of σ's range (8-bit PNGs hold exact ±1 for tanh heads) have no finite inverse,
so the inverse clips first and reports how many values it moved:

* ``tanh``:     x ∈ [−1 + clip, 1 − clip],  o = atanh(x)        (reference: clip 1e-4, o ∈ ±4.95)
* ``sigmoid``:  x ∈ [clip, 1 − clip],        o = log x − log(1 − x)
* ``identity``: no clip, o = x

Values outside the range (not only on its boundary) are clipped and counted the same way.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_CLIP = 1e-4


class Activation(NamedTuple):
    """A supported final activation.

    Attributes:
      name: "tanh", "sigmoid" or "identity" (the name stored in the head bundle).
      forward: elementwise σ.
      inverse: elementwise σ⁻¹ on the open range.
      range: ``(low, high)`` of σ's outputs, or None when unbounded.
    """

    name: str
    forward: Callable[[jax.Array], jax.Array]
    inverse: Callable[[jax.Array], jax.Array]
    range: Optional[tuple[float, float]]


def _logit(x):
    return jnp.log(x) - jnp.log1p(-x)


ACTIVATIONS = {
    "tanh": Activation("tanh", jnp.tanh, jnp.arctanh, (-1.0, 1.0)),
    "sigmoid": Activation("sigmoid", jax.nn.sigmoid, _logit, (0.0, 1.0)),
    "identity": Activation("identity", lambda x: x, lambda x: x, None),
}


def get_activation(name: str) -> Activation:
    """The :class:`Activation` called ``name``; ValueError naming the supported ones otherwise."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation={name!r}: expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def check_clip(clip: float) -> float:
    """``clip`` must leave a non-empty interval inside every bounded range: 0 < clip < 0.5."""
    if not (np.ndim(clip) == 0 and np.issubdtype(np.asarray(clip).dtype, np.number)
            and 0 < float(clip) < 0.5):
        raise ValueError(f"clip={clip!r}: expected a number with 0 < clip < 0.5")
    return float(clip)


def clipped_inverse(activation: Activation, x, clip: float = DEFAULT_CLIP):
    """σ⁻¹(x) after clipping x to ``[low + clip, high − clip]``, and the clip count per sample.

    Args:
      activation: the head's activation.
      x: ``(B, ...)`` values in σ's range (images already mapped to the output range).
      clip: distance kept from each end of a bounded range (ignored for identity).

    Returns:
      ``(o, clipped)``: o with x's shape and dtype; clipped ``(B,)`` int32, how many values of
      each sample were moved by the clip (always 0 for identity).
    """
    if activation.range is None:
        return activation.inverse(x), jnp.zeros((jnp.shape(x)[0],), jnp.int32)
    low, high = activation.range
    lo, hi = low + clip, high - clip
    moved = (x < lo) | (x > hi)
    clipped = jnp.sum(moved.reshape(moved.shape[0], -1), axis=1, dtype=jnp.int32)
    return activation.inverse(jnp.clip(x, lo, hi)), clipped


def resolve_output_range(activation: Activation, output_range) -> Optional[tuple]:
    """(low, high) of a head's images: σ's own range, or a validated ``output_range`` (which a
    bounded σ must agree with; identity heads take any). None: unbounded (identity, no range)."""
    natural = activation.range
    if output_range is None:
        return natural
    output_range = tuple(float(v) for v in output_range)
    if len(output_range) != 2 or not output_range[0] < output_range[1]:
        raise ValueError(f"output_range={output_range!r}: expected (low, high), low < high")
    if natural is not None and output_range != natural:
        raise ValueError(f"output_range={output_range!r}: expected {natural} for a "
                         f"{activation.name} head")
    return output_range
