from celer import Lasso

from benchmark_utils.estimators import EstimatorSolver


class Solver(EstimatorSolver):
    """celer's working-set ``Lasso`` with dual extrapolation (its tol: duality gap)."""

    name = "celer"
    requirements = []

    def estimator(self, alpha, tol, target):
        return Lasso(alpha=alpha, fit_intercept=False, max_iter=1000, tol=tol)
