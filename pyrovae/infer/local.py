"""Variational families with one member per datapoint: what q(z | x_i) can be when each x_i has parameters of its own.

An amortised guide picks a member for each x_i through its encoder (:meth:`LocalFamily.amortised`); the best member
for each x_i on its own is q* of the inference-gap decomposition (Cremer, Li & Duvenaud 2018), which ``pyrovae gap``
fits. The diagonal Gaussian is :class:`GaussianFamily`; a model whose guide is another family (the flow guide)
says so with a ``local_family()`` method, and :func:`family_of` asks it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pyro.distributions as dist
import torch
from torch.distributions import constraints
from torch.distributions.constraints import Constraint


class LocalFamily:
    """A family of q(z | θ_i) over one latent site ``z``; θ_i is a dict of tensors with a leading datapoint dim."""

    elbo: str = "trace"  # how q* is fitted (``meanfield`` where the KL to the prior is analytic)
    constraints: Mapping[str, Constraint] = {}  # parameters that are not real-valued

    def amortised(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The members the amortised guide picks for the rows of ``x``."""
        raise NotImplementedError

    def distribution(self, params: Mapping[str, torch.Tensor]) -> dist.Distribution:
        """q(z | θ_i) for every datapoint: batch shape (N,), event shape (D,)."""
        raise NotImplementedError

    @torch.no_grad()
    def moments(self, params: Mapping[str, torch.Tensor], draws: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of every member, (N, D) each (from ``draws`` draws unless known exactly)."""
        z = self.distribution(params).sample((draws,))
        return z.mean(0), z.std(0)


class GaussianFamily(LocalFamily):
    """q(z | θ_i) = N(loc_i, diag(scale_i)²), picked by an encoder x -> (loc, scale)."""

    elbo = "meanfield"
    constraints = {"scale": constraints.positive}

    def __init__(self, encoder: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.encoder = encoder

    def amortised(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        loc, scale = self.encoder(x)
        return {"loc": loc, "scale": scale}

    def distribution(self, params: Mapping[str, torch.Tensor]) -> dist.Distribution:
        return dist.Normal(params["loc"], params["scale"]).to_event(1)

    def moments(self, params: Mapping[str, torch.Tensor], draws: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return params["loc"], params["scale"]


def family_of(vae: torch.nn.Module) -> LocalFamily:
    """The family of ``vae``'s guide: its ``local_family()`` if it has one, else the diagonal Gaussian of its encoder."""
    make = getattr(vae, "local_family", None)
    return make() if make is not None else GaussianFamily(vae.encoder)
