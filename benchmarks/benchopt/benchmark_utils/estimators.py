"""Base of the scikit-learn style solvers (scikit-learn, celer, skglm).

They solve min_w (1/(2n))‖y − Xw‖² + alpha‖w‖₁ for one target at a time, with no anchor and
no bias; each sample's problem is that one with X = A (the explicit matrix, n = n_out rows),
y = rᵢ = oᵢ − b − A z̄, w = δ = z − z̄ and alpha = λ/n_out (``benchmark_utils.problem``).
"""

import warnings

import numpy as np
from benchopt import BaseSolver
from sklearn.exceptions import ConvergenceWarning


class EstimatorSolver(BaseSolver):
    """Subclasses define ``estimator(alpha, tol, target)``, an unfitted estimator with
    ``fit_intercept=False`` that stops at its own tolerance ``tol`` (iteration caps far away).

    Sampled by tolerance, not iterations: the working-set solvers' last outer iterations cost
    by far the most (celer on the DCGAN head: 6 s to reach 1.7e-2 relative suboptimality, then
    159 s for 7e-6, at tol 1e-12 and a capped outer count, loaded 2-core machine), so a
    decreasing tolerance lets benchopt's timeout stop them between runs.
    """

    requirements = []
    sampling_strategy = "tolerance"

    def set_objective(self, op, matrix, o, zbar, lam, r, torch_args):
        self.matrix = matrix
        self.r, self.zbar = r, np.asarray(zbar, np.float64).ravel()
        self.alpha = lam / matrix.shape[0]

    def warm_up(self):
        self.run_once(1e-2)  # numba compilation (celer, skglm)

    def run(self, tol):
        delta = np.zeros((len(self.r), self.matrix.shape[1]))
        if tol < 1:  # benchopt's first run (tol 3e38) is the estimators' start, δ = 0
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                for i, target in enumerate(self.r):
                    delta[i] = self.estimator(self.alpha, tol, target).fit(self.matrix, target).coef_
        self.z = delta + self.zbar

    def get_result(self):
        return dict(z=self.z)
