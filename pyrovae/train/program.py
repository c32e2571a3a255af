"""The program ``fit`` trains: a model/guide pair bound to the data's size, its ELBO as a loss, its parameters.

Calling convention: ``model(*batch)`` and ``guide(*batch)``, where ``batch`` is what the dataset returns
for a minibatch; the sites in the data plate are scaled by N/B by :class:`pyrovae.infer.handlers.DataScale`.
A program that names a ``num_data`` parameter also gets ``num_data=N`` (and may subsample its plate itself).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import ELBO

from ..data import Dataset
from ..errors import PyrovaeError
from ..infer import LatentScale
from ..infer.handlers import DataScale, PlateRecorder, bind_num_data, find_data_plate, off_rng, scale_for
from ..models.vae import parameters_collected


def as_args(batch: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return batch if isinstance(batch, tuple) else (batch,)


def device_of(data: Dataset) -> torch.device:
    """The device a dataset's batches live on."""
    device = getattr(data, "device", None)
    if device is None:
        args = as_args(data.batch(torch.arange(1)))
        device = args[0].device
    return torch.device(device)


def _collect_params(loss_fn: Callable[[], torch.Tensor]) -> tuple[list[str], list[torch.Tensor]]:
    """Run one loss evaluation and collect the (unconstrained) parameters it touched, in order."""
    with poutine.trace(param_only=True) as tr:
        loss_fn()
    names, params = [], []
    for name, site in tr.trace.nodes.items():
        p = site["value"].unconstrained()
        if p.requires_grad and all(p is not q for q in params):
            names.append(name)
            params.append(p)
    if not params:
        raise PyrovaeError("the model and guide have no parameters to train (use pyro.param or pyro.module)")
    return names, params


class Program:
    """``loss(args, beta)``: the estimator's loss of one minibatch (minibatch-scaled, latents scaled by ``beta``).

    Built from one validated probe evaluation (Pyro's shape and support checks), run off the RNG, that
    also finds the trained parameters (``params``, by param-store name) and the data plate.
    """

    def __init__(
        self, model: Callable, guide: Callable, data: Dataset, estimator: ELBO, batch_size: int, data_plate: str | None
    ) -> None:
        n = len(data)
        self.device = device_of(data)
        self.differentiable = hasattr(estimator, "differentiable_loss")
        self.estimator = estimator
        self.model, self.guide, self.kwargs = bind_num_data(model, guide, n)
        self.scale: DataScale | None = None  # set from the probe's plates; None where Pyro scales
        probe = as_args(data.batch(torch.arange(min(batch_size, n), device=self.device)))
        with pyro.validation_enabled(True), off_rng(self.device), PlateRecorder() as plates:
            names, params = _collect_params(lambda: self.loss(probe, 1.0))
        self.scale = scale_for(plates.frames, len(probe[0]), n, data_plate)
        self.plate_name = find_data_plate(plates.frames, len(probe[0]), data_plate)
        for p in params:
            p.grad = None
        self.params = dict(zip(names, params))

    def loss(self, args: tuple[torch.Tensor, ...], beta: float) -> torch.Tensor:
        with LatentScale(beta) if beta != 1.0 else nullcontext(), self.scale or nullcontext():
            if self.differentiable:
                return self.estimator.differentiable_loss(self.model, self.guide, *args, **self.kwargs)
            return torch.as_tensor(self.estimator.loss_and_grads(self.model, self.guide, *args, **self.kwargs))

    def hot(self) -> AbstractContextManager:
        """Around the hot loop: models skip re-registering parameters (``loss_and_grads`` needs the param sites)."""
        return parameters_collected() if self.differentiable else nullcontext()
