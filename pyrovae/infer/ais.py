"""Annealed importance sampling (Neal 2001) of per-datapoint log p(x), from the guide q(z|x) to p(x, z).

    f_β(z) = q(z|x)^(1-β) p(x, z)^β,   β_0 = 0 < β_1 < ... < β_T = 1,
    log w = Σ_t (β_t - β_(t-1)) [log p(x, z_(t-1)) - log q(z_(t-1)|x)],   z_0 ~ q(z|x),  z_t ~ HMC_t(z_(t-1))

exp(log w) is unbiased for p(x); log-mean-exp over chains is a stochastic lower bound of log p(x). The latents
move in unconstrained space (Pyro's ``biject_to`` of each site's support, the Jacobian in the target), by HMC
with a per-datapoint step size adapted in a short warm-up and then frozen, and a diagonal mass from the guide's
variance where the guide gives one (:mod:`pyrovae.infer.hmc`). Datapoints × chains run in one vectorised call of the program (the chains
in the particle plate that the importance sweep uses), chunked under the same memory budget. Started at an
exact posterior draw and run from β = 1 to 0, the same chain gives a stochastic upper bound (Grosse et al. 2015;
Wu et al. 2017): see :mod:`pyrovae.infer.bdmc`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import torch

from ..errors import PyrovaeError
from .handlers import off_rng
from .hmc import TARGET_ACCEPT, Steps, _adapt_path, _guide_draw, _hmc, _latent_sites, _Latents, _run, _Target
from .memory import _plan, chunk_budget_mb, probe_layout
from .program import _inspect, _Program

SIGMOID_DELTA = 4.0  # Wu et al. (2017) and Grosse et al. (2015): the sigmoid schedule's steepness
DEFAULT_STEPS, DEFAULT_CHAINS, DEFAULT_LEAPFROG, DEFAULT_WARMUP = 100, 8, 5, 10
GRAD_MEMORY_FACTOR = 3.0  # a forward kept for the backward, and the backward itself: about 3x the forward's bytes


# --------------------------------------------------------------------------------------------- schedule
def beta_schedule(steps: int, kind: str = "sigmoid") -> torch.Tensor:
    """β_0 = 0 < ... < β_T = 1 in float64: ``sigmoid`` (more steps near 0 and 1) or ``linear``."""
    if steps < 1:
        raise PyrovaeError(f"the number of annealing steps must be at least 1, got {steps}")
    t = torch.linspace(-SIGMOID_DELTA, SIGMOID_DELTA, steps + 1, dtype=torch.float64)
    if kind == "sigmoid":
        s = torch.sigmoid(t)
        return (s - s[0]) / (s[-1] - s[0])
    if kind == "linear":
        return torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    raise PyrovaeError(f"unknown annealing schedule {kind!r}; choose sigmoid or linear")


def _anneal(
    target: _Target,
    betas: torch.Tensor,
    steps: Steps,
    leapfrog: int,
    start: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One AIS run of every chain: forward from guide draws, or with ``start`` (u-space, exact posterior draws)
    backward from β = 1 to 0. Returns the log-weights (C, B) and the mean acceptance (B,)."""
    u, scale = _guide_draw(target)
    if start is not None:
        u = {n: start[n].expand_as(u[n]).clone() for n in u}
        betas = betas.flip(0)
    s = target.state(u)
    log_w = torch.zeros(target.c, target.b, dtype=torch.float64, device=s.lp.device)
    acc_sum = torch.zeros(target.b, device=s.lp.device)
    for t in range(1, len(betas)):
        log_w += float(betas[t] - betas[t - 1]) * (s.lp - s.lq).double()
        if t < len(betas) - 1:  # the last transition would not change the weights
            beta = float(betas[t])
            s, acc = _hmc(target, s, beta, steps(beta), scale, leapfrog)
            acc_sum += acc.mean(0)
    return log_w, acc_sum / max(len(betas) - 2, 1)


