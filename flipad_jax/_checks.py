"""Input checks shared by the public entry points.

Every check raises ``ValueError`` naming the argument, the offending value and what was
expected, so bad input is stopped at the boundary instead of surfacing as a NaN later.
"""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp


def as_pair(name: str, value, *, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints (PyTorch's convention for conv geometry) as a pair."""
    pair = (value, value) if np.ndim(value) == 0 else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                 for v in pair):
        raise ValueError(f"{name}={value!r}: expected an int or a pair of ints")
    if min(pair) < minimum:
        raise ValueError(f"{name}={value!r}: expected values >= {minimum}")
    return int(pair[0]), int(pair[1])


def check_floating(name: str, x) -> None:
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name} has dtype {dtype}: expected a floating dtype "
                         "(float32 or float64)")


def check_finite(name: str, x) -> None:
    """Raise if ``x`` holds NaN or inf (one device-to-host sync)."""
    finite = jnp.isfinite(jnp.asarray(x))
    if not bool(jnp.all(finite)):
        count = int(jnp.size(finite) - jnp.sum(finite))
        raise ValueError(f"{name} holds {count} NaN/inf value(s): expected finite values")
