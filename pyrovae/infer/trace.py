"""Trace_ELBO and TraceMeanField_ELBO whose loss stays on the device.

Pyro's versions call ``.item()`` on every site's log-probability and on the surrogate loss, and
check the loss for NaN on the host: each is a CUDA synchronisation, several per step. These
subclasses compute the same loss and the same gradients with detached tensors instead; ``fit``
checks for NaN itself, rarely. Everything else (tracing, plates, KL dispatch) is Pyro's.
"""

from __future__ import annotations

import torch
from pyro.distributions.kl import kl_divergence
from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.trace_elbo import _compute_log_r
from pyro.infer.util import check_fully_reparametrized, is_validation_enabled


class _OnDevice:
    """``differentiable_loss`` as Pyro's, without host round trips."""

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        loss, surrogate = 0.0, 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            loss_particle, surrogate_particle = self._differentiable_loss_particle(model_trace, guide_trace)
            loss = loss + loss_particle / self.num_particles
            surrogate = surrogate + surrogate_particle / self.num_particles
        return loss + (surrogate - surrogate.detach())


class Trace(_OnDevice, Trace_ELBO):
    """Trace_ELBO (Monte Carlo KL; score-function terms for non-reparameterised sites), on the device."""

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        elbo, surrogate, log_r = 0.0, 0.0, None
        for site in model_trace.nodes.values():
            if site["type"] == "sample":
                elbo = elbo + site["log_prob_sum"].detach()
                surrogate = surrogate + site["log_prob_sum"]
        for site in guide_trace.nodes.values():
            if site["type"] == "sample":
                _, score_function_term, entropy_term = site["score_parts"]
                elbo = elbo - site["log_prob_sum"].detach()
                if not is_identically_zero(entropy_term):
                    surrogate = surrogate - entropy_term.sum()
                if not is_identically_zero(score_function_term):
                    if log_r is None:
                        log_r = _compute_log_r(model_trace, guide_trace)
                    surrogate = surrogate + (log_r.sum_to(site["cond_indep_stack"]) * score_function_term).sum()
        return -elbo, -surrogate


class MeanField(_OnDevice, TraceMeanField_ELBO):
    """TraceMeanField_ELBO (analytic KL where registered, else Monte Carlo), on the device."""

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        elbo = 0.0
        for name, model_site in model_trace.nodes.items():
            if model_site["type"] != "sample":
                continue
            if model_site["is_observed"]:
                elbo = elbo + model_site["log_prob_sum"]
                continue
            guide_site = guide_trace.nodes[name]
            if is_validation_enabled():
                check_fully_reparametrized(guide_site)
            try:
                kl = kl_divergence(guide_site["fn"], model_site["fn"])
                elbo = elbo - scale_and_mask(kl, scale=guide_site["scale"], mask=guide_site["mask"]).sum()
            except NotImplementedError:
                elbo = elbo + model_site["log_prob_sum"] - guide_site["score_parts"].entropy_term.sum()
        for name, guide_site in guide_trace.nodes.items():  # auxiliary guide sites
            if guide_site["type"] == "sample" and name not in model_trace.nodes:
                if is_validation_enabled():
                    check_fully_reparametrized(guide_site)
                elbo = elbo - guide_site["score_parts"].entropy_term.sum()
        return -elbo.detach(), -elbo
