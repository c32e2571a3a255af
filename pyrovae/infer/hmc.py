"""HMC on the annealing path of a Pyro program, f_β(z) = q(z|x)^(1-β) p(x, z)^β, for every datapoint x chain at once.

The guide's latent sites move in unconstrained space (Pyro's ``biject_to`` of each site's support, the Jacobian in
the target); one run of the conditioned guide and model gives log q and log p of every (chain, datapoint), and two
backward passes their gradients, so that f_β and its gradient follow for any β without another run. Transitions
use a diagonal mass from the guide's standard deviation where the guide gives one, and a step size per datapoint
adapted at both ends of the path in a short warm-up on discarded chains, then frozen (the transitions stay exact).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.transforms import biject_to
from pyro.poutine.util import prune_subsample_sites

from ..errors import PyrovaeError
from ..models.vae import parameters_collected
from .program import _per_point, _Program, log_p_q
from .renyi import PARTICLE_PLATE

TARGET_ACCEPT = 0.65  # Neal (2011): the optimal HMC acceptance rate is about 0.65
INITIAL_STEP = 0.1  # in units of the guide's standard deviation (preconditioned coordinates)


# ------------------------------------------------------------------------------------------ the target
@dataclass
class _Latents:
    """The program's latent sites: names, transforms to their supports, event dims, and preconditioning scales."""

    names: list[str]
    transforms: dict[str, Callable]
    event_dims: dict[str, int]


def _bijection(name: str, support, guide_support) -> Callable:
    """The map from unconstrained space to the latent's support: the model's, unwrapped where torch has no map for
    a wrapper (a mixture's support is its components'), else the guide's; one line where none exists."""
    for constraint in (support, getattr(support, "base_constraint", None), guide_support):
        if constraint is None:
            continue
        try:
            return biject_to(constraint)
        except NotImplementedError:
            continue
    raise PyrovaeError(
        f"AIS cannot move latent {name!r}: no map from unconstrained space to its support {support}; use --method is"
    )


def _latent_sites(model_tr, guide_tr) -> _Latents:
    """The continuous latents AIS moves: every sample site of the guide; refuse discrete ones and model-only ones."""
    names, transforms, event_dims = [], {}, {}
    for name, site in guide_tr.nodes.items():
        if site["type"] != "sample" or site["is_observed"]:
            continue
        if site["fn"].support.is_discrete:
            raise PyrovaeError(
                f"AIS needs continuous latents, but guide site {name!r} is discrete: "
                "sum it out in the model (enumerate it) or use --method is"
            )
        support = model_tr.nodes[name]["fn"].support if name in model_tr.nodes else site["fn"].support
        names.append(name)
        transforms[name] = _bijection(name, support, site["fn"].support)
        event_dims[name] = site["fn"].event_dim
    for name, site in model_tr.nodes.items():
        if (
            site["type"] == "sample"
            and not site["is_observed"]
            and name not in guide_tr.nodes
            and site["infer"].get("enumerate") != "parallel"
        ):
            raise PyrovaeError(
                f"AIS needs a guide site for every latent, but model site {name!r} has none "
                "(enumerate it if it is discrete, or add it to the guide)"
            )
    return _Latents(names, transforms, event_dims)


def _run(prog: _Program, args: tuple, kwargs: dict, values: dict | None, chains: int | None):
    """Guide and model traces with log-probs: conditioned on ``values`` if given, else the guide draws them."""
    plate = pyro.plate(PARTICLE_PLATE, chains, dim=prog.pdim) if chains is not None else nullcontext()
    guide = poutine.condition(prog.guide, data=values) if values is not None else prog.guide
    with plate, parameters_collected():
        guide_tr = poutine.trace(guide).get_trace(*args, **kwargs)
        if values is None:
            values = {
                n: s["value"] for n, s in guide_tr.nodes.items() if s["type"] == "sample" and not s["is_observed"]
            }
        model = poutine.condition(prog.model, data=values)
        if prog.enum_dim is not None:
            model = poutine.enum(model, first_available_dim=prog.enum_dim)
        model_tr = poutine.trace(model).get_trace(*args, **kwargs)
    model_tr, guide_tr = prune_subsample_sites(model_tr), prune_subsample_sites(guide_tr)
    guide_tr.compute_log_prob()
    model_tr.compute_log_prob()
    return model_tr, guide_tr


