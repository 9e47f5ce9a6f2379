from skglm import Lasso

from benchmark_utils.estimators import EstimatorSolver


class Solver(EstimatorSolver):
    """skglm's working-set ``Lasso`` (an iteration is one outer iteration), tol 1e-12."""

    name = "skglm"
    requirements = []

    def estimator(self, alpha, n_iter):
        return Lasso(alpha=alpha, fit_intercept=False, max_iter=n_iter, tol=1e-12)
