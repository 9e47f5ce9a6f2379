"""Final-layer lasso of FLIPAD: the batch mean of ½‖A z + b − oᵢ‖² + λ‖z − z̄‖₁.

See ``benchmark_utils/problem.py`` for the convention. Every solver gets the layer as a
flipad-jax operator (``op``), as an explicit float64 sparse matrix (``matrix``), the shifted
targets ``r`` of the plain lasso in δ = z − z̄, and the reference transcription's arguments
(``torch_args``, None where it does not apply); each returns ``z`` of shape ``(B, n_in)``.
"""

import numpy as np
from benchopt import BaseObjective

from benchmark_utils.problem import objective, shifted_target


class Objective(BaseObjective):
    name = "FLIPAD final-layer lasso"
    url = "https://github.com/MikeLasz/flipad"
    min_benchopt_version = "1.10"
    requirements = []
    parameters = {}
    sampling_strategy = "iteration"

    def set_data(self, op, matrix, bias, o, zbar, lam, torch_args):
        self.op, self.matrix, self.bias, self.o, self.zbar, self.lam = op, matrix, bias, o, zbar, lam
        self.torch_args = torch_args
        self.r = shifted_target(matrix, bias, o, zbar)

    def get_objective(self):
        return dict(op=self.op, matrix=self.matrix, o=self.o, zbar=self.zbar, lam=self.lam,
                    r=self.r, torch_args=self.torch_args)

    def evaluate_result(self, z):
        per_sample = objective(self.matrix, self.bias, self.o, self.zbar, self.lam, z)
        return dict(value=float(per_sample.mean()), max_sample=float(per_sample.max()))

    def get_one_result(self):
        return dict(z=np.broadcast_to(np.ravel(self.zbar), (len(self.o), np.size(self.zbar))))
