"""Batched FISTA for the final-layer lasso, with per-sample restarts, stopping and certificates.

Problem, per sample i of a batch (A the linear operator, b its bias, z̄ the anchor):

    minimise_z  P(z) = ½‖A z + b − oᵢ‖² + λᵢ ‖z − z̄‖₁

Substituting δ = z − z̄ and r = o − b − A z̄ gives the plain lasso ½‖Aδ − r‖² + λ‖δ‖₁ (paper,
eq. 8), which is what the iteration runs on. With step s (default 1/L, L = ‖A‖² from Lanczos
iteration times a small safety margin) FISTA (Beck & Teboulle 2009) reads

    δ⁺ = soft(y − s ∇f(y), λ s)                    soft(v, τ) = sign(v) max(|v| − τ, 0)
    t⁺ = (1 + √(1 + 4t²)) / 2,    y⁺ = δ⁺ + ((t − 1)/t⁺)(δ⁺ − δ)

Each iteration costs one A and one Aᵀ. They are applied to the new iterate δ⁺, not to y: the
loop keeps ∇f(δ) and its last step ∇f(δ) − ∇f(δ_prev), and since ∇f is affine the gradient at
the extrapolated point is ∇f(y) = ∇f(δ) + β(∇f(δ) − ∇f(δ_prev)) without another operator call. So
the residual Aδ⁺ − r and ∇f(δ⁺) give, at no extra cost, the objective, the KKT residual and the
duality gap at the iterate δ⁺ itself, which every stop rule returns. δ⁺ is a proximal point, so
it is exactly sparse (coordinates with |y − s∇f(y)| ≤ λs are exactly 0), and with the gap rule
the certificate is that of the features handed on, not of a nearby dense point.

Continuation (``continuation=η``; by default η = 0.2 under the certified stop, see
:data:`STOP_RULE_DEFAULTS`), per sample: the loop first solves at λ₁ = max(λ, ‖Aᵀr‖∞/2), and
each time the iterate's relative gap at the current λₖ is ≤ 0.01 it moves on to
λₖ₊₁ = max(λ, η λₖ) (straight to λ once η λₖ is at rounding level, ε‖Aᵀr‖∞, so that λ = 0 is
reached), restarting the momentum; the stop rule applies once λₖ = λ. On small λ, where the
solution is far sparser than the early iterates, the path reaches the solution in fewer
iterations: on the shipped DCGAN and LSGAN heads (float64, batch 16) a true relative
suboptimality of 1e-3 took 3545 and 2836 iterations with η = 0.2 against 6924 and 10 819
without (``benchmarks/trained_convergence.py``, measured when stages ended at 0.03; ending them
at 0.01 cut the mean iterations to certify 1e-3 in float32 with the growing step by 1.14× and
1.42×). Capped solves (the demo's 50 iterations) should not use it: they would stop on the path,
at a larger λ.

Restart (O'Donoghue & Candès 2015, gradient scheme), per sample: when
⟨y − δ⁺, δ⁺ − δ⟩ > 0 the momentum points uphill; set t⁺ = 1 and y⁺ = δ⁺.

Growing step (``step_growth=γ``; by default γ = 1.02 under the certified stop), per sample:
backtracking in the manner of Beck & Teboulle's, with a step that may grow past 1/L. After each
step that passes the sufficient-decrease test f(δ⁺) ≤ f(y) + ⟨∇f(y), δ⁺ − y⟩ + ‖δ⁺ − y‖²/2s
the step grows by γ; after one that fails the sample keeps its state, halves its step (never
below the base step, which always passes) and retries the same y. f is quadratic, so the test is
s⟨δ⁺ − y, ∇f(δ⁺) − ∇f(y)⟩ ≤ ‖δ⁺ − y‖², from arrays the loop has anyway. It pays on trained
heads, where A has far more columns than rows and 1/L is set by directions the iterate no
longer moves along: the curvature ‖A(δ⁺ − y)‖²/‖δ⁺ − y‖² along FISTA's steps there is about
1% of L. On the shipped DCGAN and LSGAN heads (float32, batch 16) a certified relative gap of
1e-2 took 2.2× and over 3.2× fewer iterations (mean) with γ = 1.02, and 1e-3 was certified
within 18 000 iterations where the fixed step certified none in 20 000
(``benchmarks/README.md``). A rejected step costs an iteration; about 3% are rejected at
γ = 1.02. A step that did not move the iterate does not grow the step, and the step stays
below :data:`MAX_STEP_GROWTH` base steps, so halving brings it back in a few steps.

Certificates, per sample, at a point δ (ρ = r − Aδ, g = −Aᵀρ = ∇f(δ)):

* duality gap: with α = min(1, λ/‖g‖∞), θ = αρ is dual feasible (‖Aᵀθ‖∞ ≤ λ) and
  gap = P(δ) − D(θ) = ½(1 − α)²‖ρ‖² + λ‖δ‖₁ + α⟨δ, g⟩ ≥ P(δ) − P* (the last two terms nearly
  cancel near the optimum; their rounding, of order ε λ‖δ‖₁, is far below that of the float32
  residual and gradient themselves, measured below);
* KKT residual: ‖dist(−g, λ ∂‖δ‖₁)‖∞, i.e. |gⱼ + λ sign δⱼ| on the support, max(|gⱼ| − λ, 0) off it.

Stopping rules (``stop=``), the change rules checked after every iteration, the gap rule on
the schedule given below:

* ``"gap"`` (default): a sample stops when gap(δ⁺) ≤ tol · P(δ⁺) + ε · ½‖r‖²: its objective is
  certified within a relative ``tol`` of the optimum. The second term (ε the dtype's machine
  epsilon, ½‖r‖² = P(z̄) the objective at the anchor) is the rounding level of the gap itself;
  it lets exactly solvable problems (P* = 0) stop and is far below ``tol`` · P otherwise.
  The gap is checked every :data:`GAP_EVERY` iterations (and at a segment's end, and right
  after a check that fell on a rejected growing step), so a sample stops up to that many
  iterations after its gap first fell below the bound.
  For λ = 0 (least squares) the scaled dual point is 0 and the gap never closes, so samples
  whose λ is at rounding level (λ ≤ ε · ‖Aᵀr‖∞, ‖Aᵀr‖∞ being the λ above which δ = 0 is
  optimal) may also stop on the KKT residual: ‖∇f(δ⁺)‖∞ ≤ tol · ‖Aᵀr‖∞.
  The certificate is pessimistic on these high-dimensional problems: on the DCGAN layer
  (float32, CPU) stopping at a certified relative gap of 1e-3 took up to 2155 iterations (mean
  1676, batch of 16; ``benchmarks/results/solver_cpu.json``), while the true relative
  suboptimality there was about 1e-6 (``benchmarks/README.md``).
  Default ``tol``: 1e-3 in float32, 1e-6 in float64. float32's gap is accurate to 6.5e-5 (300
  iterations) and 1.7e-4 (3000) of the objective on the demo's trained DCGAN head on CPU (against
  float64 at the same iterate; summing Σⱼ(λ|δⱼ| + αδⱼgⱼ) elementwise instead gives the same
  error, which is the residual's and gradient's), and GPUs run float32 convolutions in TF32 by default
  (``precision=None``), whose rounding (about 1e-3 relative) bounds what can be certified.
* ``"change"``: a sample stops when mean |δ⁺ − δ| ≤ tol (no certificate inside the loop).
* ``"reference"``: the reference implementation's rule: the whole batch stops when the max over
  samples of mean |δ⁺ − δ| ≤ tol.

Gradients (``jax.grad``/``jax.vjp`` through :func:`solve_lasso`, with respect to o, λ, z̄ and
the operator's weight and bias) are those of the exact minimiser, by implicit differentiation on
its support S = {j : δⱼ ≠ 0}: S is taken as locally constant, δ stays 0 off S (so ∂zⱼ/∂o = 0
and ∂zⱼ/∂z̄ⱼ = 1 there, the one-sided choice at the boundary |∇ⱼf| = λ), and on S
dδ_S = −(A_SᵀA_S)⁻¹ dF_S for the optimality conditions F_S = [Aᵀ(Aδ − r)]_S + λ sign δ_S = 0,
solved by conjugate gradients, per sample. They are meaningful for a converged solve with a unique
solution (A_S of full column rank). A sample whose system cannot be solved to rounding level
(a capped solve's dense iterate, or a float32 solve certified at the default tolerance whose
support has more coordinates than A has rows) makes the gradient raise a ValueError naming the
sample, rather than pass a wrong number for a right one. The certificates in the
result are recomputed from the solution, so e.g. the objective's gradient is the total one.
The step size does not change the minimiser and is not differentiated.

Samples that stop are frozen while the others go on: they take steps of size 0 without
momentum, which leave their iterate exactly as it is (a non-finite one stays non-finite);
``max_iter`` bounds the loop. A frozen sample still costs an iteration's work, so under the
per-sample stop rules the loop runs in segments of :data:`SEGMENT` iterations and, once at most
half of a batch's samples are active, carries on with those alone in a batch half as wide (or
narrower; :func:`_solve`): a batch then costs about its samples' mean iterations, not its
slowest sample's, with each sample's result unchanged. An iteration's elementwise work is
memory-bound on a CPU (at batch 64 on the DCGAN head it took 2–3× the time of the forward +
adjoint pair), so the loop keeps few full-size arrays: the iterate, its gradient and the last
step of each (never the extrapolated point), and the gap is assembled from per-sample
reductions. Every setting lives in :class:`LassoOptions`, whose defaults are ours (base step
1/L growing by 1.02, restarts, the certified stop along a λ path, at most 20 000 iterations);
``LassoOptions.paper(op)`` is the reference solver: fixed step 0.025 (0.001 for
:class:`~flipad_jax.Linear`, its tabular setting), no restart, the ``"reference"`` stop rule
with tol 1e-5 (1e-4 for :class:`~flipad_jax.Linear`), 10000 iterations, and the reference's
start δ₀ = z̄ (z₀ = 2z̄). Any field can still be overridden.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flipad_jax._checks import (check_batch, check_finite, check_floating, check_int,
                                check_positive)
from flipad_jax.operators import Linear

_STOP_RULES = ("gap", "change", "reference")
_STAGE_TOL = 1e-2  # relative gap that ends a stage of the λ path (continuation)
# The certified rule checks the gap every GAP_EVERY iterations, and at every segment's end.
GAP_EVERY = 8
# Iterations between the checks that shed stopped samples (:func:`_solve`): a host round trip
# each, against up to this many iterations of a batch wider than its active samples need. A
# multiple of GAP_EVERY, so that segment ends do not change when a sample is checked and the
# shedding driver agrees with the one-piece loop (stacked solves).
SEGMENT = 32 * GAP_EVERY
# Largest growing step, in base steps 1/L (the shipped trained heads' steps grow to about 100).
MAX_STEP_GROWTH = 2.0 ** 16
_STARTS = ("anchor", "reference")


class Status(enum.IntEnum):
    """Per-sample outcome of a solve (``LassoResult.status`` holds these values)."""

    CONVERGED = 0
    MAX_ITER = 1
    NONFINITE = 2

    @property
    def message(self) -> str:
        return {Status.CONVERGED: "stopped by the stop rule",
                Status.MAX_ITER: "reached max_iter before the stop rule held",
                Status.NONFINITE: "the objective went non-finite (NaN or inf)"}[self]


def _check_factor(name: str, value, low: float, high: float, example: str = ""):
    """An optional factor strictly between ``low`` and ``high``; ValueError otherwise."""
    if not (isinstance(value, (int, float)) and low < value < high):
        raise ValueError(f"{name}={value!r}: expected None or a factor in ({low}, {high})"
                         f"{example}")


class _ByStopRule:
    """The default of a setting that depends on the stop rule (see :data:`STOP_RULE_DEFAULTS`)."""

    def __repr__(self):
        return "BY_STOP_RULE"


BY_STOP_RULE = _ByStopRule()
# Defaults of the settings that depend on the stop rule. Under the certified rule the growing
# step and the λ path certify the shipped trained heads where the fixed step does not, in 1.47×
# (DCGAN) and 1.95× (LSGAN) fewer mean iterations than the growing step alone
# (benchmarks/README.md). The change rule measures its tolerance in step lengths, so a longer
# step makes it a looser rule: with the growing step the pipeline benchmark stopped above the
# reference's objective on 27 of 32 images (at the fixed step, below it on average); it keeps
# the fixed step, and the path needs the gap to steer it. The reference's batch-wide rule is
# the reference solver: neither.
STOP_RULE_DEFAULTS = {"gap": dict(continuation=0.2, step_growth=1.02),
                      "change": dict(continuation=None, step_growth=None),
                      "reference": dict(continuation=None, step_growth=None)}


@dataclasses.dataclass(frozen=True)
class LassoOptions:
    """Settings of :func:`solve_lasso`; the defaults are ours, :meth:`paper` the reference's.

    Attributes:
      max_iter: iteration cap.
      tol: tolerance of the stop rule; None: "gap" 1e-3 relative in float32, 1e-6 in float64;
        "change" and "reference" 1e-5, or 1e-4 for Linear, as in the reference.
      stop: "gap" (certified), "change" (per sample) or "reference" (batch-wide).
      step: the (base) step size; None: 1/(lipschitz_margin · L). With ``step_growth`` the
        step grows from it and never goes below it.
      restart: adaptive (gradient-scheme) restart of the momentum.
      start: "anchor" (z₀ = z̄) or "reference" (z₀ = 2z̄, the reference's δ₀ = z̄); an explicit
        ``init=`` array to :func:`solve_lasso` overrides it.
      lipschitz_margin: factor on L, since Lanczos approaches ‖A‖² from below.
      continuation: η in (0, 1): solve along a path of λ, per sample, from ‖Aᵀr‖∞/2 down to λ
        by factors η, each stage warm-starting the next once its relative gap is ≤ 0.01; None:
        at λ from the start. Only with the certified stop ("gap"): the path is steered by it.
        Default by stop rule (:data:`STOP_RULE_DEFAULTS`): 0.2 under "gap", else None. A capped
        solve (small ``max_iter``) may end on the path, at a larger λ: its status is MAX_ITER.
      step_growth: γ > 1: backtracking with a growing step, per sample: after each step that
        passes the sufficient-decrease test the step grows by γ, after one that fails it halves
        (never below the base step, which is always accepted) and the sample retries from the
        same extrapolated point; None: the base step throughout. Per-sample stop rules only.
        Default by stop rule: 1.02 under "gap", else None.

    The two settings left at ``BY_STOP_RULE`` take the stop rule's default when the options are
    made; the fields then hold those values, so :meth:`to_json` records the settings the solve
    ran with. When :meth:`replace` changes the stop rule, a setting holding the old rule's
    default takes the new rule's (so options read back from JSON behave as the ones written).
    """

    max_iter: int = 20000
    tol: Optional[float] = None
    stop: str = "gap"
    step: Optional[float] = None
    restart: bool = True
    start: str = "anchor"
    lipschitz_margin: float = 1.01
    continuation: Optional[float] = BY_STOP_RULE
    step_growth: Optional[float] = BY_STOP_RULE

    def __post_init__(self):
        check_int("max_iter", self.max_iter, minimum=0)
        if self.stop not in _STOP_RULES:
            raise ValueError(f"stop={self.stop!r}: expected one of {_STOP_RULES}")
        for name, default in STOP_RULE_DEFAULTS[self.stop].items():
            if getattr(self, name) is BY_STOP_RULE:
                object.__setattr__(self, name, default)
        if self.start not in _STARTS:
            raise ValueError(f"start={self.start!r}: expected one of {_STARTS}")
        if self.tol is not None:
            check_positive("tol", self.tol, allow_zero=True)
        if self.step is not None:
            check_positive("step", self.step)
        check_positive("lipschitz_margin", self.lipschitz_margin)
        if self.continuation is not None:
            _check_factor("continuation", self.continuation, 0, 1)
            if self.stop != "gap":
                raise ValueError(f"continuation={self.continuation!r} with stop={self.stop!r}: "
                                 "expected stop='gap' (the path's stages end on their gap)")
        if self.step_growth is not None:
            _check_factor("step_growth", self.step_growth, 1, 2, ", e.g. 1.02")
            if self.stop == "reference":
                raise ValueError(f"step_growth={self.step_growth!r} with stop='reference': "
                                 "expected a per-sample stop, 'gap' or 'change' (each sample "
                                 "keeps its own step)")

    @classmethod
    def from_json(cls, fields: dict) -> "LassoOptions":
        """Options recorded by :meth:`to_json`. A setting the record lacks was written before it
        existed, when it was off: it is read as None, not as today's default."""
        return cls(**{"continuation": None, "step_growth": None, **fields})

    @classmethod
    def paper(cls, op, **overrides) -> "LassoOptions":
        """The reference solver for ``op``: step 0.025 (Linear 0.001), no restart, the
        batch-wide change rule at tol 1e-5 (Linear 1e-4), 10000 iterations, z₀ = 2z̄."""
        linear = isinstance(op, Linear)
        return cls(**{**dict(max_iter=10000, tol=1e-4 if linear else 1e-5, stop="reference",
                             step=0.001 if linear else 0.025, restart=False, start="reference"),
                      **overrides})

    def replace(self, **overrides) -> "LassoOptions":
        """A copy with some fields changed; an unknown name is a ValueError. With another stop
        rule, settings holding the old rule's default take the new rule's."""
        names = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not a solver setting; expected fields of "
                             f"LassoOptions ({', '.join(names)})")
        fields = {name: getattr(self, name) for name in names}
        if overrides.get("stop", self.stop) != self.stop:
            fields.update({name: BY_STOP_RULE
                           for name, default in STOP_RULE_DEFAULTS[self.stop].items()
                           if fields[name] == default})
        return LassoOptions(**{**fields, **overrides})

    def tol_for(self, op, dtype) -> float:
        """The tolerance in force: ``tol``, else the stop rule's default for op and dtype."""
        if self.tol is not None:
            return float(self.tol)
        if self.stop == "gap":
            return 1e-3 if jnp.dtype(dtype) == jnp.float32 else 1e-6
        return 1e-4 if isinstance(op, Linear) else 1e-5

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class LassoResult(NamedTuple):
    """Solution and per-sample diagnostics of :func:`solve_lasso`.

    Attributes:
      z: ``(B, *in_shape)`` minimisers (the activations before the inverted layer): the iterate
        each sample stopped at; for status NONFINITE the step that overflowed (possibly
        non-finite).
      iterations: ``(B,)`` int32, iterations each sample ran before it stopped.
      objective: ``(B,)`` P(z) = ½‖Az + b − o‖² + λ‖z − z̄‖₁.
      gap: ``(B,)`` duality gap, an upper bound on P(z) − min P.
      kkt: ``(B,)`` ∞-norm KKT residual (0 exactly at the optimum).
      status: ``(B,)`` int32 values of :class:`Status` (converged, hit max_iter, non-finite).
      lipschitz: L = ‖A‖² used for the step (None when ``step`` was given); pass it back as
        ``lipschitz=`` to skip the Lanczos iteration next time.
      step: the step size used (with ``step_growth``, the base step the adaptive one starts
        from and never goes below).
    """

    z: jax.Array
    iterations: jax.Array
    objective: jax.Array
    gap: jax.Array
    kkt: jax.Array
    status: jax.Array
    lipschitz: Optional[float]
    step: float

    @property
    def converged(self):
        return self.status == Status.CONVERGED


