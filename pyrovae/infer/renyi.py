"""The per-datapoint Rényi bound; α = 0 is the IWAE bound of Burda et al. 2016.

    L_α(x_i) = 1/(1-α) · log (1/K) Σ_k w_ik^(1-α),   w_ik = p(x_i, z_ik) / q(z_ik | x_i)

Unlike ``pyro.infer.RenyiELBO``, the log-weights are formed per datapoint *before* the minibatch
scale N/B is applied (scaling inside the log-sum-exp would change the bound), and the estimator is
differentiable, so it trains with one torch optimiser like the other ELBOs. Every sample site must
sit inside a common plate (the data plate); a site outside it would couple the datapoints.
"""

from __future__ import annotations

import math

import pyro.poutine as poutine
import torch
from pyro.infer.elbo import ELBO
from pyro.infer.enum import get_importance_trace
from pyro.infer.util import is_validation_enabled
from pyro.util import check_if_enumerated

from ..errors import PyrovaeError
from .handlers import PARTICLE_PLATE, off_rng


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
    if not sites:  # nothing random: the bound is 0, as Pyro's estimators have it
        return torch.zeros(1), 1.0
    for site in guide_trace.nodes.values():
        if site["type"] == "sample" and site["name"] not in model_trace.nodes:
            raise PyrovaeError(
                f"guide site {site['name']!r} has no site in the model (an auxiliary variable): p(x, z) / q(z, "
                f"{site['name']} | x) is no importance weight of p(x); train with 'trace' or 'meanfield'"
            )
    plate_sets = [set(site["cond_indep_stack"]) for site in sites]
    common = set.intersection(*plate_sets)
    data_plates = [f for f in common if f.name != PARTICLE_PLATE and f.vectorized]
    if not data_plates:
        raise PyrovaeError(
            f"a per-datapoint bound needs every sample site inside the data plate: {_outside(sites)} outside the "
            "data plate, so the weights do not split into one per datapoint; train with 'trace' or 'meanfield'"
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


def _outside(sites: list[dict]) -> str:
    """The sites outside the data plate (the plate named ``data``, else the one holding most sites), as words."""
    counts: dict[str, int] = {}
    for site in sites:
        for f in site["cond_indep_stack"]:
            if f.name != PARTICLE_PLATE and f.vectorized:
                counts[f.name] = counts.get(f.name, 0) + 1
    plate = "data" if "data" in counts else max(counts, key=counts.get, default=None)
    names = sorted({site["name"] for site in sites if all(f.name != plate for f in site["cond_indep_stack"])})
    listed = ", ".join(repr(n) for n in names)
    return f"site {listed} is" if len(names) == 1 else f"sites {listed} are"


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
        return model_trace, guide_trace

    def _check(self, model, guide, args, kwargs) -> None:
        """Once, before the first vectorised run: refuse what the bound cannot take (a site outside the data plate,
        a guide site that is not reparameterised or has no model site) in one line, from one plain run of the
        program off the RNG and hidden from other handlers."""
        tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
        with off_rng(tensors[0].device if tensors else "cpu"), poutine.block():
            model_trace, guide_trace = get_importance_trace("flat", math.inf, model, guide, args, kwargs)
        for site in guide_trace.nodes.values():
            if site["type"] == "sample" and site["infer"].get("enumerate"):
                raise PyrovaeError(
                    f"site {site['name']!r} is marked for enumeration, which the Rényi/IWAE bound does not do: "
                    "train with pyro.infer.TraceEnum_ELBO(max_plate_nesting=...)"
                )
            if site["type"] == "sample" and not site["fn"].has_rsample:
                raise PyrovaeError(f"the Rényi/IWAE bound needs reparameterised guide sites; {site['name']!r} is not")
        per_datapoint_log_weights(model_trace, guide_trace)
        self._checked = (model, guide)

    def per_datapoint(self, model, guide, *args, **kwargs) -> tuple[torch.Tensor, float]:
        """The bound for each datapoint of the batch (unscaled), and the minibatch scale N/B."""
        if getattr(self, "_checked", None) != (model, guide):  # once per program this estimator meets
            self._check(model, guide, args, kwargs)
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
