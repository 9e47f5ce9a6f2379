import numpy as np
import torch
from benchopt import BaseSolver

from benchmark_utils import _BENCHMARKS  # noqa: F401  (puts benchmarks/ on sys.path)
from reference_fista import reference_fista


class Solver(BaseSolver):
    """The reference implementation's FISTA transcribed in PyTorch
    (``benchmarks/reference_fista.py``: step 0.025, no restart, start δ₀ = z̄), exactly
    ``n_iter`` iterations (tol 0; 0 iterations give its start 2z̄), float32 on the CPU. Convolutional heads only."""

    name = "reference-fista-torch"
    requirements = []
    sampling_strategy = "iteration"

    def skip(self, op, matrix, o, zbar, lam, r, torch_args):
        if torch_args is None:
            return True, "the transcription covers Conv2d/ConvTranspose2d heads only"
        return False, None

    def set_objective(self, op, matrix, o, zbar, lam, r, torch_args):
        self.lam, self.kind = lam, torch_args["kind"]
        self.stride, self.padding = torch_args["stride"], torch_args["padding"]
        tensor = lambda a: None if a is None else torch.from_numpy(np.asarray(a, np.float32))  # noqa: E731
        self.weight, self.bias = tensor(torch_args["weight"]), tensor(torch_args["bias"])
        self.o = tensor(np.reshape(o, (len(o),) + op.out_shape))
        self.zbar = tensor(np.reshape(zbar, op.in_shape))

    def run(self, n_iter):
        self.z, _ = reference_fista(self.kind, self.weight, self.bias, self.o, self.zbar,
                                    alpha=self.lam, max_iter=n_iter, tol=0.0,
                                    stride=self.stride, padding=self.padding)

    def get_result(self):
        return dict(z=self.z.numpy().reshape(len(self.o), -1))