class _State(NamedTuple):
    delta: jax.Array      # iterate δ (internal layout)
    grad: jax.Array       # ∇f(δ)
    delta_step: jax.Array  # δ − δ_prev and ∇f(δ) − ∇f(δ_prev), for the extrapolation
    grad_step: jax.Array
    beta: jax.Array       # (B,) momentum weight of the next extrapolation
    t: jax.Array          # (B,) momentum parameter
    lam: jax.Array        # (B,) λ of the current stage (the target λ without continuation)
    step: jax.Array       # (B,) step size (changes only with step_growth)
    active: jax.Array     # (B,) bool, still iterating
    check_pending: jax.Array  # (B,) bool, the gap rule's check is due (its last step was rejected)
    iterations: jax.Array
    status: jax.Array
    k: jax.Array          # loop counter


def _per_sample_sum(x):
    return jnp.sum(x, axis=tuple(range(1, x.ndim)))


def _per_sample_max(x):
    return jnp.max(x, axis=tuple(range(1, x.ndim)))


def _soft_threshold(v, tau):
    return jnp.sign(v) * jnp.maximum(jnp.abs(v) - tau, 0)


def _bcast(per_sample, like):
    return per_sample.reshape((-1,) + (1,) * (like.ndim - 1))


def _objective_and_gap(delta, residual, grad, lam):
    """Objective, duality gap and ‖∇f(δ)‖∞ at δ; residual = Aδ − r, grad = Aᵀ residual.

    The gap ½(1 − α)²‖ρ‖² + λ‖δ‖₁ + α⟨δ, g⟩ comes from per-sample reductions, so the loop makes
    no full-size temporaries for it (XLA:CPU materialised λ|δ| + αδg and λ's broadcast)."""
    l1 = _per_sample_sum(jnp.abs(delta))
    rho_sq = _per_sample_sum(jnp.square(residual))
    objective = 0.5 * rho_sq + lam * l1
    grad_inf = _per_sample_max(jnp.abs(grad))
    alpha = jnp.where(grad_inf > lam, lam / jnp.maximum(grad_inf, jnp.finfo(grad.dtype).tiny), 1)
    gap = 0.5 * jnp.square(1 - alpha) * rho_sq + lam * l1 + alpha * _per_sample_sum(delta * grad)
    return objective, jnp.maximum(gap, 0), grad_inf


