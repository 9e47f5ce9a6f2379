"""Shared test configuration.

Float64 tests run inside ``jax.enable_x64`` through the ``x64`` fixture rather than a global
switch, so the float32 default of the package is what the other tests exercise.
"""

import os

import jax
import pytest
from hypothesis import settings

# CI draws the same examples on every run (derandomised), so a red build is reproducible;
# locally hypothesis explores new examples each run.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield
