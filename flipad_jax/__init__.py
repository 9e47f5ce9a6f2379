"""flipad-jax: single-model attribution of generative models by final-layer inversion (FLIPAD)."""

from flipad_jax.operators import Conv2d, ConvTranspose2d, Linear
from flipad_jax.lasso import LassoNotConverged, LassoOptions, LassoResult, Status, solve_lasso
from flipad_jax.head import Head
from flipad_jax.features import FeatureConfig
from flipad_jax.deepsad import DeepSADConfig
from flipad_jax.detector import Detector
from flipad_jax import metrics

__version__ = "0.1.0"

__all__ = ["Conv2d", "ConvTranspose2d", "Linear", "LassoNotConverged", "LassoOptions",
           "LassoResult", "Status", "solve_lasso", "Head", "FeatureConfig", "DeepSADConfig", "Detector", "metrics",
           "__version__"]