def _certificates(delta, residual, grad, lam):
    """Objective, duality gap and KKT residual at δ; residual = Aδ − r, grad = Aᵀ residual."""
    objective, gap, _ = _objective_and_gap(delta, residual, grad, lam)
    lam_b = _bcast(lam, delta)
    kkt_coord = jnp.where(delta != 0, jnp.abs(grad + lam_b * jnp.sign(delta)),
                          jnp.maximum(jnp.abs(grad) - lam_b, 0))
    return objective, gap, _per_sample_max(kkt_coord)


def _lambda_max(op, r):
    """``(B,)`` ‖Aᵀr‖∞, the λ above which δ = 0 is optimal."""
    return _per_sample_max(jnp.abs(op.adjoint(r)))


def _start(op, r, lam, delta0, step, continuation=None) -> _State:
    """The loop's state before its first iteration, from the start δ0 (internal layout)."""
    batch = r.shape[0]
    grad0 = op.adjoint(op.apply(delta0) - r)
    # the path starts at half of λ_max
    lam0 = lam if continuation is None else jnp.maximum(lam, _lambda_max(op, r) / 2)
    return _State(delta=delta0, grad=grad0, delta_step=jnp.zeros_like(delta0),
                  grad_step=jnp.zeros_like(grad0),
                  beta=jnp.zeros((batch,), r.dtype), t=jnp.ones((batch,), r.dtype), lam=lam0,
                  step=jnp.broadcast_to(jnp.asarray(step, r.dtype), (batch,)),
                  active=jnp.ones((batch,), bool), check_pending=jnp.zeros((batch,), bool),
                  iterations=jnp.zeros((batch,), jnp.int32),
                  status=jnp.full((batch,), Status.MAX_ITER, jnp.int32),
                  k=jnp.zeros((), jnp.int32))


