"""Evaluation you can trust: per-datapoint importance-sampled log p(x), the ELBO and its parts, and PSIS k̂.

    log p̂(x_i) = log (1/K) Σ_k w_ik,   w_ik = p(x_i, z_ik) / q(z_ik | x_i),   z_ik ~ q(z | x_i)

Each datapoint gets its own estimate (unlike ``pyro.infer.Importance``, which weights a whole batch
jointly), for any model/guide pair whose sample sites all sit in the data plate. The K particles run
vectorised in a particle plate, in chunks over K and over the batch so that memory stays bounded;
chunks combine by a running log-sum-exp. The Pareto k̂ of each datapoint's K weights (Vehtari et
al. 2024; Yao et al. 2018) says whether the estimate can be trusted: < 0.5 good, 0.5-0.7 ok, > 0.7 bad.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import kl_divergence
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from tqdm.auto import tqdm

from ..errors import PyrovaeError
from ..models.vae import parameters_collected
from ..reports.inference_data import psis_khat
from .handlers import DATA_PLATE, off_rng, sample_frames
from .renyi import PARTICLE_PLATE

KHAT_GOOD, KHAT_BAD = 0.5, 0.7
EQUAL_WEIGHTS = 1e-4  # log-weights spread less than this: the weights are equal, k̂ is 0
MIN_K_FOR_KHAT = 30  # ArviZ needs a tail of at least 5 weights: min(0.2 K, 3 sqrt K) > 4
DEFAULT_MEMORY_MB = 1024.0
CPU_CHUNK_MB = 64.0  # on a CPU larger chunks only cost cache misses: 1024 MB ran 1.5x slower than 64 here
ACTIVE_THRESHOLD = 0.01  # Burda et al. 2016: unit d is active when Var_x E_q[z_d | x] > 0.01


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


class _AllocatedBytes(TorchDispatchMode):
    """Counts the bytes of every fresh tensor an op returns (views and in-place results excluded).

    The total allocated is an upper bound on the peak of live tensor memory: a CPU has no peak counter.
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.total += t.untyped_storage().nbytes()
        return out


def _probe_particles(prog: _Program, args: tuple, kwargs: dict, b: int, k0: int) -> float | None:
    """Peak bytes per (particle, datapoint) of ``k0`` vectorised particles on ``b`` datapoints, off the RNG; None
    when the program breaks under vectorised particles (a net that flattens the leading dims, say).

    On CUDA the allocator's peak; on a CPU the bytes allocated in all (an upper bound on the peak).
    """
    cuda = prog.device.type == "cuda"
    try:
        with off_rng(prog.device), torch.no_grad():
            if cuda:
                torch.cuda.synchronize(prog.device)
                torch.cuda.reset_peak_memory_stats(prog.device)
                base = torch.cuda.memory_allocated(prog.device)
                log_w = _log_weights(*prog.traces(args, kwargs, k0), prog, k0, b)
                used = torch.cuda.max_memory_allocated(prog.device) - base
            else:
                with _AllocatedBytes() as counter:
                    log_w = _log_weights(*prog.traces(args, kwargs, k0), prog, k0, b)
                used = counter.total
    except Exception:  # noqa: BLE001 - the program's shapes do not survive a particle dim
        return None
    if log_w.shape != (k0, b):
        return None
    return max(float(used), 64.0) / (k0 * b)


def chunk_budget_mb(memory_mb: float | None, device: torch.device) -> float:
    """The memory a sweep's calls plan for: the user's budget (default 1024 MB), a ceiling, and on a CPU at
    most ``CPU_CHUNK_MB``, where larger chunks only run slower."""
    budget = memory_mb or DEFAULT_MEMORY_MB
    return min(budget, CPU_CHUNK_MB) if device.type == "cpu" else budget


