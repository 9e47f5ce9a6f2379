from sklearn.linear_model import Lasso

from benchmark_utils.estimators import EstimatorSolver


class Solver(EstimatorSolver):
    """scikit-learn's coordinate descent ``Lasso`` (its tol: duality gap relative to ‖y‖²/n)."""

    name = "sklearn"
    requirements = []

    def estimator(self, alpha, tol, target):
        return Lasso(alpha=alpha, fit_intercept=False, max_iter=1_000_000, tol=tol)
