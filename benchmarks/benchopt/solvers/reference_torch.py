import numpy as np
import torch
from benchopt import BaseSolver

from benchmark_utils import _BENCHMARKS  # noqa: F401  (puts benchmarks/ on sys.path)
from reference_fista import reference_fista


class Solver(BaseSolver):
    """The reference implementation's FISTA transcribed in PyTorch
    (``benchmarks/reference_fista.py``: step 0.025, no restart, start δ₀ = z̄), exactly
    ``n_iter`` iterations (tol 0; 0 iterations give its start 2z̄), float32 on the CPU.
    Convolutional heads only.

    ``torch_threads``: PyTorch's intra-op threads during the solve (restored afterwards). On the
    shared 2-core machine torch's default of 2 ran 300 DCGAN-head iterations (batch 4) in
    0.52–1.70 s against 0.09–0.19 s with 1 thread (one process, JAX loaded, load about 4).
    """

    name = "reference-fista-torch"
    requirements = []
    parameters = {"torch_threads": [1]}
    sampling_strategy = "iteration"

    def skip(self, op, matrix, o, zbar, lam, r, torch_args):
        if torch_args is None:
            return True, "the transcription covers Conv2d/ConvTranspose2d heads only"
        return False, None

    def set_objective(self, op, matrix, o, zbar, lam, r, torch_args):
        self.lam, self.kind = lam, torch_args["kind"]
        self.stride, self.padding = torch_args["stride"], torch_args["padding"]
        def tensor(a):  # from a writable float32 copy
            return None if a is None else torch.from_numpy(np.array(a, np.float32))
        self.weight, self.bias = tensor(torch_args["weight"]), tensor(torch_args["bias"])
        self.o = tensor(np.reshape(o, (len(o),) + op.out_shape))
        self.zbar = tensor(np.reshape(zbar, op.in_shape))

    def run(self, n_iter):
        threads = torch.get_num_threads()
        torch.set_num_threads(self.torch_threads)
        try:
            self.z, _ = reference_fista(self.kind, self.weight, self.bias, self.o, self.zbar,
                                        alpha=self.lam, max_iter=n_iter, tol=0.0,
                                        stride=self.stride, padding=self.padding)
        finally:
            torch.set_num_threads(threads)

    def get_result(self):
        return dict(z=self.z.numpy().reshape(len(self.o), -1))