# ------------------------------------------------------------------------------------------- public
@dataclass
class AnnealedEstimate:
    """Per-datapoint AIS results (on the CPU): the estimate, its Monte Carlo standard error, the HMC acceptance
    rate, the effective sample size of the chains' final weights, and the step size each datapoint used."""

    log_likelihood: torch.Tensor  # (N,) log-mean-exp over chains of the AIS weights (reverse: minus that of 1/w)
    stderr: torch.Tensor  # (N,) delta-method sd(w) / (mean(w) √C)
    acceptance: torch.Tensor  # (N,)
    ess: torch.Tensor  # (N,) (Σ w)² / Σ w², between 1 and C
    step_size: torch.Tensor  # (N,) at β = 1, in units of the guide's standard deviation
    log_weights: torch.Tensor  # (N, C)
    steps: int
    chains: int
    leapfrog: int
    evaluations: float  # gradient evaluations of the program per (datapoint, chain), warm-up included


def _summarise(log_w: torch.Tensor, sign: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Estimate, standard error and ESS from (N, C) log-weights; ``sign`` -1 for a reverse chain's 1/w."""
    c = log_w.shape[1]
    lme = torch.logsumexp(log_w, dim=1) - math.log(c)
    w = (log_w - log_w.amax(1, keepdim=True)).exp()
    se = w.std(1) / (w.mean(1) * math.sqrt(c)) if c > 1 else torch.full_like(lme, math.nan)
    ess = w.sum(1) ** 2 / (w * w).sum(1)
    return sign * lme, se, ess


def _check(steps: int, chains: int, leapfrog: int, warmup: int, accept: float, memory_mb: float | None) -> None:
    for name, v, low in (("annealing steps", steps, 1), ("chains", chains, 1), ("leapfrog steps", leapfrog, 1)):
        if v < low:
            raise PyrovaeError(f"the number of {name} must be at least {low}, got {v}")
    if warmup < 0:
        raise PyrovaeError(f"the number of warm-up transitions must be at least 0, got {warmup}")
    if not 0 < accept < 1:
        raise PyrovaeError(f"the target acceptance rate must be in (0, 1), got {accept}")
    if memory_mb is not None and not memory_mb > 0:
        raise PyrovaeError(f"the memory budget must be positive, got {memory_mb} MB")


def _cut(v: torch.Tensor, event_dim: int, ddim: int, start: int, stop: int) -> torch.Tensor:
    d = v.dim() - event_dim + ddim
    return v.narrow(d, start, stop - start)


def _annealable(
    model: Callable, guide: Callable, args: tuple, kwargs: dict, data_plate: str | None
) -> tuple[_Program, _Latents]:
    """The program's inspection and its latents, or a one-line refusal of what AIS cannot run (one run, off the RNG)."""
    if any(isinstance(t, torch.Tensor) and t.dim() > 0 and len(t) == 0 for t in args):
        raise PyrovaeError("nothing to evaluate: the data is empty")
    prog = _inspect(model, guide, args, kwargs, data_plate)
    with off_rng(prog.device), torch.no_grad():
        model_tr, guide_tr = _run(prog, prog.args, prog.kwargs, None, None)
    lat = _latent_sites(model_tr, guide_tr)
    if not lat.names:
        raise PyrovaeError("the guide has no latent sites: log p(x) is exact without AIS (use --method is)")
    return prog, lat


def check_annealable(model: Callable, guide: Callable, *args, data_plate: str | None = None, **kwargs) -> None:
    """Raise the one-line :class:`PyrovaeError` that :func:`annealed_log_likelihood` would raise on this program,
    before any work: a global latent, a discrete guide site, a model latent without a guide site, no latents."""
    _annealable(model, guide, args, kwargs, data_plate)


def _run_ais(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    *,
    steps: int,
    chains: int,
    leapfrog: int,
    warmup: int,
    kind: str,
    target_accept: float,
    chain_size: int | None,
    batch_size: int | None,
    memory_mb: float | None,
    data_plate: str | None,
    latents: dict[str, torch.Tensor] | None,
) -> tuple[AnnealedEstimate, AnnealedEstimate | None]:
    """Forward AIS on every datapoint, and with ``latents`` (exact posterior draws) the reverse chains too."""
    _check(steps, chains, leapfrog, warmup, target_accept, memory_mb)
    betas = beta_schedule(steps, kind)
    prog, lat = _annealable(model, guide, args, kwargs, data_plate)
    if latents is not None:
        missing = [n for n in lat.names if n not in latents]
        if missing:
            raise PyrovaeError(f"the reverse chains need the true value of every latent; missing {', '.join(missing)}")
    n = prog.n
    layout = probe_layout(prog, chains, batch_size, "AIS runs one chain per call")
    vectorised = layout.vectorised or chains == 1
    budget = chunk_budget_mb(memory_mb, prog.device)
    per_pair = layout.per_pair * GRAD_MEMORY_FACTOR
    cc, b = _plan(
        chains, n, chain_size if vectorised else 1, batch_size if layout.subsets else n, budget, lambda: per_pair
    )
    fwd: dict[str, list] = {"w": [], "acc": [], "step": []}
    rev: dict[str, list] = {"w": [], "acc": []}
    evaluations = 0.0
    with pyro.validation_enabled(False):
        for start in range(0, n, b):
            nb = min(b, n - start)
            args_b, kwargs_b = prog.subset(start, start + nb)
            t0 = _Target(prog, args_b, kwargs_b, lat, cc if vectorised else None, nb)
            steps_b = _adapt_path(t0, leapfrog, warmup, target_accept)
            evaluations += t0.evaluations * cc * nb
            fwd["step"].append(steps_b.at1.cpu())
            for out, reverse in ((fwd, False), (rev, True)):
                if reverse and latents is None:
                    continue
                true_u = None
                if reverse:
                    true_u = {
                        m: lat.transforms[m].inv(_cut(latents[m], lat.event_dims[m], prog.ddim, start, start + nb))
                        for m in lat.names
                    }
                ws, acc = [], 0.0
                for c0 in range(0, chains, cc):
                    target = _Target(prog, args_b, kwargs_b, lat, min(cc, chains - c0) if vectorised else None, nb)
                    w, a = _anneal(target, betas, steps_b, leapfrog, true_u)
                    ws.append(w)
                    acc = acc + a * target.c / chains
                    evaluations += target.evaluations * target.c * nb
                out["w"].append(torch.cat(ws).T.cpu())
                out["acc"].append(acc.cpu())

    def result(d: dict, sign: float, step_size: list) -> AnnealedEstimate:
        log_w = torch.cat(d["w"])
        est, se, ess = _summarise(log_w, sign)
        return AnnealedEstimate(
            est.float(),
            se.float(),
            torch.cat(d["acc"]),
            ess.float(),
            torch.cat(step_size),
            log_w.float(),
            steps,
            chains,
            leapfrog,
            evaluations / (n * chains),
        )

    forward = result(fwd, 1.0, fwd["step"])
    return forward, (result(rev, -1.0, fwd["step"]) if latents is not None else None)


def annealed_log_likelihood(
    model: Callable,
    guide: Callable,
    *args,
    num_steps: int = DEFAULT_STEPS,
    num_chains: int = DEFAULT_CHAINS,
    num_leapfrog: int = DEFAULT_LEAPFROG,
    warmup: int = DEFAULT_WARMUP,
    schedule: str = "sigmoid",
    target_accept: float = TARGET_ACCEPT,
    chain_size: int | None = None,
    batch_size: int | None = None,
    memory_mb: float | None = None,
    data_plate: str | None = None,
    **kwargs,
) -> AnnealedEstimate:
    """AIS estimate of log p(x_i) per datapoint, from the guide to the posterior, with its diagnostics.

    Takes the program's arguments as :func:`pyrovae.infer.importance.log_likelihood` does (latents local to the
    data plate, continuous; enumerated model sites summed out). ``num_chains`` independent chains per datapoint,
    ``num_steps`` annealing steps on the ``schedule``, each one HMC transition of ``num_leapfrog`` leapfrog steps
    whose size is adapted per datapoint in ``warmup`` transitions towards ``target_accept``. ``chain_size`` chains
    and ``batch_size`` datapoints per call (default: the most under ``memory_mb``). Draws from torch's global RNG.
    """
    forward, _ = _run_ais(
        model,
        guide,
        args,
        kwargs,
        steps=num_steps,
        chains=num_chains,
        leapfrog=num_leapfrog,
        warmup=warmup,
        kind=schedule,
        target_accept=target_accept,
        chain_size=chain_size,
        batch_size=batch_size,
        memory_mb=memory_mb,
        data_plate=data_plate,
        latents=None,
    )
    return forward