def _fista(op, r, lam, delta0, step, tol, max_iter, *, restart, stop, continuation=None,
           step_growth=None):
    """The whole FISTA loop on internal-layout arrays (traceable: vmapped by stacked solves).

    Returns the solution (internal layout) and the per-sample iterations and status.
    """
    final = _iterate(op, r, lam, _start(op, r, lam, delta0, step, continuation), step, tol,
                     max_iter, restart=restart, stop=stop, continuation=continuation,
                     step_growth=step_growth)
    return final.delta, final.iterations, final.status


def _iterate(op, r, lam, state: _State, step, tol, k_stop, *, restart, stop,
             continuation=None, step_growth=None) -> _State:
    """FISTA iterations from ``state`` until its counter k reaches ``k_stop`` or no sample is
    active; see the module docstring. ``step`` is the base step."""
    dtype = r.dtype
    step = jnp.asarray(step, dtype)
    tol = jnp.asarray(tol, dtype)

    def residual_and_grad(z):
        residual = op.apply(z) - r
        return residual, op.adjoint(residual)

    if stop == "gap":
        rounding = jnp.finfo(dtype).eps * 0.5 * _per_sample_sum(jnp.square(r))
        grad_scale = _lambda_max(op, r)
        lam_rounding = jnp.finfo(dtype).eps * grad_scale  # a λ below it acts as 0

    def cond(s):
        return (s.k < k_stop) & jnp.any(s.active)

    def body(s):
        # A sample that has stopped takes steps of size 0 without momentum, which leave its
        # iterate and gradient exactly as they are: no per-sample select over the full arrays.
        step_b = _bcast(jnp.where(s.active, s.step, 0), s.delta)
        beta = _bcast(jnp.where(s.active, s.beta, 0), s.delta)
        y = s.delta + beta * s.delta_step
        grad_y = s.grad + beta * s.grad_step  # ∇f is affine: no operator call
        delta = _soft_threshold(y - step_b * grad_y, _bcast(s.lam, y) * step_b)
        residual, grad = residual_and_grad(delta)
        delta_step = delta - s.delta
        accepted = jnp.ones_like(s.active)
        step_next = s.step
        if step_growth is not None:
            # f is quadratic, so the sufficient-decrease test f(δ⁺) ≤ f(y) + ⟨∇f(y), δ⁺ − y⟩ +
            # ‖δ⁺ − y‖²/2s reads s⟨δ⁺ − y, ∇f(δ⁺) − ∇f(y)⟩ ≤ ‖δ⁺ − y‖² (δ⁺ − y = Δδ − βΔδ_prev)
            moved = delta_step - beta * s.delta_step
            curvature = _per_sample_sum(moved * (grad - s.grad - beta * s.grad_step))
            # the base step is safe: always accepted, so rounding cannot stall a sample and a
            # non-finite step taken at it is reported, not retried
            moved_sq = _per_sample_sum(jnp.square(moved))
            accepted = (s.step * curvature <= moved_sq) | (s.step <= step)
            # A step that did not move (δ held at 0 by the threshold) says nothing of the
            # step's limit and does not grow it; and the step stays below MAX_STEP_GROWTH times
            # the base (moves where A has no curvature always pass), so that halving brings it
            # back within a few steps (unbounded, it reached inf and never came back).
            grown = jnp.where(moved_sq > 0, jnp.minimum(s.step * step_growth,
                                                        step * MAX_STEP_GROWTH), s.step)
            step_next = jnp.where(accepted, grown, jnp.maximum(s.step / 2, step))

        t_next = (1 + jnp.sqrt(1 + 4 * s.t * s.t)) / 2
        beta_next = (s.t - 1) / t_next
        if restart:
            # ⟨y − δ⁺, δ⁺ − δ⟩ with y − δ = β(δ − δ_prev): y itself is never stored
            uphill = _per_sample_sum((beta * s.delta_step - delta_step) * delta_step) > 0
            t_next = jnp.where(uphill, 1, t_next)
            beta_next = jnp.where(uphill, 0, beta_next)

        stage_lam = s.lam
        check_pending = s.check_pending
        if stop == "gap":
            def gap_rule(_):
                objective, gap, grad_inf = _objective_and_gap(delta, residual, grad, s.lam)
                # At λ ≈ 0 the KKT residual is ‖∇f‖∞ to within λ, below rounding here.
                negligible_lam = lam <= lam_rounding
                done = (gap <= tol * objective + rounding) | \
                    (negligible_lam & (grad_inf <= tol * grad_scale))
                next_stage = jnp.zeros_like(done)
                if continuation is not None:
                    on_path = s.lam > lam
                    next_stage = on_path & (gap <= _STAGE_TOL * objective + rounding)
                    done = done & ~on_path
                return done, ~jnp.isfinite(objective), next_stage

            # The gap's reductions cost about a fifth of an iteration: a sample is checked on
            # every GAP_EVERY-th iteration and a segment's last, and, when its step there was
            # rejected, on its next (else a sample alternating accepted and rejected steps in
            # phase with the schedule would never be checked). A sample's checks depend on its
            # own steps only, so its result does not depend on the rest of the batch.
            check = ((s.k + 1) % GAP_EVERY == 0) | (s.k + 1 >= k_stop) | s.check_pending
            done, nonfinite, next_stage = lax.cond(
                jnp.any(check & s.active), gap_rule,
                lambda _: (jnp.zeros_like(s.active),) * 3, None)
            done, nonfinite, next_stage = done & check, nonfinite & check, next_stage & check
            check_pending = check & ~accepted
            if continuation is not None:
                next_stage = next_stage & accepted
                # below rounding level (the λ ≈ 0 test) the path jumps to λ itself: a
                # geometric path would never reach λ = 0
                shrunk = s.lam * continuation
                shrunk = jnp.where(shrunk <= lam_rounding, lam,
                                   jnp.maximum(lam, shrunk))
                stage_lam = jnp.where(next_stage, shrunk, s.lam)
                t_next = jnp.where(next_stage, 1, t_next)  # a new problem: momentum restarts
                beta_next = jnp.where(next_stage, 0, beta_next)
        else:
            change = _per_sample_sum(jnp.abs(delta_step)) / math.prod(op.in_shape)
            done = change <= tol
            if stop == "reference":
                done = jnp.broadcast_to(jnp.max(change) <= tol, done.shape)
            nonfinite = ~jnp.isfinite(change)
        # a rejected step leaves the sample where it was
        done, nonfinite = done & accepted, nonfinite & accepted
        status = jnp.where(nonfinite, Status.NONFINITE,
                           jnp.where(done, Status.CONVERGED, s.status))
        # Steps, not previous iterates, are carried: every array of the new state is freshly
        # computed, so XLA need not copy buffers to rotate them (12 fewer passes over δ's size
        # per iteration on XLA:CPU, benchmarks/README.md).
        grad_step = grad - s.grad
        if step_growth is not None:
            # A rejected sample keeps its state and retries the same y with half the step. Few
            # steps are rejected, so the four full-size selects run only when one is.
            def keep_rejected(new):
                keep = _bcast(accepted, delta)
                return tuple(jnp.where(keep, a, b) for a, b in zip(new, (
                    s.delta, s.grad, s.delta_step, s.grad_step)))

            delta, grad, delta_step, grad_step = lax.cond(
                jnp.all(accepted), lambda new: new, keep_rejected,
                (delta, grad, delta_step, grad_step))
            beta_next = jnp.where(accepted, beta_next, s.beta)
            t_next = jnp.where(accepted, t_next, s.t)
        return _State(delta=delta, grad=grad, delta_step=delta_step,
                      grad_step=grad_step,
                      beta=jnp.where(s.active, beta_next, s.beta),
                      t=jnp.where(s.active, t_next, s.t),
                      lam=jnp.where(s.active, stage_lam, s.lam),
                      step=jnp.where(s.active, step_next, s.step),
                      active=s.active & ~done & ~nonfinite,
                      check_pending=jnp.where(s.active, check_pending, s.check_pending),
                      iterations=s.iterations + s.active.astype(jnp.int32),
                      status=jnp.where(s.active, status, s.status), k=s.k + 1)

    return lax.while_loop(cond, body, state)


