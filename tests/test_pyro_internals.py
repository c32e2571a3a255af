"""The three Pyro names pyrovae relies on that are not Pyro's public API: if a Pyro release moves one, these fail
loudly here rather than quietly somewhere deep (setup.cfg bounds pyro-ppl to the minor release tested)."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.infer import Trace_ELBO

from pyrovae.infer.renyi import PARTICLE_PLATE


def _model(x):
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def _guide(x):
    loc = pyro.param("loc", torch.zeros(len(x)))
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Normal(loc, 1.0))


def test_vectorised_particle_plate_keeps_its_name():
    """pyrovae's importance sweep and its ELBOs name the particle plate as Pyro's vectorised ELBOs do."""
    elbo = Trace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1)
    _, guide_trace = elbo._get_vectorized_trace(_model, _guide, (torch.zeros(4),), {})
    frames = {f.name: f.size for f in guide_trace.nodes["z"]["cond_indep_stack"]}
    assert frames.get(PARTICLE_PLATE) == 3, frames


def test_compute_log_r_is_where_trace_elbo_keeps_it():
    """pyrovae.infer.trace builds Trace_ELBO's score-function term with Pyro's own ``_compute_log_r``."""
    from pyro.infer.trace_elbo import _compute_log_r
    from pyro.poutine.util import prune_subsample_sites

    x = torch.zeros(4)
    guide_tr = prune_subsample_sites(poutine.trace(_guide).get_trace(x))
    model_tr = prune_subsample_sites(poutine.trace(poutine.replay(_model, trace=guide_tr)).get_trace(x))
    model_tr.compute_log_prob()
    guide_tr.compute_log_prob()
    log_r = _compute_log_r(model_tr, guide_tr)
    assert log_r.sum_to(guide_tr.nodes["z"]["cond_indep_stack"]).shape == (4,)


def test_module_parameters_are_named_owner_divider_param():
    """Run checkpoints name a module's parameters as Pyro's param store does: ``owner$$$param``."""
    from pyro.params.param_store import module_from_param_with_module_name, user_param_name

    pyro.module("vae.decoder", torch.nn.Linear(2, 3))
    names = set(pyro.get_param_store().keys())
    assert names == {"vae.decoder$$$weight", "vae.decoder$$$bias"}, names
    assert {module_from_param_with_module_name(n) for n in names} == {"vae.decoder"}
    assert {user_param_name(n) for n in names} == {"weight", "bias"}
