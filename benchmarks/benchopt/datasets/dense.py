from benchopt import BaseDataset

from benchmark_utils.problem import dense_problem  # also puts this repository on sys.path
import flipad_jax as fj  # noqa: E402, I001


class Dataset(BaseDataset):
    """A seeded dense random problem (``benchmark_utils.problem.dense_problem``)."""

    name = "dense"
    requirements = []
    parameters = {"n_out": [200], "n_in": [500], "batch": [4], "lam_ratio": [0.1], "seed": [0]}
    test_parameters = {"n_out": [20], "n_in": [50], "batch": [2]}

    def get_data(self):
        p = dense_problem(self.n_out, self.n_in, self.batch, self.seed, self.lam_ratio)
        op = fj.Linear(p["weight"], p["bias"])
        return dict(op=op, matrix=p["weight"].astype("float64"), bias=p["bias"], o=p["o"],
                    zbar=p["zbar"], lam=p["lam"], torch_args=None)
