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
    """Subclasses define ``estimator(alpha, n_iter)``, an unfitted estimator with
    ``fit_intercept=False`` that stops after ``n_iter`` of its iterations (tol ~0)."""

    requirements = []
    sampling_strategy = "iteration"

    def set_objective(self, op, matrix, o, zbar, lam, r, torch_args):
        self.matrix = matrix
        self.r, self.zbar = r, np.asarray(zbar, np.float64).ravel()
        self.alpha = lam / matrix.shape[0]

    def warm_up(self):
        self.run_once(1)  # numba compilation (celer, skglm)

    def run(self, n_iter):
        delta = np.zeros((len(self.r), self.matrix.shape[1]))
        if n_iter > 0:  # 0 iterations: the estimators' start, δ = 0
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                for i, target in enumerate(self.r):
                    delta[i] = self.estimator(self.alpha, n_iter).fit(self.matrix, target).coef_
        self.z = delta + self.zbar

    def get_result(self):
        return dict(z=self.z)
