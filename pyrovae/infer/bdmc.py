"""Bidirectional Monte Carlo (Grosse, Ghahramani & Adams 2015; Wu et al. 2017): log p(x) sandwiched on simulated data.

On data drawn from the model itself, (z, x) ~ p(z) p(x|z), the true z is an exact draw from p(z|x). Forward AIS
from the guide gives a stochastic lower bound of log p(x); AIS run backwards from that z to the guide gives a
stochastic upper bound. Their gap bounds the error of forward AIS at that schedule on data like the model's own:
the evidence that the schedule is long enough for this model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyro.poutine as poutine
import torch
from pyro.poutine.util import prune_subsample_sites

from ..models.vae import parameters_collected
from .ais import (
    DEFAULT_CHAINS,
    DEFAULT_LEAPFROG,
    DEFAULT_STEPS,
    DEFAULT_WARMUP,
    TARGET_ACCEPT,
    AnnealedEstimate,
    _run_ais,
)


@dataclass
class Sandwich:
    """Forward (lower) and reverse (upper) AIS estimates of each simulated datapoint's log p(x)."""

    lower: AnnealedEstimate
    upper: AnnealedEstimate

    @property
    def gap(self) -> torch.Tensor:
        """Upper minus lower bound per datapoint, nats: how far forward AIS may be below log p(x) at most."""
        return self.upper.log_likelihood - self.lower.log_likelihood


def simulate(model: Callable, *args, **kwargs) -> dict[str, torch.Tensor]:
    """One joint draw of every sample site of ``model(*args, **kwargs)``, observed sites included (unconditioned):
    the latents z ~ p(z) and the data x ~ p(x|z), each shaped as in a run on ``args``. Torch's global RNG."""
    with torch.no_grad(), parameters_collected():
        tr = poutine.trace(poutine.uncondition(model)).get_trace(*args, **kwargs)
    tr = prune_subsample_sites(tr)
    return {name: site["value"] for name, site in tr.nodes.items() if site["type"] == "sample"}


def bdmc(
    model: Callable,
    guide: Callable,
    *args,
    latents: dict[str, torch.Tensor],
    num_steps: int = DEFAULT_STEPS,
    num_chains: int = DEFAULT_CHAINS,
    num_leapfrog: int = DEFAULT_LEAPFROG,
    warmup: int = DEFAULT_WARMUP,
    schedule: str = "sigmoid",
    target_accept: float = TARGET_ACCEPT,
    chain_size: int | None = None,
    batch_size: int | None = None,
    memory_mb: float | None = None,
    data_plate: str | None = None,
    **kwargs,
) -> Sandwich:
    """The BDMC sandwich of log p(x_i) for data simulated from the model, with ``latents`` the z that generated it
    (shaped as in a run of the model on ``args``, as :func:`simulate` returns them). The options are those of
    :func:`pyrovae.infer.ais.annealed_log_likelihood`; both directions use the same adapted step sizes."""
    lower, upper = _run_ais(
        model,
        guide,
        args,
        kwargs,
        steps=num_steps,
        chains=num_chains,
        leapfrog=num_leapfrog,
        warmup=warmup,
        kind=schedule,
        target_accept=target_accept,
        chain_size=chain_size,
        batch_size=batch_size,
        memory_mb=memory_mb,
        data_plate=data_plate,
        latents=latents,
    )
    return Sandwich(lower, upper)
