from sklearn.linear_model import Lasso

from benchmark_utils.estimators import EstimatorSolver


class Solver(EstimatorSolver):
    """scikit-learn's coordinate descent ``Lasso`` (one epoch per iteration), tol 0."""

    name = "sklearn"
    requirements = []

    def estimator(self, alpha, n_iter):
        return Lasso(alpha=alpha, fit_intercept=False, max_iter=n_iter, tol=0.0)