_STATIC = ("restart", "stop", "continuation", "step_growth")
_start_jit = jax.jit(_start, static_argnames=("continuation",))
# The state is donated: a segment's output reuses its input's buffers.
_iterate_jit = jax.jit(_iterate, static_argnames=_STATIC, donate_argnames=("state",))


def _rows(state: _State, rows) -> _State:
    """The state of the samples ``rows`` (a copy of the shared loop counter k: the next segment
    donates its input)."""
    return jax.tree.map(lambda a: a[rows] if a.ndim else jnp.copy(a), state)


def _solve(op, r, lam, delta0, step, tol, max_iter, *, restart, stop, continuation=None,
           step_growth=None):
    """:func:`_fista` in segments of :data:`SEGMENT` iterations that shed stopped samples.

    The batch iterates in lockstep, so a stopped sample costs as much per iteration as an
    active one. After each segment, once at most half of the working rows are active, the
    active samples' states move to a batch of the next smaller power-of-two width (padded with
    stopped copies), so a batch costs about its samples' mean iterations rather than its slowest
    sample's. Samples are independent under the per-sample stop rules, so the solution, counts
    and status are those of one lockstep loop; under the batch-wide "reference" rule, for a
    batch spread over several devices and under a trace the batch is solved in one piece.
    """
    static = dict(restart=restart, stop=stop, continuation=continuation,
                  step_growth=step_growth)
    state = _start_jit(op, r, lam, delta0, step, continuation=continuation)
    if stop == "reference" or isinstance(r, jax.core.Tracer) or len(r.sharding.device_set) > 1:
        final = _iterate_jit(op, r, lam, state, step, tol, max_iter, **static)
        return final.delta, final.iterations, final.status
    full = None          # every sample's state, written back at each compaction
    rows = np.arange(r.shape[0])  # the sample of each working row; the first `real` are live
    real = len(rows)
    work, r_work, lam_work = state, r, lam
    k = 0
    while True:
        k = min(k + SEGMENT, max_iter)
        work = _iterate_jit(op, r_work, lam_work, work, step, tol, k, **static)
        active = np.asarray(work.active)[:real]
        if k >= max_iter or not active.any():
            break
        if active.sum() <= len(rows) // 2:
            full = work if full is None else _write_back(full, work, rows[:real])
            live = rows[:real][active]
            real = len(live)
            rows = np.concatenate([live, np.full(_next_pow2(real) - real, live[-1])])
            work = _rows(full, rows)
            work = work._replace(active=work.active.at[real:].set(False))
            r_work, lam_work = r[rows], lam[rows]
    if full is not None:
        work = _write_back(full, work, rows[:real])
    return work.delta, work.iterations, work.status


