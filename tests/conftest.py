"""Shared test configuration.

Float64 tests run inside ``jax.enable_x64`` through the ``x64`` fixture rather than a global
switch, so the float32 default of the package is what the other tests exercise. As in lineax,
dtype promotion is strict and rank promotion raises, so every mixed-dtype operation and every
broadcast between arrays of different rank in the package is written out.

In CI (``$CI`` set, as ``.ci/run`` does) a skipped test fails the session: a skip there means an
install regression (torch, scikit-learn or the Fashion-MNIST package missing), not a choice.
"""

import os
import re

import jax
import pytest
from hypothesis import settings

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

# CI draws the same examples on every run (derandomised), so a red build is reproducible;
# locally hypothesis explores new examples each run.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _ynnpack_convolutions(fn, *args, **kwargs) -> int:
    """How many convolutions ``fn.lower(*args, **kwargs)`` compiles into YNNPACK fusions (XLA's
    CPU library; Eigen convolutions stay plain ``convolution`` instructions)."""
    hlo = fn.lower(*args, **kwargs).compile().as_text()
    bodies = dict(re.findall(r"^%?([\w.\-]+) [^\n]*\{\n(.*?)^\}", hlo, flags=re.M | re.S))
    called = re.findall(r"ynn_fusion[\w.]* = .*?calls=%?([\w.\-]+)", hlo)
    return sum(bodies.get(name, "").count(" convolution(") for name in called)


@pytest.fixture
def ynnpack_convolutions():
    return _ynnpack_convolutions


def pytest_sessionfinish(session, exitstatus):
    if not os.environ.get("CI") or exitstatus != pytest.ExitCode.OK:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped:
        names = ", ".join(report.nodeid for report in skipped[:5])
        reporter.write_line(f"CI: {len(skipped)} test(s) skipped ({names}); in CI every test "
                            "must run", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
