"""Trace_ELBO and TraceMeanField_ELBO whose loss stays on the device, traced without waste.

Pyro's versions call ``.item()`` on every site's log-probability and on the surrogate loss, and
check the loss for NaN on the host: each is a CUDA synchronisation, several per step. These
subclasses compute the same loss and the same gradients with detached tensors instead; ``fit``
checks for NaN itself, rarely. With validation on (``fit``'s first step) the traces are Pyro's own,
checks included. In the hot loop (validation off) the guide is traced and the model replayed as Pyro
does, but the traces are not copied to prune the plates' subsample sites (the loss skips them) and
only the log-probabilities the estimator uses are computed: under analytic KL, neither log p(z) nor
log q(z) is. Everything else (tracing, plates, replay, KL dispatch) is Pyro's.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Iterator

import pyro.poutine as poutine
import torch
from pyro.distributions.kl import kl_divergence
from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.trace_elbo import _compute_log_r
from pyro.infer.util import check_fully_reparametrized, is_validation_enabled, torch_item
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import prune_subsample_sites, site_is_subsample
from pyro.util import warn_if_nan


def sample_sites(trace: poutine.Trace) -> Iterator[tuple[str, dict]]:
    """The sample sites of a trace, without the plates' subsample sites."""
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not site_is_subsample(site):
            yield name, site


def log_prob_sum(site: dict) -> torch.Tensor:
    """The site's scaled and masked log-probability, summed; computed once and memoised as Pyro does."""
    if "log_prob_sum" not in site:
        log_p = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
        log_p = scale_and_mask(log_p, site["scale"], site["mask"])
        site["log_prob"], site["log_prob_sum"] = log_p, log_p.sum()
    return site["log_prob_sum"]


def score_parts(site: dict):
    """The site's scaled and masked ScoreParts (log_prob, score function, entropy), memoised."""
    if "score_parts" not in site:
        parts = site["fn"].score_parts(site["value"], *site["args"], **site["kwargs"])
        parts = parts.scale_and_mask(site["scale"], site["mask"])
        site["score_parts"], site["log_prob"], site["log_prob_sum"] = parts, parts.log_prob, parts.log_prob.sum()
    return site["score_parts"]


class _OnDevice:
    """``differentiable_loss`` as Pyro's, without host round trips."""

    def _get_trace(self, model, guide, args, kwargs):
        if is_validation_enabled() or isinstance(poutine.unwrap(guide), Messenger):
            return super()._get_trace(model, guide, args, kwargs)  # Pyro's, with its checks
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        if not all(site["fn"].has_rsample for _, site in sample_sites(guide_trace)):
            # score-function terms weigh by log p/q of every site: Pyro's full bookkeeping
            model_trace, guide_trace = prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace)
            model_trace.compute_log_prob()
            guide_trace.compute_score_parts()
        return model_trace, guide_trace

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor | float:
        """The loss with the estimator's gradient; a plain 0.0 for a program without sample sites, as Pyro's."""
        losses, surrogates = [], []
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            loss_particle, surrogate_particle = self._differentiable_loss_particle(model_trace, guide_trace)
            losses.append(loss_particle)
            surrogates.append(surrogate_particle)
        loss, surrogate = _sum(losses), _sum(surrogates)
        if self.num_particles > 1:
            loss, surrogate = loss / self.num_particles, surrogate / self.num_particles
        if not torch.is_tensor(surrogate):
            return loss
        return loss + (surrogate - surrogate.detach())

    def loss(self, model, guide, *args, **kwargs) -> float:
        """The loss as a Python float (Pyro's ELBO contract)."""
        with torch.no_grad():
            loss = torch_item(self.differentiable_loss(model, guide, *args, **kwargs))
        warn_if_nan(loss, "loss")
        return loss

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """Backward of the loss where it has a gradient; the loss as a Python float (Pyro's ELBO contract)."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if torch.is_tensor(loss) and loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        loss = torch_item(loss)
        warn_if_nan(loss, "loss")
        return loss


class Trace(_OnDevice, Trace_ELBO):
    """Trace_ELBO (Monte Carlo KL; score-function terms for non-reparameterised sites), on the device."""

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        elbo, gains, losses, log_r = 0.0, [], [], None  # surrogate ELBO = Σ gains − Σ losses
        for _, site in sample_sites(model_trace):
            log_p = log_prob_sum(site)
            elbo = elbo + log_p.detach()
            gains.append(log_p)
        for _, site in sample_sites(guide_trace):
            _, score_function_term, entropy_term = score_parts(site)
            elbo = elbo - site["log_prob_sum"].detach()
            if not is_identically_zero(entropy_term):
                losses.append(entropy_term.sum())
            if not is_identically_zero(score_function_term):
                if log_r is None:
                    log_r = _compute_log_r(model_trace, guide_trace)
                gains.append((log_r.sum_to(site["cond_indep_stack"]) * score_function_term).sum())
        return -elbo, _sum(losses) - _sum(gains)


class MeanField(_OnDevice, TraceMeanField_ELBO):
    """TraceMeanField_ELBO (analytic KL where registered, else Monte Carlo), on the device."""

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor | float:
        # every term is differentiable: the loss is its own surrogate, no detach and re-attach needed
        traces = self._get_traces(model, guide, args, kwargs)
        loss = _sum([self._differentiable_loss_particle(m, g)[1] for m, g in traces])
        return loss / self.num_particles if self.num_particles > 1 else loss

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        gains, losses = [], []  # ELBO = Σ gains − Σ losses: log p(x|z) terms, KL terms
        for name, model_site in sample_sites(model_trace):
            if model_site["is_observed"]:
                gains.append(log_prob_sum(model_site))
                continue
            guide_site = guide_trace.nodes[name]
            if is_validation_enabled():
                check_fully_reparametrized(guide_site)
            try:
                kl = kl_divergence(guide_site["fn"], model_site["fn"])
                kl = scale_and_mask(kl, scale=guide_site["scale"], mask=guide_site["mask"])
                # a float where Pyro's KL knows the answer without a tensor (masked out: 0.0), per batch element
                losses.append(kl.sum() if torch.is_tensor(kl) else kl * guide_site["fn"].batch_shape.numel())
            except NotImplementedError:
                gains.append(log_prob_sum(model_site))
                losses.append(score_parts(guide_site).entropy_term.sum())
        for name, guide_site in sample_sites(guide_trace):  # auxiliary guide sites
            if name not in model_trace.nodes:
                if is_validation_enabled():
                    check_fully_reparametrized(guide_site)
                losses.append(score_parts(guide_site).entropy_term.sum())
        neg_elbo = _sum(losses) - _sum(gains)  # one node per term, none for a leading 0.0
        return (neg_elbo.detach() if torch.is_tensor(neg_elbo) else neg_elbo), neg_elbo


def _sum(terms: list[torch.Tensor | float]) -> torch.Tensor | float:
    """The terms' sum from the first one on (each ``0.0 + t`` would be one more autograd node); 0.0 for none."""
    return functools.reduce(operator.add, terms) if terms else 0.0