def _write_back(full: _State, work: _State, rows) -> _State:
    """``full`` with the samples ``rows`` replaced by the first len(rows) rows of ``work``."""
    return jax.tree.map(lambda f, w: f.at[rows].set(w[:len(rows)]) if f.ndim else w, full, work)


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _minimiser(op, r, lam, delta0, config):
    """δ* = argmin ½‖Aδ − r‖² + λ‖δ‖₁ (internal layout) with the loop's iterations and status;
    ``config`` = (step, tol, max_iter, restart, stop, continuation, step_growth).
    Differentiable in op, r and λ by implicit differentiation (:func:`_minimiser_bwd`); δ* does
    not depend on the start δ0."""
    step, tol, max_iter, restart, stop, continuation, step_growth = config
    return _solve(op, r, lam, delta0, step, tol, max_iter, restart=restart, stop=stop,
                  continuation=continuation, step_growth=step_growth)


def _minimiser_fwd(op, r, lam, delta0, config):
    out = _minimiser(op, r, lam, delta0, config)
    return out, (op, r, lam, out[0])


def _batched_cg(matvec, b, tol, max_iter):
    """Solve H x = b for each sample of a batch by conjugate gradients, H = ``matvec`` a
    positive semi-definite map that acts on each sample alone. Each sample has its own step
    sizes and stops on its own (residual ≤ tol·‖b‖). Returns ``(x, solved)``, ``solved`` (B,)
    False for a sample that did not get there within ``max_iter`` steps (e.g. a singular H:
    the support has more coordinates than A has rows); its x is 0."""
    def dot(u, v):
        return _per_sample_sum(u * v)

    rr0 = dot(b, b)
    goal = jnp.square(tol) * rr0

    def cond(state):
        k, _, _, _, rr = state
        return (k < max_iter) & jnp.any(rr > goal)

    def body(state):
        k, x, r, p, rr = state
        hp = matvec(p)
        php = dot(p, hp)
        active = (rr > goal) & (php > 0)
        alpha = jnp.where(active, rr / jnp.where(active, php, 1), 0)
        x = x + _bcast(alpha, x) * p
        r = r - _bcast(alpha, r) * hp
        rr_next = jnp.where(active, dot(r, r), rr)
        beta = jnp.where(active, rr_next / jnp.where(active, rr, 1), 0)
        p = jnp.where(_bcast(active, p), r + _bcast(beta, p) * p, p)
        return k + 1, x, r, p, rr_next

    state = (jnp.zeros((), jnp.int32), jnp.zeros_like(b), b, b, rr0)
    _, x, _, _, rr = lax.while_loop(cond, body, state)
    solved = rr <= goal
    return jnp.where(_bcast(solved, x), x, 0), solved