@dataclass
class _State:
    """Chains at one point: unconstrained latents, log q + log|J|, log p + log|J| and their gradients."""

    u: dict[str, torch.Tensor]
    lq: torch.Tensor  # (C, B)
    lp: torch.Tensor  # (C, B)
    gq: dict[str, torch.Tensor]
    gp: dict[str, torch.Tensor]

    def log_target(self, beta: float) -> torch.Tensor:
        return (1 - beta) * self.lq + beta * self.lp

    def grad(self, beta: float) -> dict[str, torch.Tensor]:
        return {n: (1 - beta) * self.gq[n] + beta * self.gp[n] for n in self.u}


class _Target:
    """The annealing path of one chunk of datapoints: evaluates log q, log p and their gradients in u-space."""

    def __init__(self, prog: _Program, args: tuple, kwargs: dict, latents: _Latents, chains: int | None, b: int):
        self.prog, self.args, self.kwargs, self.lat = prog, args, kwargs, latents
        self.chains, self.c, self.b = chains, chains or 1, b
        self.evaluations = 0  # gradient evaluations of the (chains x datapoints) program

    def state(self, u: dict[str, torch.Tensor]) -> _State:
        """log q, log p (each + log|J|) and their u-gradients at ``u``: one run of the program, two backward passes."""
        with torch.enable_grad():
            u = {n: v.detach().requires_grad_(True) for n, v in u.items()}
            z, log_j = {}, 0.0
            for n in self.lat.names:
                t = self.lat.transforms[n]
                z[n] = t(u[n])
                j = t.log_abs_det_jacobian(u[n], z[n])
                log_j = log_j + _per_point(j, self.prog.pdim, self.prog.ddim, self.c, self.b)
            model_tr, guide_tr = _run(self.prog, self.args, self.kwargs, z, self.chains)
            log_p, log_q = log_p_q(model_tr, guide_tr, self.prog, self.c, self.b)
            lq, lp = log_q + log_j, log_p + log_j
            inputs = [u[n] for n in self.lat.names]
            gq = torch.autograd.grad(lq.sum(), inputs, retain_graph=True, allow_unused=True)
            gp = torch.autograd.grad(lp.sum(), inputs, allow_unused=True)
        self.evaluations += 1

        def clean(g, v):
            return torch.zeros_like(v) if g is None else g.detach()

        return _State(
            {n: v.detach() for n, v in u.items()},
            lq.detach(),
            lp.detach(),
            {n: clean(g, u[n]) for n, g in zip(self.lat.names, gq)},
            {n: clean(g, u[n]) for n, g in zip(self.lat.names, gp)},
        )

    def per_point_to_site(self, t: torch.Tensor, name: str, like: torch.Tensor) -> torch.Tensor:
        """A (C, B) or (B,) tensor reshaped to broadcast against a site value ``like`` (chain and data dims placed)."""
        batch = like.dim() - self.lat.event_dims[name]
        shape = [1] * like.dim()
        shape[batch + self.prog.ddim] = self.b
        if t.dim() == 2:
            if batch + self.prog.pdim >= 0:
                shape[batch + self.prog.pdim] = t.shape[0]
            elif t.shape[0] != 1:
                raise ValueError("chains without a chain dim")
        return t.reshape(shape)

    def kinetic(self, r: dict[str, torch.Tensor]) -> torch.Tensor:
        """½ |r|² per (chain, datapoint)."""
        out = 0.0
        for n, v in r.items():
            e = self.lat.event_dims[n]
            sq = (v * v).sum(list(range(-e, 0))) if e else v * v
            out = out + _per_point(0.5 * sq, self.prog.pdim, self.prog.ddim, self.c, self.b)
        return torch.as_tensor(out).expand(self.c, self.b)


