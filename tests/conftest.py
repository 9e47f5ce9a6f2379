"""Shared test configuration.

Float64 tests run inside ``jax.enable_x64`` through the ``x64`` fixture rather than a global
switch, so the float32 default of the package is what the other tests exercise.
"""

import jax
import pytest


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield
