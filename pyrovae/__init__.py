"""pyrovae: variational autoencoders written as Pyro programs, with swappable ELBOs."""

__version__ = "0.1.0"

from .data import ImageData, Pixels, TensorData, load_dataset, make_splits, synthetic  # noqa: E402
from .errors import PyrovaeError  # noqa: E402
from .gmm import GMM, kmeans_pp  # noqa: E402
from .infer import ESTIMATORS, RenyiBound, make_elbo  # noqa: E402
from .likelihoods import LIKELIHOODS, make_likelihood  # noqa: E402
from .models import VAE, build_vae  # noqa: E402
from .train import FitResult, evaluate_elbo, fit  # noqa: E402

__all__ = [
    "ESTIMATORS",
    "LIKELIHOODS",
    "FitResult",
    "GMM",
    "ImageData",
    "Pixels",
    "PyrovaeError",
    "RenyiBound",
    "TensorData",
    "VAE",
    "build_vae",
    "evaluate_elbo",
    "fit",
    "kmeans_pp",
    "load_dataset",
    "make_elbo",
    "make_likelihood",
    "make_splits",
    "synthetic",
]
