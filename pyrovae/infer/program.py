"""One inspection of a Pyro program, shared by the estimators of log p(x) (IS in ``importance.py``, AIS in ``ais.py``).

A model/guide pair and its arguments are run once to find the data plate, the plate nesting (so that a particle
or chain plate can sit left of every plate of the program), whether the model has enumerated sites to sum out,
and how to run the program on a subset of its datapoints. The per-point reductions of log-probs to (particles,
datapoints) and the importance weight p(x, z) / q(z | x) live here too: every estimator reads a trace the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.util import prune_subsample_sites
from torch.utils._pytree import tree_leaves

from ..errors import PyrovaeError
from ..models.vae import parameters_collected
from .handlers import DATA_PLATE, off_rng, sample_frames
from .renyi import PARTICLE_PLATE


# ------------------------------------------------------------------------------------------ tracing
def _args_device(args: tuple, kwargs: dict) -> torch.device:
    for t in tree_leaves((args, kwargs)):
        if isinstance(t, torch.Tensor):
            return t.device
    return torch.device("cpu")


def _traces(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    k: int | None,
    dim: int | None,
    enum_dim: int | None = None,
):
    """Guide and replayed model traces with log-probs; vectorised over ``k`` particles at ``dim`` if given.

    With ``enum_dim``, the model's enumerated sites are summed over exactly: Pyro's ``enum`` handler puts
    their values in dims from ``enum_dim`` leftwards. Nothing is optimised here, so the built-in models
    skip registering their modules in Pyro's param store.
    """
    plate = pyro.plate(PARTICLE_PLATE, k, dim=dim) if k is not None else nullcontext()
    with plate, parameters_collected():
        guide_tr = poutine.trace(guide).get_trace(*args, **kwargs)
        replayed = poutine.replay(model, trace=guide_tr)
        if enum_dim is not None:
            replayed = poutine.enum(replayed, first_available_dim=enum_dim)
        model_tr = poutine.trace(replayed).get_trace(*args, **kwargs)
    model_tr, guide_tr = prune_subsample_sites(model_tr), prune_subsample_sites(guide_tr)
    guide_tr.compute_log_prob()
    model_tr.compute_log_prob()
    return model_tr, guide_tr


@dataclass
class _Program:
    """A model/guide pair and its arguments, with the plate structure found by one run on those arguments."""

    model: Callable
    guide: Callable
    args: tuple
    kwargs: dict
    n: int  # datapoints: the data plate's size
    pdim: int  # the particle plate's dim, left of every plate of the program
    ddim: int  # the data plate's dim
    plate: str
    enumerated: bool  # the model has enumerated sites to sum out
    device: torch.device

    @property
    def enum_dim(self) -> int | None:
        return self.pdim - 1 if self.enumerated else None

    def traces(self, args: tuple, kwargs: dict, k: int | None):
        return _traces(self.model, self.guide, args, kwargs, k, self.pdim if k is not None else None, self.enum_dim)

    def subset(self, start: int, stop: int) -> tuple[tuple, dict]:
        """The arguments restricted to datapoints ``start:stop``: every tensor whose first dim is the data's."""
        if start == 0 and stop >= self.n:
            return self.args, self.kwargs

        def cut(v):
            return v[start:stop] if isinstance(v, torch.Tensor) and v.dim() > 0 and len(v) == self.n else v

        return tuple(cut(a) for a in self.args), {key: cut(v) for key, v in self.kwargs.items()}


def _draw_instead(site: dict) -> dict:
    """Guide sites marked for enumeration (as TraceEnum_ELBO trains M2's q(y|x)) are drawn from the guide instead."""
    return {"enumerate": None} if site["infer"].get("enumerate") else {}


def _inspect(model: Callable, guide: Callable, args: tuple, kwargs: dict, plate: str | None) -> _Program:
    """Find the data plate and the plate nesting from one validated run on the arguments as given.

    Every sample site must sit in the data plate: a site outside it is shared by all datapoints, and
    log p(x) does not split into one term per datapoint.
    """
    device = _args_device(args, kwargs)
    with off_rng(device), pyro.validation_enabled(True), torch.no_grad():
        model_tr, guide_tr = _traces(model, guide, args, kwargs, None, None)
    sites = sample_frames(model_tr, guide_tr)
    if not sites:
        raise PyrovaeError("the model has no sample sites: there is no log p(x) to estimate")
    for name, site in guide_tr.nodes.items():
        if site["type"] == "sample" and name not in model_tr.nodes:
            raise PyrovaeError(
                f"guide site {name!r} has no site in the model (an auxiliary variable): p(x, z) / q(z, {name} | x) "
                "is no importance weight of p(x), so log p(x) cannot be estimated with this guide"
            )
    stacks = [{f for f in stack if f.vectorized} for _, stack in sites]
    common = set.intersection(*stacks)
    if plate is not None:
        common = {f for f in common if f.name == plate}
    if not common:
        outside = [name for name, stack in sites if not any(f.vectorized for f in stack)]
        where = f"site {outside[0]!r} is outside every plate" if outside else "no plate holds every sample site"
        raise PyrovaeError(
            f"per-datapoint log p(x) is not defined for this program: {where}, so it is shared by all datapoints "
            "and log p(x) does not split into one term per datapoint (put every latent inside the data plate)"
        )
    frame = _data_frame(common, args, kwargs)
    if frame.full_size is not None and frame.full_size >= 0 and frame.full_size != frame.size:
        raise PyrovaeError(
            f"the program subsamples its data plate {frame.name!r} ({frame.size} of {frame.full_size}): log p(x) "
            "needs every datapoint scored, so call it without subsampling (subsample=None, subsample_size=None)"
        )
    nesting = max(-f.dim for stack in stacks for f in stack)
    if any(site["type"] == "sample" and site["infer"].get("enumerate") for site in guide_tr.nodes.values()):
        guide = poutine.infer_config(guide, _draw_instead)  # q(y|x) joins the proposal: y drawn, not summed
    enumerated = any(
        site["type"] == "sample"
        and not site["is_observed"]
        and site["infer"].get("enumerate") == "parallel"
        and name not in guide_tr.nodes
        for name, site in model_tr.nodes.items()
    )
    return _Program(model, guide, args, kwargs, frame.size, -nesting - 1, frame.dim, frame.name, enumerated, device)


