"""``evaluate_elbo``: the mean ELBO per datapoint over a dataset, as ``fit`` reports it for validation."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
from pyro.infer import ELBO

from ..data import Dataset, as_call
from ..infer import MeanField
from ..infer.handlers import DataScale, bind_num_data, minibatch_scale
from .program import device_of
from .strategy import Strategy, current_strategy


@torch.no_grad()
def evaluate_elbo(
    model: Callable,
    guide: Callable,
    data: Dataset,
    elbo: ELBO | None = None,
    batch_size: int = 1000,
    distributed: bool = False,
    data_plate: str | None = None,
) -> float:
    """Mean ELBO per datapoint over a dataset, in nats (analytic KL where available by default).

    Uses the estimator's ``loss`` (TraceEnum_ELBO's differentiable loss refuses to run without grad).
    ``distributed``: every rank of the process group calls this, evaluates its share, and the sums are all-reduced.
    Batches are scaled to the whole dataset as in training (global sites counted once over all batches).
    """
    elbo = elbo or MeanField()
    n = len(data)
    device = device_of(data)
    strategy = current_strategy() if distributed else Strategy()
    model, guide, kwargs = bind_num_data(model, guide, n)
    total, scale = 0.0, None
    for idx in strategy.split(torch.arange(n, device=device)).split(batch_size):
        if len(idx) == 0:  # fewer datapoints than ranks
            continue
        args, batch_kwargs = as_call(data.batch(idx))
        call_kwargs = {**batch_kwargs, **kwargs}
        if scale is None:  # a known plate needs no probe: DataScale leaves a plate Pyro scales alone
            scale = (
                DataScale(n, data_plate) if data_plate else minibatch_scale(model, guide, args, call_kwargs, n)
            ) or nullcontext()
        if isinstance(scale, DataScale):
            scale.batch_size = len(idx)
        with scale:
            total += float(elbo.loss(model, guide, *args, **call_kwargs)) * (len(idx) / n)
    return -strategy.sum(total) / n
