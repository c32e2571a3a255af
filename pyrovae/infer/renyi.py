"""The per-datapoint Rényi bound; α = 0 is the IWAE bound of Burda et al. 2016.

    L_α(x_i) = 1/(1-α) · log (1/K) Σ_k w_ik^(1-α),   w_ik = p(x_i, z_ik) / q(z_ik | x_i)

Unlike ``pyro.infer.RenyiELBO``, the log-weights are formed per datapoint *before* the minibatch
scale N/B is applied (scaling inside the log-sum-exp would change the bound), and the estimator is
differentiable, so it trains with one torch optimiser like the other ELBOs. Every sample site must
sit inside a common plate (the data plate); a site outside it would couple the datapoints.
"""

from __future__ import annotations

import math

import torch
from pyro.infer.elbo import ELBO
from pyro.infer.enum import get_importance_trace
from pyro.infer.util import is_validation_enabled
from pyro.util import check_if_enumerated

from ..errors import PyrovaeError
from .handlers import PARTICLE_PLATE


def _sum_dims(t: torch.Tensor, dims: list[int]) -> torch.Tensor:
    dims = [d for d in dims if -t.dim() <= d]
    return t.sum(dims, keepdim=True) if dims else t


def per_datapoint_log_weights(model_trace, guide_trace) -> tuple[torch.Tensor, float]:
    """log p(x, z) - log q(z|x) per datapoint (and particle), and the plate scale that was divided out.

    The result keeps the dims of the plates common to all sample sites and sums every other plate.
    """
    signed = [
        (sign, site)
        for sign, trace in ((1.0, model_trace), (-1.0, guide_trace))
        for site in trace.nodes.values()
        if site["type"] == "sample"
    ]
    sites = [site for _, site in signed]
    plate_sets = [set(site["cond_indep_stack"]) for site in sites]
    common = set.intersection(*plate_sets)
    data_plates = [f for f in common if f.name != PARTICLE_PLATE and f.vectorized]
    if not data_plates:
        names = ", ".join(site["name"] for site in sites if not site["cond_indep_stack"]) or "some sites"
        raise PyrovaeError(
            f"a per-datapoint bound needs every sample site inside the data plate; {names} are outside it"
        )
    scale = 1.0
    for f in data_plates:
        if f.full_size is not None:
            scale *= f.full_size / f.size
    sum_dims = sorted({f.dim for f in set.union(*plate_sets) - common if f.dim is not None})
    log_w = 0.0
    for sign, site in signed:
        log_w = log_w + sign * _sum_dims(site["log_prob"], sum_dims) / scale
    return log_w, scale


class RenyiBound(ELBO):
    """Per-datapoint Rényi bound (``alpha=0``: IWAE) with K particles, for reparameterised guides."""

    def __init__(
        self,
        alpha: float = 0.0,
        num_particles: int = 2,
        max_plate_nesting: float = float("inf"),
        vectorize_particles: bool = True,
        strict_enumeration_warning: bool = True,
    ) -> None:
        if alpha == 1:
            raise PyrovaeError("alpha = 1 is the ELBO itself: use the 'trace' or 'meanfield' estimator")
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
            strict_enumeration_warning=strict_enumeration_warning,
        )
        self.alpha = float(alpha)

    def _get_trace(self, model, guide, args, kwargs):
        model_trace, guide_trace = get_importance_trace("flat", self.max_plate_nesting, model, guide, args, kwargs)
        if is_validation_enabled():
            check_if_enumerated(guide_trace)
            for site in guide_trace.nodes.values():
                if site["type"] == "sample" and not site["fn"].has_rsample:
                    raise PyrovaeError(f"the Rényi/IWAE bound needs reparameterised guide sites; {site['name']} is not")
        return model_trace, guide_trace

    def per_datapoint(self, model, guide, *args, **kwargs) -> tuple[torch.Tensor, float]:
        """The bound for each datapoint of the batch (unscaled), and the minibatch scale N/B."""
        vectorized = self.vectorize_particles and self.num_particles > 1
        log_ws = []
        scale = 1.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            log_w, scale = per_datapoint_log_weights(model_trace, guide_trace)
            log_ws.append(log_w)
        if vectorized:
            log_w = log_ws[0]
            log_w = log_w.movedim(-self.max_plate_nesting, 0)  # Pyro's particle plate sits at this dim
        else:
            log_w = torch.stack(log_ws)
        a = 1.0 - self.alpha
        bound = (torch.logsumexp(a * log_w, dim=0) - math.log(self.num_particles)) / a
        return bound, scale

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        bound, scale = self.per_datapoint(model, guide, *args, **kwargs)
        return -scale * bound.sum()

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs).item()

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return loss.item()