def _plan(
    k: int,
    n: int,
    chunk_size: int | None,
    batch_size: int | None,
    memory_mb: float | None,
    bytes_per_pair: Callable,
) -> tuple[int, int]:
    """Particles per call and datapoints per call: the given ones, else the most that fit in ``memory_mb``."""
    if chunk_size is not None and batch_size is not None:
        return min(chunk_size, k), min(batch_size, n)
    pairs = max(1, int((memory_mb or DEFAULT_MEMORY_MB) * 2**20 / bytes_per_pair()))
    kc = min(k, chunk_size or (pairs if batch_size is None else max(1, pairs // batch_size)))
    b = min(n, batch_size or max(1, pairs // kc))
    return kc, b


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


def _log_weights(model_tr, guide_tr, prog: _Program, k: int, b: int) -> torch.Tensor:
    """log p(x_i, z_ik) - log q(z_ik | x_i) as a (k, b) tensor; enumerated model sites summed out exactly."""
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
    return (log_p - log_q).expand(k, b)


@dataclass
class _Chunk:
    """What one batch chunk leaves: per-point sums over its K particles, and optionally the weights."""

    start: int
    stop: int
    log_p: torch.Tensor
    elbo: torch.Tensor
    reconstruction: torch.Tensor
    kl: torch.Tensor
    z_mean: torch.Tensor | None
    log_weights: torch.Tensor | None = None
    draws: dict[str, torch.Tensor] = field(default_factory=dict)  # guide site values, (B, K, *event shape)


def _sweep(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    k: int,
    *,
    chunk_size: int | None,
    batch_size: int | None,
    memory_mb: float | None,
    keep_weights: bool,
    parts: bool,
    progress: bool,
    data_plate: str | None = None,
    keep_sites: tuple[str, ...] = (),
) -> Iterator[_Chunk]:
    """Run the importance sampler in chunks, yielding each batch chunk of datapoints when its K particles are done.

    Chunks over datapoints only when the program can be run on a subset of them; vectorised particles only
    when its shapes allow a particle dim (else one particle per call, with a warning).
    """
    if k < 1:
        raise PyrovaeError(f"the number of importance samples K must be at least 1, got {k}")
    for name, v in (("chunk size", chunk_size), ("batch size", batch_size)):
        if v is not None and v < 1:
            raise PyrovaeError(f"the {name} must be at least 1, got {v}")
    if memory_mb is not None and not memory_mb > 0:
        raise PyrovaeError(f"the memory budget must be positive, got {memory_mb} MB")
    if any(isinstance(t, torch.Tensor) and t.dim() > 0 and len(t) == 0 for t in args):
        return  # no datapoints: nothing to run the program on
    prog = _inspect(model, guide, args, kwargs, data_plate)
    n = prog.n
    if n == 0:
        return
    budget = chunk_budget_mb(memory_mb, prog.device)
    probe_b, subsets = n, False
    if batch_size is None or batch_size < n:
        subsets = _callable_on_subsets(prog)
        probe_b = min(n - 1, 8) if subsets else n
    k0 = min(8 if subsets else 2, k)
    per_pair = _probe_particles(prog, *prog.subset(0, probe_b), probe_b, k0) if k0 > 1 else None
    vectorised = k0 > 1 and per_pair is not None
    if k0 > 1 and not vectorised:
        warnings.warn(
            "the program fails with a particle dim (does a net flatten its input's leading dims?): "
            "log p(x) runs one particle per call, which is slower",
            stacklevel=3,
        )
    if per_pair is None:
        with off_rng(prog.device), torch.no_grad():  # one particle: its bytes per datapoint
            counter = _AllocatedBytes()
            with counter:
                prog.traces(*prog.subset(0, probe_b), None)
        per_pair = max(float(counter.total), 64.0) / probe_b
    kc, b = _plan(k, n, chunk_size if vectorised else 1, batch_size if subsets else n, budget, lambda: per_pair)
    bar = tqdm(
        total=n,
        disable=not progress or not sys.stderr.isatty(),
        unit="img",
        dynamic_ncols=True,
        desc=f"log p(x), K={k}",
    )
    with torch.no_grad(), pyro.validation_enabled(False), bar:
        for start in range(0, n, b):
            args_b, kwargs_b = prog.subset(start, start + b)
            nb = min(b, n - start)
            acc = torch.full((nb,), -math.inf, device=prog.device)
            sums = {key: torch.zeros(nb, dtype=torch.float64, device=prog.device) for key in ("elbo", "rec", "kl")}
            z_sum: torch.Tensor | None = None
            kept = []
            draws: dict[str, list[torch.Tensor]] = {name: [] for name in keep_sites}
            for p0 in range(0, k, kc):
                kk = min(kc, k - p0)
                model_tr, guide_tr = prog.traces(args_b, kwargs_b, kk if vectorised else None)
                log_w = _log_weights(model_tr, guide_tr, prog, kk, nb).float()
                acc = torch.logaddexp(acc, torch.logsumexp(log_w, dim=0))
                sums["elbo"] += log_w.sum(0, dtype=torch.float64)
                if keep_weights:
                    kept.append(log_w.T)
                for name in keep_sites:
                    draws[name].append(_draws_per_point(guide_tr, name, prog, kk, nb))
                if parts:
                    rec, kl, z = _parts(model_tr, guide_tr, prog, kk, nb)
                    sums["rec"] += rec.sum(0, dtype=torch.float64)
                    sums["kl"] += kl.sum(0, dtype=torch.float64)
                    if z is not None:
                        z_sum = z.double() if z_sum is None else z_sum + z
                bar.update(nb * kk / k)
            yield _Chunk(
                start,
                start + nb,
                acc - math.log(k),
                (sums["elbo"] / k).float(),
                (sums["rec"] / k).float(),
                (sums["kl"] / k).float(),
                (z_sum / k).float() if z_sum is not None else None,
                torch.cat(kept, dim=1) if keep_weights else None,
                {name: torch.cat(values, dim=1) for name, values in draws.items()},
            )


def _draws_per_point(guide_tr, name: str, prog: _Program, k: int, b: int) -> torch.Tensor:
    """The guide site's values as (datapoints, particles, *event shape)."""
    if name not in guide_tr.nodes:
        raise PyrovaeError(f"the guide has no sample site {name!r}")
    site = guide_tr.nodes[name]
    v, event_dim = site["value"], site["fn"].event_dim
    batch = v.dim() - event_dim
    while batch < max(-prog.pdim, -prog.ddim):  # the particle dim (and plates) as size-1 dims if absent
        v, batch = v.unsqueeze(0), batch + 1
    v = v.movedim((batch + prog.ddim, batch + prog.pdim), (0, 1))
    return v.reshape(v.shape[0], v.shape[1], *v.shape[batch:]).expand(b, k, *v.shape[batch:])


def _parts(model_tr, guide_tr, prog: _Program, k: int, b: int):
    """Per (particle, datapoint): log p(x|z) of the observed sites, the KL of the latent ones, and the guide means.

    The KL of a latent site is analytic (``torch.distributions.kl_divergence``, given the particle's
    upstream draws) where registered, else the single-draw log q - log p. With enumerated sites the split
    into reconstruction and KL is not defined (the discrete latent is summed out of both): NaN.
    """
    pdim, ddim = prog.pdim, prog.ddim
    rec = torch.zeros(k, b, device=_device(guide_tr, model_tr))
    kl = torch.zeros_like(rec)
    for site in model_tr.nodes.values():
        if site["type"] == "sample" and site["is_observed"] and not prog.enumerated:
            rec = rec + _per_point(site["log_prob"], pdim, ddim, k, b) / _unscale(site, prog.plate)
    means = []
    for name, site in guide_tr.nodes.items():
        if site["type"] != "sample" or site["is_observed"]:
            continue
        prior = model_tr.nodes.get(name)
        if prog.enumerated:
            pass
        elif prior is None:  # a guide-only (auxiliary) site: its log q still counts
            kl = kl + _per_point(site["log_prob"], pdim, ddim, k, b) / _unscale(site, prog.plate)
        else:
            try:
                site_kl = kl_divergence(site["fn"], prior["fn"])
            except NotImplementedError:
                site_kl = (site["log_prob"] - prior["log_prob"]) / _unscale(site, prog.plate)
            kl = kl + _per_point(site_kl, pdim, ddim, k, b)
        try:
            mean = site["fn"].mean.expand(site["value"].shape)
        except NotImplementedError:
            mean = site["value"]
        means.append(_means_per_point(mean, site["fn"].event_dim, pdim, ddim, k, b))
    if prog.enumerated:
        rec, kl = torch.full_like(rec, math.nan), torch.full_like(kl, math.nan)
    z = torch.cat(means, dim=1) if means else None
    return rec, kl, z


def _means_per_point(mean: torch.Tensor, event_dim: int, pdim: int, ddim: int, k: int, b: int) -> torch.Tensor:
    """A latent's guide mean summed over the particles, one flattened row per datapoint: (b, -1)."""
    v = mean.reshape(*mean.shape[: mean.dim() - event_dim], -1)  # event dims flattened into the last
    while v.dim() - 1 < max(-pdim, -ddim):
        v = v.unsqueeze(0)
    pd, dd = v.dim() - 1 + pdim, v.dim() - 1 + ddim
    shape = list(v.shape)
    shape[pd], shape[dd] = k, b
    v = v.expand(shape).sum(pd)
    return v.movedim(dd - 1 if dd > pd else dd, 0).reshape(b, -1)


def _device(*traces) -> torch.device:
    for tr in traces:
        for site in tr.nodes.values():
            if site["type"] == "sample":
                return site["value"].device
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------- public
def log_likelihood(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 5000,
    chunk_size: int | None = None,
    batch_size: int | None = None,
    memory_mb: float | None = None,
    return_log_weights: bool = False,
    progress: bool = False,
    data_plate: str | None = None,
    **kwargs: Any,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One importance-sampled estimate of log p(x_i) per datapoint: log-mean-exp of K weights, shape (N,).

    ``model(*args, **kwargs)`` and ``guide(*args, **kwargs)`` are any Pyro programs whose sample sites all sit
    in the data plate (named ``data``, or ``data_plate``, else the plate common to all sites); N is its size.
    ``chunk_size`` particles and ``batch_size`` datapoints go through the program per call; left out,
    they are the most that keep a call under ``memory_mb`` (default 1024; on a CPU at most 64, faster).
    Datapoints are chunked only if the program runs on a subset of them (a non-amortised guide does not).
    Enumerated model sites are summed out exactly; guide sites marked for enumeration are drawn from the guide.
    With ``return_log_weights``, also the (N, K) log-weights. Draws come from Pyro's (torch's) global RNG.
    """
    out, weights = [], []
    for c in _sweep(
        model,
        guide,
        args,
        kwargs,
        num_samples,
        chunk_size=chunk_size,
        batch_size=batch_size,
        memory_mb=memory_mb,
        keep_weights=return_log_weights,
        parts=False,
        progress=progress,
        data_plate=data_plate,
    ):
        out.append(c.log_p)
        if return_log_weights:
            weights.append(c.log_weights)
    device = _args_device(args, kwargs)
    log_p = torch.cat(out) if out else torch.zeros(0, device=device)
    if return_log_weights and not weights:
        weights.append(torch.zeros(0, num_samples, device=device))
    return (log_p, torch.cat(weights)) if return_log_weights else log_p


def importance_draws(
    model: Callable,
    guide: Callable,
    *args: Any,
    sites: tuple[str, ...],
    num_samples: int = 1000,
    chunk_size: int | None = None,
    batch_size: int | None = None,
    memory_mb: float | None = None,
    data_plate: str | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The (N, K) log-weights of :func:`log_likelihood` and the guide's draws at ``sites``, (N, K, *event shape) each:
    what self-normalised importance resampling of the posterior needs, from the same sweep."""
    weights, draws = [], {name: [] for name in sites}
    for c in _sweep(
        model,
        guide,
        args,
        kwargs,
        num_samples,
        chunk_size=chunk_size,
        batch_size=batch_size,
        memory_mb=memory_mb,
        keep_weights=True,
        parts=False,
        progress=False,
        data_plate=data_plate,
        keep_sites=tuple(sites),
    ):
        weights.append(c.log_weights)
        for name in sites:
            draws[name].append(c.draws[name])
    if not weights:
        raise PyrovaeError("nothing to draw: the data is empty")
    return torch.cat(weights), {name: torch.cat(values) for name, values in draws.items()}


def pareto_khat(log_weights: torch.Tensor | np.ndarray) -> np.ndarray:
    """PSIS k̂ of each row of (B, K) log-weights (ArviZ's PSIS); NaN where K is too small to fit a tail.

    Rows whose weights are all equal to within ``EQUAL_WEIGHTS`` (log-weight range; an exact guide in
    float32) have no tail to fit (ArviZ returns arbitrary values or inf): the estimate's error is below
    that range whatever the tail, and k̂ is reported as 0.
    """
    lw = np.asarray(torch.as_tensor(log_weights).detach().cpu().double())
    if lw.shape[-1] < MIN_K_FOR_KHAT:
        return np.full(lw.shape[:-1], np.nan)
    khat = psis_khat(lw)
    khat[np.ptp(lw, axis=-1) < EQUAL_WEIGHTS] = 0.0
    return khat


@dataclass
class PointEvaluation:
    """Per-datapoint results of :func:`evaluate_points` (all on the CPU)."""

    log_likelihood: torch.Tensor  # log p̂(x_i), nats
    elbo: torch.Tensor  # mean over the K particles of log w_ik
    reconstruction: torch.Tensor  # E_q log p(x_i | z)
    kl: torch.Tensor  # KL(q(z | x_i) || p(z)), analytic where available
    khat: np.ndarray  # PSIS k̂ of the K weights (NaN when K < 30)
    z_mean: torch.Tensor | None  # E_q[z | x_i], flattened latent sites; None without latents
    k: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def gap(self) -> torch.Tensor:
        """log p̂ - ELBO: an estimate of KL(q(z|x) || p(z|x)) (biased low by log p̂'s own bias)."""
        return self.log_likelihood - self.elbo


def evaluate_points(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 5000,
    chunk_size: int | None = None,
    batch_size: int | None = None,
    memory_mb: float | None = None,
    progress: bool = False,
    data_plate: str | None = None,
    **kwargs: Any,
) -> PointEvaluation:
    """log p̂, ELBO, its reconstruction and KL parts, k̂ and posterior means of every datapoint, in one pass.

    Takes the program's arguments as :func:`log_likelihood` does. The ELBO and its parts average the same
    K particles that log p̂ uses; k̂ is computed one batch chunk at a time so that the (N, K) weights are
    never all held at once.
    """
    cols: dict[str, list] = {"log_p": [], "elbo": [], "rec": [], "kl": [], "z": [], "khat": []}
    need_khat = num_samples >= MIN_K_FOR_KHAT
    for c in _sweep(
        model,
        guide,
        args,
        kwargs,
        num_samples,
        chunk_size=chunk_size,
        batch_size=batch_size,
        memory_mb=memory_mb,
        keep_weights=need_khat,
        parts=True,
        progress=progress,
        data_plate=data_plate,
    ):
        cols["log_p"].append(c.log_p.cpu())
        cols["elbo"].append(c.elbo.cpu())
        cols["rec"].append(c.reconstruction.cpu())
        cols["kl"].append(c.kl.cpu())
        if c.z_mean is not None:
            cols["z"].append(c.z_mean.cpu())
        cols["khat"].append(pareto_khat(c.log_weights) if need_khat else np.full(c.stop - c.start, np.nan))
    if not cols["log_p"]:
        raise PyrovaeError("nothing to evaluate: the data is empty")
    return PointEvaluation(
        log_likelihood=torch.cat(cols["log_p"]),
        elbo=torch.cat(cols["elbo"]),
        reconstruction=torch.cat(cols["rec"]),
        kl=torch.cat(cols["kl"]),
        khat=np.concatenate(cols["khat"]),
        z_mean=torch.cat(cols["z"]) if cols["z"] else None,
        k=num_samples,
    )


def bits_per_dim(log_p: torch.Tensor | float, dims: int, kind: str) -> float | None:
    """Mean bits per dimension: ``binary`` -log p/(D ln 2); ``dequantized`` (-log p + D ln 256)/(D ln 2).

    For dequantised 8-bit data x = (pixel + u)/256 the density on [0, 1]^D is 256^D times the density
    on the pixel scale; for continuous data without dequantisation bits/dim is not defined (None).
    """
    lp = float(torch.as_tensor(log_p).double().mean())
    if kind == "binary":
        return -lp / (dims * math.log(2))
    if kind == "dequantized":
        return (-lp + dims * math.log(256)) / (dims * math.log(2))
    return None


def active_units(z_mean: torch.Tensor | None, threshold: float = ACTIVE_THRESHOLD) -> int:
    """Latent dims whose posterior mean varies across datapoints: Var_x E_q[z_d | x] > ``threshold``."""
    if z_mean is None or len(z_mean) < 2:
        return 0
    return int((z_mean.double().var(dim=0) > threshold).sum())


def khat_summary(khat: np.ndarray) -> dict[str, float]:
    """Fractions of datapoints with k̂ < 0.5 (good), 0.5-0.7 (ok) and > 0.7 (bad), of those with a k̂."""
    finite = khat[~np.isnan(khat)]
    if finite.size == 0:
        return {"khat_good": None, "khat_ok": None, "khat_bad": None}
    return {
        "khat_good": float(np.mean(finite < KHAT_GOOD)),
        "khat_ok": float(np.mean((finite >= KHAT_GOOD) & (finite <= KHAT_BAD))),
        "khat_bad": float(np.mean(finite > KHAT_BAD)),
    }


# ---------------------------------------------------------------------------------------- run folder