def _data_frame(common: set, args: tuple, kwargs: dict):
    """The data plate among the plates common to every site: the one named ``data``, else the one as long as the
    data's first dim, else the outermost."""
    named = [f for f in common if f.name == DATA_PLATE]
    if named:
        return named[0]
    lengths = {len(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() > 0}
    sized = sorted((f for f in common if f.size in lengths), key=lambda f: f.dim)
    return sized[0] if sized else min(common, key=lambda f: f.dim)


def _callable_on_subsets(prog: _Program) -> bool:
    """Whether the program can be run on a few of its datapoints: an amortised guide can, a guide that holds one
    parameter per datapoint cannot. Tried once on the first datapoints (validated, off the RNG); a failure
    only means the sweep runs on all datapoints at once."""
    m = min(prog.n - 1, 8)
    if m < 1:
        return False
    args, kwargs = prog.subset(0, m)
    try:
        with off_rng(prog.device), pyro.validation_enabled(True), torch.no_grad():
            model_tr, guide_tr = prog.traces(args, kwargs, None)
            log_w = _log_weights(model_tr, guide_tr, prog, 1, m)
    except Exception:  # noqa: BLE001 - any failure on a subset means: do not run it on subsets
        return False
    return log_w.shape == (1, m)


def _per_point(t: torch.Tensor | float, pdim: int, ddim: int, k: int, b: int, keep_left: bool = False) -> torch.Tensor:
    """A site's log-prob (or KL) reduced to (particles, datapoints): every other plate and dim summed.

    ``keep_left`` keeps the dims left of the particles' (enumerated values) and returns (..., k or 1, b or 1).
    """
    t = torch.as_tensor(t)
    while t.dim() < max(-pdim, -ddim):
        t = t.unsqueeze(0)
    left = range(-t.dim(), pdim) if keep_left else ()
    dims = [d for d in range(-t.dim(), 0) if d not in (pdim, ddim) and d not in left]
    if dims:
        t = t.sum(dims, keepdim=True)
    if keep_left:
        return t.reshape(*t.shape[: t.dim() + pdim], t.shape[pdim], t.shape[ddim])
    return t.reshape(t.shape[pdim], t.shape[ddim]).expand(k, b)


def _unscale(site: dict, plate: str) -> float:
    """The minibatch scale N/B of the site's data plate, if it was subsampled: divided out per datapoint."""
    for f in site["cond_indep_stack"]:
        if f.name == plate and f.full_size is not None and f.full_size != f.size:
            return f.full_size / f.size
    return 1.0


def log_p_q(model_tr, guide_tr, prog: _Program, k: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(x_i, z_ik) (enumerated model sites summed out exactly) and log q(z_ik | x_i), each (k, b)."""
    log_p = 0.0
    for site in model_tr.nodes.values():
        if site["type"] == "sample":
            lp = _per_point(site["log_prob"], prog.pdim, prog.ddim, k, b, keep_left=True)
            log_p = log_p + lp / _unscale(site, prog.plate)
    log_p = torch.as_tensor(log_p)
    if log_p.dim() > 2:  # the enumerated values: log Σ_y p(x, y, z)
        log_p = torch.logsumexp(log_p.reshape(-1, *log_p.shape[-2:]), dim=0)
    log_q = 0.0
    for site in guide_tr.nodes.values():
        if site["type"] == "sample":
            log_q = log_q + _per_point(site["log_prob"], prog.pdim, prog.ddim, k, b) / _unscale(site, prog.plate)
    return log_p.expand(k, b), torch.as_tensor(log_q).expand(k, b)


def _log_weights(model_tr, guide_tr, prog: _Program, k: int, b: int) -> torch.Tensor:
    """log p(x_i, z_ik) - log q(z_ik | x_i) as a (k, b) tensor; enumerated model sites summed out exactly."""
    log_p, log_q = log_p_q(model_tr, guide_tr, prog, k, b)
    return log_p - log_q
