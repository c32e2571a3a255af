"""pyrovae: variational autoencoders written as Pyro programs, with swappable ELBOs."""

__version__ = "0.1.0"

from .compare import Fitted, compare  # noqa: E402  (the function shadows the submodule's attribute name)
from .data import ImageData, Pixels, TensorData, load_dataset, make_splits, synthetic  # noqa: E402
from .errors import PyrovaeError  # noqa: E402
from .evaluate import PointEvaluation, evaluate_points, evaluate_run, log_likelihood, pareto_khat  # noqa: E402
from .gmm import GMM, kmeans_pp  # noqa: E402
from .infer import ESTIMATORS, RenyiBound, make_elbo  # noqa: E402
from .likelihoods import LIKELIHOODS, make_likelihood  # noqa: E402
from .models import VAE, build_vae  # noqa: E402
from .runs import load_run  # noqa: E402
from .train import FitResult, evaluate_elbo, fit  # noqa: E402

__all__ = [
    "ESTIMATORS",
    "LIKELIHOODS",
    "FitResult",
    "Fitted",
    "PointEvaluation",
    "GMM",
    "ImageData",
    "Pixels",
    "PyrovaeError",
    "RenyiBound",
    "TensorData",
    "VAE",
    "build_vae",
    "compare",
    "evaluate_elbo",
    "evaluate_points",
    "evaluate_run",
    "fit",
    "kmeans_pp",
    "load_dataset",
    "load_run",
    "log_likelihood",
    "make_elbo",
    "make_likelihood",
    "make_splits",
    "pareto_khat",
    "synthetic",
]