@jax.jit
def _minimiser_bwd_core(op, r, lam, delta, v):
    # On the support S = {δ ≠ 0} the optimality conditions F_S = [Aᵀ(Aδ − r)]_S + λ sign δ_S = 0
    # hold and the support is locally constant, so dδ_S = −H⁻¹ dF_S with H = A_SᵀA_S and δ stays
    # 0 off S. The pullback of v is then −∇_(op, r, λ) ⟨w, F⟩ at fixed δ, w = H⁻¹ v_S (0 off S).
    support = (delta != 0).astype(delta.dtype)

    def normal(u):
        return support * op.adjoint(op.apply(support * u))

    # In exact arithmetic CG ends within |S| steps; the cap leaves room for rounding.
    cap = 2 * jnp.max(_per_sample_sum(support)).astype(jnp.int32) + 20
    w, solved = _batched_cg(normal, support * v, jnp.finfo(delta.dtype).eps ** 0.75, cap)
    w = support * w

    def inner(op, r, lam):
        return jnp.sum(op.apply(w) * (op.apply(delta) - r)) + \
            jnp.sum(_bcast(lam, delta) * w * jnp.sign(delta))

    return jax.tree.map(jnp.negative, jax.grad(inner, argnums=(0, 1, 2))(op, r, lam)), solved


def _minimiser_bwd(config, residuals, cotangents):
    op, r, lam, delta = residuals
    (d_op, d_r, d_lam), solved = _minimiser_bwd_core(op, r, lam, delta, cotangents[0])
    # solve_lasso's input checks need concrete values, so the backward pass runs on them too
    unsolved = np.flatnonzero(~np.asarray(solved))
    if unsolved.size:
        raise ValueError(
            f"gradient of solve_lasso: the system on the support of sample(s) "
            f"{unsolved.tolist()} could not be solved (A_SᵀA_S singular or too ill-"
            "conditioned: a capped or loosely certified solve whose support has more "
            "coordinates than A has rows); expected a converged solve with a unique "
            "solution: solve to a tighter tol, or in float64")
    return d_op, d_r, d_lam, jnp.zeros_like(delta)


_minimiser.defvjp(_minimiser_fwd, _minimiser_bwd)


@jax.jit
def _certify(op, r, lam, delta):
    """Objective, duality gap and KKT residual at δ (internal layout), per sample."""
    residual = op.apply(delta) - r
    return _certificates(delta, residual, op.adjoint(residual), lam)


