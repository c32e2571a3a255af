"""Evaluation you can trust: per-datapoint importance-sampled log p(x), the ELBO and its parts, and PSIS k̂.

    log p̂(x_i) = log (1/K) Σ_k w_ik,   w_ik = p(x_i, z_ik) / q(z_ik | x_i),   z_ik ~ q(z | x_i)

Each datapoint gets its own estimate (unlike ``pyro.infer.Importance``, which weights a whole batch
jointly), for any model/guide pair whose sample sites all sit in the data plate. The K particles run
vectorised in a particle plate, in chunks over K and over the batch so that memory stays bounded;
chunks combine by a running log-sum-exp. The Pareto k̂ of each datapoint's K weights (Vehtari et
al. 2024; Yao et al. 2018) says whether the estimate can be trusted: < 0.5 good, 0.5-0.7 ok, > 0.7 bad.

The program's inspection is ``program.py``'s, the chunk planning ``memory.py``'s and k̂ ``diagnostics.py``'s,
shared with AIS (``ais.py``); this module is the importance sweep and its public functions.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyro
import torch
from torch.distributions import kl_divergence
from tqdm.auto import tqdm

from ..errors import PyrovaeError
from .diagnostics import MIN_K_FOR_KHAT, active_units, bits_per_dim, khat_summary, pareto_khat
from .memory import _plan, chunk_budget_mb, probe_layout
from .program import _args_device, _inspect, _log_weights, _per_point, _Program, _unscale

__all__ = [
    "PointEvaluation",
    "active_units",
    "bits_per_dim",
    "evaluate_points",
    "importance_draws",
    "khat_summary",
    "log_likelihood",
    "pareto_khat",
]


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
    layout = probe_layout(prog, k, batch_size, "log p(x) runs one particle per call")
    subsets, vectorised, per_pair = layout.subsets, layout.vectorised, layout.per_pair
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
