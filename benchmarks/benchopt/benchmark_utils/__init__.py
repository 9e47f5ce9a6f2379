"""Shared code of the benchopt benchmark.

benchopt imports this package by name; the benchmark's files reuse the repository's own code
(``flipad_jax``, ``converters`` and ``benchmarks/solver.py``), so the repository root and
``benchmarks/`` go on ``sys.path`` here, as running a script from ``benchmarks/`` would do.
"""

import sys
from pathlib import Path

_BENCHMARKS = Path(__file__).resolve().parents[2]
for _path in (str(_BENCHMARKS.parent), str(_BENCHMARKS)):
    if _path not in sys.path:
        sys.path.insert(0, _path)