class LassoNotConverged(RuntimeError):
    """Raised by ``solve_lasso(..., throw=True)`` when a sample did not meet the stop rule;
    ``result`` holds the :class:`LassoResult` all the same."""

    def __init__(self, result: "LassoResult"):
        self.result = result
        status = np.asarray(result.status)
        parts = [f"{int(np.sum(status == s))} of {status.size} sample(s) {s.message}"
                 for s in (Status.MAX_ITER, Status.NONFINITE) if np.any(status == s)]
        super().__init__("; ".join(parts) + " (throw=False returns them with their status)")


def solve_lasso(op, o, lam, *, anchor=None, init=None, options: Optional[LassoOptions] = None,
                lipschitz: Optional[float] = None, throw: bool = False,
                **overrides) -> LassoResult:
    """Solve ``min_z ½‖A z + b − o‖² + λ‖z − anchor‖₁`` for every sample of a batch.

    Algorithm, restart, certificates and stopping rules: see the module docstring.

    Args:
      op: :class:`~flipad_jax.Conv2d`, :class:`~flipad_jax.ConvTranspose2d` or
        :class:`~flipad_jax.Linear`; its ``bias`` is b (None: no bias).
      o: ``(B, *out_shape)`` targets (the pre-activation outputs, σ⁻¹ of the images).
      lam: λ ≥ 0, a scalar or ``(B,)``, one per sample. The reference's ``alpha``.
      anchor: z̄, ``in_shape`` or ``(B, *in_shape)``; default 0.
      init: ``(B, *in_shape)`` starting z (warm start); default from ``options.start``.
      options: :class:`LassoOptions` (default ``LassoOptions()``; the reference solver is
        ``LassoOptions.paper(op)``).
      lipschitz: L = ‖A‖² if known (e.g. from a previous result or the head bundle).
      throw: raise :class:`LassoNotConverged` if any sample ends other than CONVERGED.
      **overrides: fields of ``options`` to change for this call (max_iter, tol, stop, step,
        restart, start, lipschitz_margin, continuation, step_growth).

    Returns:
      :class:`LassoResult`. Non-convergence is reported per sample in ``status`` and raised
      only with ``throw=True``.

    Differentiable (reverse mode) in o, lam, anchor and the operator's arrays by implicit
    differentiation at the solution (module docstring); not through ``init``, on which the
    minimiser does not depend.

    The loop is a jit-compiled ``lax.while_loop`` run in segments from the host, which shed
    stopped samples into narrower power-of-two batches (module docstring): calls with the same
    shapes, dtypes and static options (stop rule, restart, the levers) reuse the compiled
    programs, one per batch width reached (up to about log₂ B for a batch of B); λ, tol, step and
    max_iter are traced values. Sharded ``o`` (batch axis) gives a sharded solve, in one piece.
    """
    opts = (options or LassoOptions()).replace(**overrides)
    stop, restart, max_iter = opts.stop, opts.restart, opts.max_iter

    check_floating("o", o)
    o = jnp.asarray(o)
    if o.dtype != op.dtype:
        raise ValueError(f"o has dtype {o.dtype} but the operator's weight is {op.dtype}: "
                         "expected the same floating dtype")
    tol = opts.tol_for(op, o.dtype)
    in_shape = op.in_shape
    check_batch("o", o, op.out_shape, "the operator's output")
    check_finite("o", o)
    batch = o.shape[0]

    lam = jnp.asarray(lam, o.dtype)
    if lam.ndim == 0:
        lam = jnp.broadcast_to(lam, (batch,))
    if lam.shape != (batch,):
        raise ValueError(f"lam has shape {lam.shape}: expected a scalar or ({batch},)")
    check_finite("lam", lam)
    if bool(jnp.any(lam < 0)):
        raise ValueError(f"lam has negative values (min {float(jnp.min(lam))}): expected lam >= 0")

    if anchor is None:
        anchor = jnp.zeros((1,) + in_shape, o.dtype)
    else:
        anchor = jnp.asarray(anchor)
        check_floating("anchor", anchor)
        if anchor.shape == in_shape:
            anchor = anchor[None]
        if anchor.shape not in ((1,) + in_shape, (batch,) + in_shape):
            raise ValueError(f"anchor has shape {anchor.shape}: expected {in_shape} or "
                             f"({batch}, {', '.join(map(str, in_shape))})")
        check_finite("anchor", anchor)
        anchor = anchor.astype(o.dtype)
    if init is None:
        delta0 = anchor if opts.start == "reference" else jnp.zeros_like(anchor)
    else:
        init = jnp.asarray(init)
        check_floating("init", init)
        if init.shape != (batch,) + in_shape:
            raise ValueError(f"init has shape {init.shape}: expected "
                             f"({batch}, {', '.join(map(str, in_shape))})")
        check_finite("init", init)
        delta0 = init.astype(o.dtype) - anchor
    delta0 = jnp.broadcast_to(delta0, (batch,) + in_shape)

    step = opts.step
    if step is None:
        if lipschitz is None:
            # the step does not change the minimiser, so it is not differentiated
            lipschitz = lax.stop_gradient(op).lipschitz()
        lipschitz = check_positive("lipschitz", lipschitz)
        step = 1.0 / (opts.lipschitz_margin * lipschitz)

    r = op.out_to_internal(o - op.affine(anchor))
    delta, iterations, status = _minimiser(op, r, lam, op.to_internal(delta0),
                                           (float(step), float(tol), max_iter, restart, stop,
                                            opts.continuation, opts.step_growth))
    objective, gap, kkt = _certify(op, r, lam, delta)
    z = op.from_internal(delta) + anchor
    result = LassoResult(z=z, iterations=iterations, objective=objective, gap=gap, kkt=kkt,
                         status=status, lipschitz=lipschitz, step=float(step))
    if throw and not bool(jnp.all(result.converged)):
        raise LassoNotConverged(result)
    return result
