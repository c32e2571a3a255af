"""The program ``fit`` trains: a model/guide pair bound to the data's size, its ELBO as a loss, its parameters.

Calling convention: ``model(*args, **kwargs)`` and ``guide(*args, **kwargs)`` for what the dataset returns for
a minibatch (a tensor, a tuple, or a :class:`pyrovae.data.Call`); the sites in the data plate are scaled by N/B
by :class:`pyrovae.infer.handlers.DataScale`. A program that names a ``num_data`` parameter also gets
``num_data=N`` (and may subsample its plate itself). ``extra`` pairs (an auxiliary loss such as the
semi-supervised VAE's classifier term) are called the same way and their losses added.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import ELBO, TraceEnum_ELBO

from ..data import Batch, Dataset, as_call, batch_length
from ..errors import PyrovaeError
from ..infer import LatentScale
from ..infer.handlers import DataScale, PlateRecorder, bind_num_data, find_data_plate, off_rng, plan_scale
from ..models.vae import parameters_collected


def device_of(data: Dataset) -> torch.device:
    """The device a dataset's batches live on."""
    device = getattr(data, "device", None)
    if device is None:
        args, kwargs = as_call(data.batch(torch.arange(1)))
        tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
        device = tensors[0].device if tensors else "cpu"
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


def _check_enumeration(sites: list, estimator: ELBO) -> None:
    """Refuse sites marked for enumeration unless the estimator enumerates them (Pyro's TraceEnum_ELBO)."""
    if isinstance(estimator, TraceEnum_ELBO):
        return
    marked = [site.name for site in sites if site.enumerated]
    if marked:
        raise PyrovaeError(
            f"site {marked[0]!r} is marked for enumeration, which {type(estimator).__name__} does not do (it would "
            "draw it instead of summing it out): train with elbo=pyro.infer.TraceEnum_ELBO(max_plate_nesting=...)"
        )


class Program:
    """``loss(batch, beta)``: the estimator's loss of one minibatch (minibatch-scaled, latents scaled by ``beta``).

    Built from one validated probe evaluation (Pyro's shape and support checks), run off the RNG, that
    also finds the trained parameters (``params``, by param-store name) and the data plate, and refuses
    (one line, before any step) a program whose minibatches cannot be scaled correctly.
    """

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        data: Dataset,
        estimator: ELBO,
        batch_size: int,
        data_plate: str | None,
        extra: Sequence[tuple[Callable, Callable]] = (),
    ) -> None:
        n = len(data)
        self.device = device_of(data)
        self.differentiable = hasattr(estimator, "differentiable_loss")
        self.estimator = estimator
        self.model, self.guide, self.kwargs = bind_num_data(model, guide, n)
        self.extra = [bind_num_data(m, g, n) for m, g in extra]
        self.scale: DataScale | None = None  # set from the probe's plates; None where Pyro scales
        probe = data.batch(torch.arange(min(batch_size, n), device=self.device))
        plates = PlateRecorder()
        try:
            with pyro.validation_enabled(True), off_rng(self.device), plates:
                names, params = _collect_params(lambda: self.loss(probe, 1.0))
        except Exception as e:
            _check_enumeration(plates.sites, estimator)  # a site the estimator cannot treat explains the failure
            if isinstance(e, NotImplementedError):  # Pyro's way of saying an estimator cannot treat this program
                raise PyrovaeError(f"{type(estimator).__name__} cannot train this program: {e}") from e
            raise
        _check_enumeration(plates.sites, estimator)
        b = batch_length(probe)
        self.scale = plan_scale(plates.sites, b, n, data_plate)
        self.plate_name = find_data_plate(plates.frames, b, data_plate)
        for p in params:
            p.grad = None
        self.params = dict(zip(names, params))

    def loss(self, batch: Batch, beta: float) -> torch.Tensor:
        args, kwargs = as_call(batch)
        if self.scale is not None:
            self.scale.batch_size = batch_length(batch)
        with LatentScale(beta) if beta != 1.0 else nullcontext(), self.scale or nullcontext():
            total = self._loss(self.model, self.guide, args, {**kwargs, **self.kwargs})
            for model, guide, bound in self.extra:
                total = total + self._loss(model, guide, args, {**kwargs, **bound})
            return total

    def _loss(self, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
        if self.differentiable:
            return torch.as_tensor(self.estimator.differentiable_loss(model, guide, *args, **kwargs))
        return torch.as_tensor(self.estimator.loss_and_grads(model, guide, *args, **kwargs))

    def hot(self) -> AbstractContextManager:
        """Around the hot loop: models skip re-registering parameters (``loss_and_grads`` needs the param sites)."""
        return parameters_collected() if self.differentiable else nullcontext()
