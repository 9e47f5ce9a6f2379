"""Which convolution library XLA:CPU uses for a compiled function: the one home of that choice.

XLA:CPU (jax 0.10) lowers convolutions to YNNPACK fusions by default; its compiler option
``xla_cpu_experimental_ynn_fusion_type`` set to the dot fusions alone sends them to Eigen
instead (and leaves YNNPACK's elementwise and reduction fusions off too). The option applies to
the outermost compiled function: one of these called inside another ``jax.jit`` compiles with
the outer one's options. Which is faster depends on the convolutions, so the choice is per
compiled function, by measurement on the 2-core CPU (``benchmarks/README.md``, "Convolution
library on a CPU"):

* Eigen: networks that are trained or differentiated through, whose 5×5 and 3×3 convolutions
  have many channels (DeepSAD's train step 1.5× and eval forward 1.25× faster, SM-Inv's Adam
  steps 1.5× on LSGAN, even on DCGAN);
* YNNPACK (the default, so nothing to do): the lasso's few-channel transposed convolution and
  its adjoint (Eigen is 1.15–1.6× slower on the three trained heads of the benchmarks).

Other backends, and an XLA that does not know the option, compile as ``jax.jit`` would.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_EIGEN = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


@functools.lru_cache(maxsize=1)
def eigen_jit_options() -> dict:
    """Keyword arguments for ``jax.jit`` that route convolutions to Eigen: ``compiler_options``
    on a CPU backend whose XLA accepts the option, else ``{}``. Touches the backend, so call it
    when compiling, not at import (``--device`` must be able to choose the platform first)."""
    if jax.default_backend() != "cpu":
        return {}
    try:
        jax.jit(jnp.negative, compiler_options=_EIGEN).lower(jnp.zeros(1)).compile()
    except (RuntimeError, TypeError):  # an XLA without the option, or a jax.jit without the kwarg
        return {}
    return {"compiler_options": _EIGEN}


class _EigenJit:
    """A ``jax.jit`` built on the first use, when the backend is known; attributes (``lower``,
    ``_cache_size``, ...) are the compiled function's."""

    def __init__(self, fn, jit_kwargs):
        functools.update_wrapper(self, fn)
        self._fn, self._jit_kwargs = fn, jit_kwargs

    @functools.cached_property
    def _jitted(self):
        return jax.jit(self._fn, **self._jit_kwargs, **eigen_jit_options())

    def __call__(self, *args, **kwargs):
        return self._jitted(*args, **kwargs)

    def __getattr__(self, name):  # only for names the instance lacks
        if name.startswith("__") or name in ("_fn", "_jit_kwargs", "_jitted"):  # copy; a
            raise AttributeError(name)  # failed build must raise its own error, not recurse
        return getattr(self._jitted, name)


def eigen_jit(fn=None, **jit_kwargs):
    """``jax.jit(fn, **jit_kwargs)`` with :func:`eigen_jit_options`, built on the first use (a
    decorator, with or without arguments)."""
    if fn is None:
        return functools.partial(eigen_jit, **jit_kwargs)
    return _EigenJit(fn, jit_kwargs)