def _hmc(
    target: _Target,
    s: _State,
    beta: float,
    step: torch.Tensor,
    scale: dict[str, torch.Tensor],
    leapfrog: int,
) -> tuple[_State, torch.Tensor]:
    """One HMC transition leaving f_β invariant: ``leapfrog`` steps of size ``step`` (B,) in coordinates u/scale.

    Returns the new state and the acceptance probability of each (chain, datapoint), NaN proposals rejected.
    """
    eps = {n: target.per_point_to_site(step, n, v) * scale[n] for n, v in s.u.items()}
    r = {n: torch.randn_like(v) for n, v in s.u.items()}
    h0 = -s.log_target(beta) + target.kinetic(r)
    g = s.grad(beta)
    p = {n: r[n] + 0.5 * eps[n] * g[n] for n in r}  # in v = u/scale: grad_v = scale * grad_u, dv = step * p
    new = s
    for i in range(leapfrog):
        u = {n: new.u[n] + eps[n] * p[n] for n in p}
        new = target.state(u)
        g = new.grad(beta)
        half = 0.5 if i == leapfrog - 1 else 1.0
        p = {n: p[n] + half * eps[n] * g[n] for n in p}
    h1 = -new.log_target(beta) + target.kinetic(p)
    log_accept = torch.nan_to_num(h0 - h1, nan=-math.inf).clamp(max=0.0)
    accept_prob = log_accept.exp()
    accept = torch.rand_like(accept_prob) < accept_prob

    def pick(a: torch.Tensor, b: torch.Tensor, name: str | None = None) -> torch.Tensor:
        mask = accept if name is None else target.per_point_to_site(accept, name, a)
        return torch.where(mask, a, b)

    out = _State(
        {n: pick(new.u[n], s.u[n], n) for n in s.u},
        pick(new.lq, s.lq),
        pick(new.lp, s.lp),
        {n: pick(new.gq[n], s.gq[n], n) for n in s.u},
        {n: pick(new.gp[n], s.gp[n], n) for n in s.u},
    )
    return out, accept_prob


# ------------------------------------------------------------------------------------------- step sizes
def _is_real(c) -> bool:
    while hasattr(c, "base_constraint"):
        c = c.base_constraint
    return c is torch.distributions.constraints.real


def _guide_draw(target: _Target) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Unconstrained draws from the guide, and the guide's standard deviation per element where the site is real
    (the diagonal mass of HMC: the posterior's scales differ by orders of magnitude across a VAE's latents)."""
    with torch.no_grad():
        _, guide_tr = _run(target.prog, target.args, target.kwargs, None, target.chains)
    u, scale = {}, {}
    for n in target.lat.names:
        site = guide_tr.nodes[n]
        u[n] = target.lat.transforms[n].inv(site["value"]).detach()
        sd = None
        if _is_real(site["fn"].support):
            try:
                sd = site["fn"].variance.detach().sqrt().expand(u[n].shape)
            except (NotImplementedError, RuntimeError):
                sd = None
        ok = sd is not None and bool(torch.isfinite(sd).all()) and bool((sd > 0).all())
        scale[n] = sd.clamp(min=1e-6).contiguous() if ok else torch.ones_like(u[n])
    return u, scale


def _adapt(
    target: _Target, leapfrog: int, warmup: int, accept_target: float, beta: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-datapoint step sizes (B,) for f_β: ``warmup`` HMC transitions from guide draws, the log step moved by
    2/√t × (acceptance − target) after each, averaged over the second half, then frozen."""
    u, scale = _guide_draw(target)
    log_step = torch.full((target.b,), math.log(INITIAL_STEP), device=next(iter(u.values())).device)
    if warmup < 1:
        return log_step.exp(), scale
    s, kept = target.state(u), []
    for w in range(warmup):
        s, acc = _hmc(target, s, beta, log_step.exp(), scale, leapfrog)
        log_step = log_step + 2.0 / math.sqrt(w + 1) * (acc.mean(0) - accept_target)
        if w >= warmup // 2:
            kept.append(log_step)
    return torch.stack(kept).mean(0).exp(), scale


@dataclass
class Steps:
    """Step sizes along the path, per datapoint: adapted at β = 0 (the guide) and β = 1 (the posterior), and in
    between interpolated as the width of a Gaussian geometric path, ε_β⁻² = (1 − β) ε_0⁻² + β ε_1⁻²."""

    at0: torch.Tensor  # (B,)
    at1: torch.Tensor  # (B,)

    def __call__(self, beta: float) -> torch.Tensor:
        return ((1 - beta) * self.at0.pow(-2) + beta * self.at1.pow(-2)).rsqrt()


def _adapt_path(target: _Target, leapfrog: int, warmup: int, accept_target: float) -> Steps:
    """:class:`Steps` from a warm-up at each end of the path (on chains that are then discarded)."""
    return Steps(
        _adapt(target, leapfrog, warmup, accept_target, 0.0)[0],
        _adapt(target, leapfrog, warmup, accept_target, 1.0)[0],
    )
