"""pyrovae: variational autoencoders written as Pyro programs, with swappable ELBOs."""

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {  # name -> module: imported on first use, so that `import pyrovae` (and the CLI's start) is quick
    "Fitted": "tasks.compare",
    "compare": "tasks.compare",
    "ImageData": "data",
    "Pixels": "data",
    "TensorData": "data",
    "load_dataset": "data",
    "make_splits": "data",
    "synthetic": "data",
    "PyrovaeError": "errors",
    "PointEvaluation": "infer.importance",
    "evaluate_points": "infer.importance",
    "evaluate_run": "tasks.evaluate",
    "log_likelihood": "infer.importance",
    "pareto_khat": "infer.diagnostics",
    "AnnealedEstimate": "infer.ais",
    "annealed_log_likelihood": "infer.ais",
    "Sandwich": "infer.bdmc",
    "bdmc": "infer.bdmc",
    "GMM": "models.gmm",
    "kmeans_pp": "models.gmm",
    "ESTIMATORS": "infer",
    "RenyiBound": "infer",
    "make_elbo": "infer",
    "LIKELIHOODS": "nn.likelihoods",
    "make_likelihood": "nn.likelihoods",
    "VAE": "models.vae",
    "build_vae": "models.vae",
    "load_run": "runs",
    "RunConfig": "config",
    "Callback": "train",
    "FitResult": "train",
    "TrainState": "train",
    "evaluate_elbo": "train",
    "fit": "train",
}

__all__ = [
    "AnnealedEstimate",
    "ESTIMATORS",
    "LIKELIHOODS",
    "Callback",
    "FitResult",
    "Fitted",
    "PointEvaluation",
    "GMM",
    "ImageData",
    "Pixels",
    "PyrovaeError",
    "RenyiBound",
    "RunConfig",
    "Sandwich",
    "TensorData",
    "TrainState",
    "VAE",
    "annealed_log_likelihood",
    "bdmc",
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


def __getattr__(name: str) -> Any:
    """The public names, imported from their modules when first asked for (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pyrovae' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
