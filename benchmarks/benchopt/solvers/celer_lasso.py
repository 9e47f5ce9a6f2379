from celer import Lasso

from benchmark_utils.estimators import EstimatorSolver


class Solver(EstimatorSolver):
    """celer's working-set ``Lasso`` (an iteration is one outer working-set iteration), tol 1e-12
    (tol 0 would run the inner solver to its epoch cap every time)."""

    name = "celer"
    requirements = []

    def estimator(self, alpha, n_iter):
        return Lasso(alpha=alpha, fit_intercept=False, max_iter=n_iter, tol=1e-12)
