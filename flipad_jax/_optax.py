"""optax transformations under strict dtype promotion."""

from __future__ import annotations

import jax
import optax


def standard_promotion(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` with its update run under standard dtype promotion.

    optax's Adam bias correction raises a Python float to the int32 step count (``b1 ** count``,
    optax 0.2.8), an implicit promotion that ``jax_numpy_dtype_promotion="strict"`` (the test
    suite's setting) rejects. The promotion is optax's, so its update runs under the standard
    rules whatever the caller's setting; our own arithmetic around it stays strict.
    """
    def update(updates, state, params=None):
        with jax.numpy_dtype_promotion("standard"):
            return tx.update(updates, state, params)

    return optax.GradientTransformation(tx.init, update)
