import numpy as np
from skglm import Lasso

from benchmark_utils.estimators import EstimatorSolver


class Solver(EstimatorSolver):
    """skglm's working-set ``Lasso`` (Anderson-accelerated coordinate descent; its tol: the
    optimality violation, an absolute number: scaled here by the violation at the start δ = 0,
    ‖Aᵀr‖∞/n, so that benchopt's tolerances 1, 1/ρ, … are relative like the others')."""

    name = "skglm"
    requirements = []

    def estimator(self, alpha, tol, target):
        scale = np.abs(self.matrix.T @ target).max() / self.matrix.shape[0]
        return Lasso(alpha=alpha, fit_intercept=False, max_iter=1000, tol=tol * scale)
