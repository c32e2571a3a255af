"""Variational families with one member per datapoint: what q(z | x_i) can be when each x_i has parameters of its own.

An amortised guide picks a member for each x_i through its encoder (:meth:`LocalFamily.amortised`); the best member
for each x_i on its own is q* of the inference-gap decomposition (Cremer, Li & Duvenaud 2018), which ``pyrovae gap``
fits. The diagonal Gaussian is :class:`GaussianFamily`; a model whose guide is another family (the flow guide)
says so with a ``local_family()`` method, and :func:`family_of` asks it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import Transform, constraints
from torch.distributions.constraints import Constraint


class LocalFamily:
    """A family of q(z | θ_i) over one latent site ``z``; θ_i is a dict of tensors with a leading datapoint dim."""

    elbo: str = "trace"  # how q* is fitted (``meanfield`` where the KL to the prior is analytic)
    steps: int = 500  # full-batch SVI steps that fit q* (measured to converge for the family; see bench/RESULTS.md)
    constraints: Mapping[str, Constraint] = MappingProxyType({})  # parameters that are not real-valued

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
    constraints = MappingProxyType({"scale": constraints.positive})

    def __init__(self, encoder: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.encoder = encoder

    def amortised(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        loc, scale = self.encoder(x)
        return {"loc": loc, "scale": scale}

    def distribution(self, params: Mapping[str, torch.Tensor]) -> dist.Distribution:
        return dist.Normal(params["loc"], params["scale"]).to_event(1)

    def moments(self, params: Mapping[str, torch.Tensor], draws: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return params["loc"], params["scale"]


class ConditionalFlows(nn.Module):
    """Pyro's conditional transform modules (``.condition(h)``), applied in turn, as one module for
    ``torch.func.functional_call``: (u, h) -> (z, log |det ∂z/∂u|)."""

    def __init__(self, flows: nn.ModuleList) -> None:
        super().__init__()
        self.flows = flows

    def forward(self, u: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_det = u.new_zeros(u.shape[:-1])
        for flow in self.flows:
            t = flow.condition(h)
            z = t(u)
            log_det = log_det + t.log_abs_det_jacobian(u, z)
            u = z
        return u, log_det


class PerDatapointFlows(Transform):
    """The flows with their own weights and context for each datapoint: ``weights[name]`` and ``context`` have a
    leading datapoint dim N, inputs are (..., N, D). Runs the flows' own code once per datapoint under
    ``torch.func.vmap``; the log-determinant of a draw comes from the cache (there is no inverse)."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, flows: ConditionalFlows, weights: Mapping[str, torch.Tensor], context: torch.Tensor) -> None:
        super().__init__(cache_size=1)
        self.flows, self.weights, self.context = flows, dict(weights), context
        self._log_det: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)

    def _call(self, u: torch.Tensor) -> torch.Tensor:
        n, d = u.shape[-2:]
        flat = u.reshape(-1, n, d)  # (M draws, N datapoints, D)

        def one(w: dict[str, torch.Tensor], v: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.func.functional_call(self.flows, w, (v, h))

        z, log_det = torch.func.vmap(one, in_dims=(0, 1, 0), out_dims=(1, 1))(self.weights, flat, self.context)
        self._log_det = (u, log_det.reshape(u.shape[:-1]))
        return z.reshape(u.shape)

    def log_abs_det_jacobian(self, u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        cached_u, log_det = self._log_det
        if u is not cached_u:
            raise NotImplementedError("a per-datapoint flow scores only its own draws (it has no inverse)")
        return log_det


def family_of(vae: torch.nn.Module) -> LocalFamily:
    """The family of ``vae``'s guide: its ``local_family()`` if it has one, else the diagonal Gaussian of its encoder."""
    make = getattr(vae, "local_family", None)
    return make() if make is not None else GaussianFamily(vae.encoder)
