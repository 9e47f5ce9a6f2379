"""Input checks shared by the public entry points.

Every check raises ``ValueError`` naming the argument, the offending value and what was
expected, so bad input is stopped at the boundary instead of surfacing as a NaN later.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


def as_pair(name: str, value, *, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints (PyTorch's convention for conv geometry) as a pair."""
    pair = (value, value) if np.ndim(value) == 0 else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                 for v in pair):
        raise ValueError(f"{name}={value!r}: expected an int or a pair of ints")
    if min(pair) < minimum:
        raise ValueError(f"{name}={value!r}: expected values >= {minimum}")
    return int(pair[0]), int(pair[1])


def check_int(name: str, value, *, minimum: int = 1, maximum: Optional[int] = None) -> int:
    """An int (Python or NumPy, not bool) in [minimum, maximum], as a Python int."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or value < minimum or (maximum is not None and value > maximum):
        upper = f" and <= {maximum}" if maximum is not None else ""
        raise ValueError(f"{name}={value!r}: expected an int >= {minimum}{upper}")
    return int(value)


def check_positive(name, value, *, allow_zero=False) -> float:
    """A finite real scalar (Python, NumPy or JAX) > 0 (≥ 0 with ``allow_zero``), as a float."""
    ok = np.ndim(value) == 0 and np.issubdtype(np.asarray(value).dtype, np.number)
    number = float(value) if ok else float("nan")
    if not (np.isfinite(number) and (number > 0 or (allow_zero and number == 0))):
        raise ValueError(f"{name}={value!r}: expected a finite number "
                         f"{'>= 0' if allow_zero else '> 0'}")
    return number


def check_floating(name: str, x) -> None:
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name} has dtype {dtype}: expected a floating dtype "
                         "(float32 or float64)")


def check_batch(name: str, x, sample_shape, what: str):
    """``x`` as a floating batch ``(B, *sample_shape)``; ``what`` names where the shape comes
    from in the error message. Returns x."""
    if jnp.ndim(x) != len(sample_shape) + 1 or tuple(jnp.shape(x)[1:]) != tuple(sample_shape):
        raise ValueError(f"{name} has shape {jnp.shape(x)}: expected (B, "
                         f"{', '.join(map(str, sample_shape))}) ({what})")
    check_floating(name, x)
    return x


def check_finite(name: str, x) -> None:
    """Raise if ``x`` holds NaN or inf. An accelerator's array (or a tracer) is checked where it
    lives, with one device-to-host sync; anything else with NumPy, which needs no compile per
    shape (XLA compiles an eager check anew for every shape: ~50 ms on a CPU)."""
    on_accelerator = isinstance(x, jax.Array) and (
        isinstance(x, jax.core.Tracer) or any(d.platform != "cpu" for d in x.devices()))
    xp = jnp if on_accelerator else np
    finite = xp.isfinite(xp.asarray(x))
    if not bool(xp.all(finite)):
        count = int(finite.size - xp.sum(finite))
        raise ValueError(f"{name} holds {count} NaN/inf value(s): expected finite values")


def check_labels(name: str, y, n: int, meanings: dict) -> np.ndarray:
    """``y`` as int32 ``(n,)`` whose values are keys of ``meanings`` ({label: what it means},
    named in the error), else a ValueError."""
    y = np.asarray(y)
    if y.shape != (n,):
        raise ValueError(f"{name} has shape {y.shape}: expected ({n},), one label per sample")
    values = set(np.unique(y).tolist())
    if not values <= set(meanings):
        expected = ", ".join(f"{k} ({v})" for k, v in meanings.items())
        raise ValueError(f"{name} holds {sorted(values - set(meanings))}: expected {expected}")
    return y.astype(np.int32)


def check_fields(where, record, required, what: str):
    """``record`` if it is a dict holding every key of ``required``, else a ValueError naming
    ``where``, the missing fields and ``what`` was expected."""
    missing = [k for k in required if not isinstance(record, dict) or k not in record]
    if missing:
        raise ValueError(f"{where}: lacks the field(s) {', '.join(missing)}: expected {what}")
    return record
