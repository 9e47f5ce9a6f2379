import numpy as np
from benchopt import BaseDataset

from benchmark_utils.heads import demo_head_problem, operator_matrix


class Dataset(BaseDataset):
    """The shipped Fashion-MNIST demo heads (DCGAN: ConvTranspose2d 32→1, 16² → 32²; LSGAN:
    Conv2d 32→1 at 32²), targets σ⁻¹ of G's own samples, λ 5e-4 (the paper's)."""

    name = "demo_head"
    requirements = []
    parameters = {"generator": ["dcgan", "lsgan"], "batch": [4], "zbar_samples": [2000]}
    test_parameters = {"generator": ["dcgan"], "batch": [2], "zbar_samples": [200]}

    def get_data(self):
        from solver import LAM

        p = demo_head_problem(self.generator, self.batch, self.zbar_samples)
        op = p["op"]
        batch = len(p["o"])
        torch_args = {k: p[k] for k in ("kind", "weight", "bias", "stride", "padding")}
        # the per-channel bias as one value per output coordinate (NCHW order, as the matrix)
        bias = None if p["bias"] is None else np.repeat(p["bias"], np.prod(op.out_shape[1:]))
        return dict(op=op, matrix=operator_matrix(op), bias=bias, o=p["o"].reshape(batch, -1),
                    zbar=p["zbar"].ravel(), lam=LAM, torch_args=torch_args)
