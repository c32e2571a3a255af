"""The inference gap of a trained VAE (Cremer, Li & Duvenaud 2018), and its true posterior by NUTS.

    log p(x) - L[q]  =  (log p(x) - L[q*])  +  (L[q*] - L[q])
                        approximation gap     amortisation gap

q(z|x) is the amortised guide; q*(z|x) the best member of the guide's family for each datapoint on its own
(:mod:`pyrovae.infer.local`: the diagonal Gaussian, or the model's own family, e.g. the flow guide's with its
weights per datapoint), fitted by SVI (``pyrovae.fit``) with the decoder frozen and one ``pyro.param`` row per
datapoint and parameter, started at the encoder's choice. log p̂(x) is importance sampled
(``pyrovae.infer.importance.log_likelihood``) with q* as proposal, L by the mean of the same K log-weights.
For a few points, NUTS (``pyro.infer.MCMC``) samples p(z|x) itself, checked with ArviZ (R̂, ESS).
"""

from __future__ import annotations

import functools
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions import constraints
from pyro.poutine.util import site_is_subsample
from torch import nn

from ..data import TensorData
from ..errors import PyrovaeError
from ..infer.diagnostics import pareto_khat
from ..infer.importance import log_likelihood
from ..infer.local import LocalFamily, family_of
from ..infer.paramstore import fresh_param_store
from ..models.vae import data_plate, parameters_collected
from ..reports.inference_data import from_draws, group, make_idata, scalar_attrs, summary, write_idata
from ..reports.markdown import fmt, markdown_table
from ..train import FitResult, fit


@contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Parameters of ``module`` with ``requires_grad`` off for the duration (restored after)."""
    before = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in before:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in before:
            p.requires_grad_(flag)


def decoder_model(vae: nn.Module) -> Callable:
    """The VAE's own model with its parameters as fixed values: its modules are not registered
    (:func:`~pyrovae.models.vae.parameters_collected`) and any param site it has is hidden from ``fit``
    (``poutine.block``), so that ``fit`` trains none of them.

    Takes ``(x, *rest, num_data=None)``; ``rest`` (datapoint ids, or a proposal's loc and scale, for the
    guide) is unused.
    """
    fixed = poutine.block(vae.model, hide_types=["param"])

    def model(x: torch.Tensor, *_: torch.Tensor, num_data: int | None = None) -> None:
        with parameters_collected():
            fixed(x, num_data)

    return model


def local_guide(family: LocalFamily, init: Mapping[str, torch.Tensor], name: str = "local") -> Callable:
    """q*(z | x_i) = the family's member θ_i: one ``pyro.param`` row per datapoint and parameter, picked by ``idx``."""

    def guide(x: torch.Tensor, idx: torch.Tensor, num_data: int | None = None) -> None:
        params = {
            key: pyro.param(
                f"{name}.{key}",
                lambda v=v: v.detach().clone().contiguous(),
                constraint=family.constraints.get(key, constraints.real),
            )[idx]
            for key, v in init.items()
        }
        with data_plate(x, num_data):
            pyro.sample("z", family.distribution(params))

    return guide


def fit_local(
    vae: nn.Module,
    x: torch.Tensor,
    steps: int | None = None,
    *,
    lr: float = 0.01,
    particles: int = 10,
    init: Mapping[str, torch.Tensor] | None = None,
    seed: int | None = 0,
    family: LocalFamily | None = None,
) -> tuple[dict[str, torch.Tensor], FitResult]:
    """Fit q*(z|x_i) in ``family`` (default: the VAE's own, :func:`~pyrovae.infer.local.family_of`) for every row of
    ``x`` by SVI with the decoder frozen: ``steps`` full-batch Adam steps (default: the family's; cosine-annealed ``lr``, ``particles``
    vectorised draws, the family's estimator), from ``init`` (default: the encoder's choice). Returns θ* by name."""
    family = family or family_of(vae)
    steps = family.steps if steps is None else steps
    if steps < 1:
        raise PyrovaeError(f"the number of SVI steps must be at least 1, got {steps}")
    with torch.no_grad():
        init = dict(init) if init is not None else family.amortised(x)
    idx = torch.arange(len(x), device=x.device)
    with frozen(vae), fresh_param_store():  # the per-datapoint q* stays out of the caller's param store
        result = fit(
            decoder_model(vae),
            local_guide(family, init),
            TensorData(x, idx),
            elbo=family.elbo,
            particles=particles,
            max_plate_nesting=1,  # the data plate; the particles' plate goes left of it
            epochs=steps,
            batch_size=len(x),
            lr=lr,
            lr_schedule="cosine",
            seed=seed,
            quiet=True,
        )
    return {key: result.params[f"local.{key}"] for key in init}, result


def proposal_guide(family: LocalFamily, keys: list[str]) -> Callable:
    """q(z | x_i) = the family's member whose parameters are given as arguments, in the order of ``keys``:
    ``log_likelihood`` splits them by datapoint like ``x``, so q and q* go through the same sweep."""

    def guide(x: torch.Tensor, *values: torch.Tensor) -> None:
        with pyro.plate("data", len(x)):
            pyro.sample("z", family.distribution(dict(zip(keys, values))))

    return guide


@torch.no_grad()
def score_proposal(
    vae: nn.Module,
    x: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    k: int = 5000,
    memory_mb: float = 1024.0,
    family: LocalFamily | None = None,
) -> dict[str, torch.Tensor]:
    """With the member θ_i of ``family`` (default: the VAE's own) as proposal for x_i: log p̂(x_i) (log-mean-exp of
    K weights), the ELBO (their mean), its Monte Carlo standard error sd(log w)/√K, and the weights' Pareto k̂."""
    family = family or family_of(vae)
    keys = list(params)
    log_p, lw = log_likelihood(
        decoder_model(vae),
        proposal_guide(family, keys),
        x,
        *(params[key] for key in keys),
        num_samples=k,
        memory_mb=memory_mb,
        return_log_weights=True,
    )
    lw = lw.double()
    return {
        "log_p": log_p.cpu(),
        "elbo": lw.mean(1).float().cpu(),
        "elbo_se": (lw.std(1) / math.sqrt(k)).float().cpu() if k > 1 else torch.full((len(x),), math.nan),
        "khat": torch.as_tensor(pareto_khat(lw)),
    }


@dataclass
class GapResult:
    """Per-datapoint results of :func:`inference_gaps` (CPU tensors, nats)."""

    log_p: torch.Tensor  # log p̂(x), q* as proposal
    log_p_q: torch.Tensor  # log p̂(x), q as proposal
    elbo_qstar: torch.Tensor  # L[q*]
    elbo_q: torch.Tensor  # L[q]
    elbo_qstar_se: torch.Tensor  # Monte Carlo standard errors of the two ELBOs
    elbo_q_se: torch.Tensor
    khat_qstar: torch.Tensor
    khat_q: torch.Tensor
    q_loc: torch.Tensor  # mean and sd of q and of q* (their loc and scale where they are Gaussian)
    q_scale: torch.Tensor
    qstar_loc: torch.Tensor
    qstar_scale: torch.Tensor
    k: int
    fit: FitResult
    family: str = "GaussianFamily"  # the guide family q* was fitted in
    steps: int = 0  # the SVI steps that fitted it

    @property
    def approximation_gap(self) -> torch.Tensor:
        """log p̂ - L[q*] ≈ KL(q* || p(z|x)); biased low by log p̂'s own (downward) bias."""
        return self.log_p - self.elbo_qstar

    @property
    def amortization_gap(self) -> torch.Tensor:
        """L[q*] - L[q]: what the encoder loses against the best member of its family for each datapoint."""
        return self.elbo_qstar - self.elbo_q


def _check_one_latent(vae: nn.Module, x: torch.Tensor) -> None:
    """The split fits q* of one latent site ``z`` from the images alone: refuse, in one line, a model whose guide
    samples other latents (two layers, discrete codes, none) or needs more than the images (labels)."""
    with fresh_param_store(), torch.no_grad():
        try:
            guide = poutine.trace(vae.guide).get_trace(x[:2])
        except TypeError as e:
            raise PyrovaeError(
                f"the inference gap needs a guide that takes the images alone; this one does not ({e})"
            ) from None
    latent = [name for name, site in guide.nodes.items() if site["type"] == "sample" and not site["is_observed"]
              and not site_is_subsample(site)]  # fmt: skip
    if latent != ["z"]:
        raise PyrovaeError(
            "the inference gap is split for a guide with one latent site 'z'; this model's guide samples "
            + (", ".join(repr(n) for n in latent) or "no latent")
        )


def inference_gaps(
    vae: nn.Module,
    x: torch.Tensor,
    steps: int | None = None,
    k: int = 5000,
    *,
    lr: float = 0.01,
    particles: int = 10,
    seed: int = 0,
    memory_mb: float = 1024.0,
) -> GapResult:
    """Fit q* for every row of ``x`` in the guide's family, then score q and q* with K importance samples each
    (see the module doc)."""
    vae.eval()
    _check_one_latent(vae, x)
    family = family_of(vae)
    with torch.no_grad():
        amortised = family.amortised(x)
    star_params, result = fit_local(vae, x, steps, lr=lr, particles=particles, init=amortised, seed=seed, family=family)
    pyro.set_rng_seed(seed)
    star = score_proposal(vae, x, star_params, k, memory_mb, family)
    q = score_proposal(vae, x, amortised, k, memory_mb, family)
    (q_loc, q_scale), (qs_loc, qs_scale) = family.moments(amortised), family.moments(star_params)
    return GapResult(
        log_p=star["log_p"],
        log_p_q=q["log_p"],
        elbo_qstar=star["elbo"],
        elbo_q=q["elbo"],
        elbo_qstar_se=star["elbo_se"],
        elbo_q_se=q["elbo_se"],
        khat_qstar=star["khat"],
        khat_q=q["khat"],
        q_loc=q_loc.cpu(),
        q_scale=q_scale.cpu(),
        qstar_loc=qs_loc.cpu(),
        qstar_scale=qs_scale.cpu(),
        k=k,
        fit=result,
        family=type(family).__name__,
        steps=result.epochs_done,
    )


# ------------------------------------------------------------------------------------------------ NUTS
def nuts_posterior(
    vae: nn.Module,
    x: torch.Tensor,
    *,
    warmup: int = 300,
    samples: int = 300,
    chains: int = 2,
    init_loc: torch.Tensor | None = None,
    init_scale: torch.Tensor | None = None,
    max_tree_depth: int = 8,
    jit: bool = False,
    seed: int = 0,
    progress: bool = False,
):
    """NUTS draws of p(z | x_i) for every row of ``x`` (one joint run: the points' posteriors are independent),
    decoder fixed; chains run one after another, each from loc + 2·scale·ε (overdispersed around
    ``init_loc``/``init_scale``, default the encoder's q). ``jit`` traces the potential (about 2x faster
    here, but through the deprecated ``torch.jit.trace``). Returns ArviZ InferenceData: posterior z with
    dims (point, latent), and sample_stats with the divergences."""
    from pyro.infer import MCMC, NUTS
    from pyro.infer.autoguide.initialization import init_to_value

    if warmup < 1 or samples < 1 or chains < 1:
        raise PyrovaeError(f"NUTS needs warmup, samples and chains >= 1; got {warmup}, {samples}, {chains}")
    x = x.detach()
    with torch.no_grad():
        loc, scale = vae.encoder(x)
    loc = init_loc if init_loc is not None else loc
    scale = init_scale if init_scale is not None else scale

    model = functools.partial(decoder_model(vae), x)

    draws, diverging = [], np.zeros((chains, samples), dtype=bool)
    logger = logging.getLogger("pyro")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))  # Pyro logs its max_plate_nesting guess at INFO
    try:
        with frozen(vae), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the JIT's deprecation warning
            for c in range(chains):
                pyro.set_rng_seed(seed + c)
                start = (loc + 2 * scale * torch.randn_like(loc)).detach()
                kernel = NUTS(
                    model,
                    max_tree_depth=max_tree_depth,
                    jit_compile=jit,
                    ignore_jit_warnings=True,
                    init_strategy=init_to_value(values={"z": start}),
                )
                mcmc = MCMC(kernel, num_samples=samples, warmup_steps=warmup, disable_progbar=not progress)
                mcmc.run()
                draws.append(mcmc.get_samples()["z"].detach().cpu().numpy())
                for divergences in mcmc.diagnostics()["divergences"].values():  # one chain: one entry
                    diverging[c, divergences] = True
    finally:
        logger.setLevel(level)
    return from_draws(
        {"z": np.stack(draws)},
        {"diverging": diverging},
        coords={"point": np.arange(len(x)), "latent": np.arange(vae.z_dim)},
        dims={"z": ["point", "latent"]},
    )


def posterior_check(
    idata, q: tuple[torch.Tensor, torch.Tensor], qstar: tuple[torch.Tensor, torch.Tensor]
) -> list[dict[str, Any]]:
    """Per point: R̂ and ESS of the NUTS draws (``az.summary``), and how far q and q* are from them:
    RMS over latent dims of (loc - mean)/sd, and the geometric mean of scale/sd."""
    table = summary(idata, var_names=["z"])
    post = group(idata, "posterior")["z"]
    chains = post.sizes["chain"]
    mean = torch.as_tensor(post.mean(("chain", "draw")).values, dtype=torch.float64)
    sd = torch.as_tensor(post.std(("chain", "draw"), ddof=1).values, dtype=torch.float64)
    rows = []
    for i in range(mean.shape[0]):
        sub = table[[name.startswith(f"z[{i},") for name in table.index]]
        row: dict[str, Any] = {
            "point": i,
            "r_hat_max": float(sub["r_hat"].max()) if chains > 1 else None,
            "ess_bulk_min": float(sub["ess_bulk"].min()),
            "ess_tail_min": float(sub["ess_tail"].min()),
            "mcse_mean_over_sd_max": float((sub["mcse_mean"] / sub["sd"]).max()),
        }
        for name, (loc, scale) in (("q", q), ("qstar", qstar)):
            loc, scale = loc[i].double().cpu(), scale[i].double().cpu()
            row[f"{name}_mean_error"] = float(((loc - mean[i]) / sd[i]).pow(2).mean().sqrt())
            row[f"{name}_sd_ratio"] = float((scale / sd[i]).log().mean().exp())
        rows.append(row)
    return rows


def write_posterior(path: Path, idata, res: GapResult, points: int, attrs: dict[str, Any]) -> None:
    """The NUTS draws plus a ``variational`` group (q and q* loc/scale of the same points), as netCDF, atomically."""
    import xarray as xr

    dims = ("point", "latent")
    ds = xr.Dataset(
        {
            "q_loc": (dims, res.q_loc[:points].double().numpy()),
            "q_scale": (dims, res.q_scale[:points].double().numpy()),
            "qstar_loc": (dims, res.qstar_loc[:points].double().numpy()),
            "qstar_scale": (dims, res.qstar_scale[:points].double().numpy()),
        },
        coords={"point": np.arange(points), "latent": np.arange(res.q_loc.shape[1])},
        attrs=scalar_attrs(attrs),
    )
    out = make_idata(posterior=group(idata, "posterior"), sample_stats=group(idata, "sample_stats"), variational=ds)
    write_idata(path, out)


# ------------------------------------------------------------------------------------------ run folder
def _mean_sem(t: torch.Tensor) -> tuple[float, float | None]:
    t = t.double()
    return float(t.mean()), float(t.std() / math.sqrt(len(t))) if len(t) > 1 else None


def gap_run(
    run_dir: str | Path,
    n: int = 100,
    steps: int | None = None,
    k: int = 5000,
    nuts_points: int = 3,
    *,
    warmup: int = 300,
    samples: int = 300,
    chains: int = 2,
    lr: float = 0.01,
    particles: int = 10,
    split: str = "test",
    seed: int = 0,
    memory_mb: float = 1024.0,
    device: str = "auto",
    jit: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Inference gaps of ``n`` images of a trained run and NUTS on the first ``nuts_points`` of them;
    writes gap.json, gap.md and (with NUTS) posterior.nc into the run folder; returns the summary."""
    from ..runs import load_model
    from ..train import atomic_write, write_json

    if n < 1 or k < 1 or (steps is not None and steps < 1) or nuts_points < 0:
        raise PyrovaeError(f"need --n, --k, --steps >= 1 and --nuts-points >= 0; got {n}, {k}, {steps}, {nuts_points}")
    if split not in ("test", "val"):
        raise PyrovaeError(f"unknown split {split!r}; choose test or val")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PyrovaeError(f"no run folder {run_dir}")
    t0 = time.perf_counter()
    splits, vae = load_model(run_dir, device)
    data = splits.test if split == "test" else splits.val
    count = min(n, len(data))
    x = data.batch(torch.arange(count, device=data.device))
    res = inference_gaps(vae, x, steps, k, lr=lr, particles=particles, seed=seed, memory_mb=memory_mb)
    mc = lambda se: float(se.double().pow(2).sum().sqrt() / len(se))  # noqa: E731  MC s.e. of a mean of points
    summary: dict[str, Any] = {"run": str(run_dir), "split": split, "n": count, "k": k, "svi_steps": res.steps, "lr": lr,
                               "family": res.family}  # fmt: skip
    for key, t in (
        ("log_likelihood", res.log_p),
        ("log_likelihood_q", res.log_p_q),
        ("elbo_qstar", res.elbo_qstar),
        ("elbo_q", res.elbo_q),
        ("approximation_gap", res.approximation_gap),
        ("amortization_gap", res.amortization_gap),
    ):
        summary[key], summary[key + "_sem"] = _mean_sem(t)
    summary.update(
        {
            "elbo_qstar_mc_se": mc(res.elbo_qstar_se),
            "elbo_q_mc_se": mc(res.elbo_q_se),
            "qstar_better_fraction": float((res.amortization_gap > 0).double().mean()),
            "khat_qstar_bad": float((res.khat_qstar > 0.7).double().mean()),
            "khat_q_bad": float((res.khat_q > 0.7).double().mean()),
            "points": [
                {
                    "index": i,
                    "log_likelihood": float(res.log_p[i]),
                    "log_likelihood_q": float(res.log_p_q[i]),
                    "elbo_qstar": float(res.elbo_qstar[i]),
                    "elbo_q": float(res.elbo_q[i]),
                    "elbo_qstar_mc_se": float(res.elbo_qstar_se[i]),
                    "elbo_q_mc_se": float(res.elbo_q_se[i]),
                    "approximation_gap": float(res.approximation_gap[i]),
                    "amortization_gap": float(res.amortization_gap[i]),
                    "khat_qstar": float(res.khat_qstar[i]),
                    "khat_q": float(res.khat_q[i]),
                }
                for i in range(count)
            ],
            "units": "nats per image; _sem: over images; _mc_se: Monte Carlo error of the mean over these images",
        }
    )
    if nuts_points > 0:
        p = min(nuts_points, count)
        idata = nuts_posterior(
            vae,
            x[:p],
            warmup=warmup,
            samples=samples,
            chains=chains,
            init_loc=res.qstar_loc[:p].to(x.device),
            init_scale=res.qstar_scale[:p].to(x.device),
            jit=jit,
            seed=seed,
            progress=progress,
        )
        summary["nuts"] = {
            "points": p,
            "warmup": warmup,
            "samples": samples,
            "chains": chains,
            "divergences": int(group(idata, "sample_stats")["diverging"].sum()),
            "per_point": posterior_check(idata, (res.q_loc, res.q_scale), (res.qstar_loc, res.qstar_scale)),
        }
        if chains < 2:
            summary["nuts"]["note"] = "R-hat needs at least 2 chains"
        write_posterior(run_dir / "posterior.nc", idata, res, p, {"run": str(run_dir), "warmup": warmup})
    summary["seconds"] = time.perf_counter() - t0
    write_json(run_dir / "gap.json", summary)
    atomic_write(run_dir / "gap.md", lambda f: f.write(_markdown(summary).encode()))
    return summary


def _markdown(s: dict[str, Any]) -> str:
    pm = lambda key: f"{fmt(s[key])} ± {fmt(s[key + '_sem'])}"  # noqa: E731
    lines = [
        f"# Inference gap of {s['run']}",
        "",
        f"{s['n']} {s['split']} images; q* fitted per image in the guide's family ({s.get('family', 'GaussianFamily')}) "
        f"by {s['svi_steps']} SVI steps (decoder frozen); "
        f"K = {s['k']} importance samples per proposal. Nats per image, ± the standard error over images.",
        "",
        *markdown_table(
            ["quantity", "value"],
            [
                ["log p̂(x), q* as proposal", pm("log_likelihood")],
                ["log p̂(x), q as proposal", pm("log_likelihood_q")],
                ["L[q*] (best member per image)", f"{pm('elbo_qstar')} (MC error {fmt(s['elbo_qstar_mc_se'], '.3f')})"],
                ["L[q] (amortised encoder)", f"{pm('elbo_q')} (MC error {fmt(s['elbo_q_mc_se'], '.3f')})"],
                ["approximation gap log p̂ - L[q*]", pm("approximation_gap")],
                ["amortisation gap L[q*] - L[q]", pm("amortization_gap")],
            ],
        ),
        "",
        f"q* beats q on {s['qstar_better_fraction']:.0%} of the images; Pareto k̂ > 0.7 for "
        f"{s['khat_qstar_bad']:.0%} (q*) and {s['khat_q_bad']:.0%} (q) of them. log p̂ is biased low, so the "
        "approximation gap is too.",
        "",
    ]
    if "nuts" in s:
        nuts = s["nuts"]
        lines += [
            f"## True posterior by NUTS ({nuts['points']} images, {nuts['chains']} chains × {nuts['samples']} draws "
            f"after {nuts['warmup']} warm-up; {nuts['divergences']} divergent transitions)",
            "",
            "Errors of q and q* against the NUTS posterior: RMS over latent dims of (loc - mean)/sd, and the "
            "geometric mean of scale/sd (1 is exact; below 1 is the usual under-dispersion).",
            "",
        ]
        header = ["image", "R̂ max", "ESS bulk min", "q mean error", "q sd ratio", "q* mean error", "q* sd ratio"]
        rows = [
            [r["point"], fmt(r["r_hat_max"], ".3f"), f"{r['ess_bulk_min']:.0f}"]
            + [f"{r[k]:.3f}" for k in ("q_mean_error", "q_sd_ratio", "qstar_mean_error", "qstar_sd_ratio")]
            for r in nuts["per_point"]
        ]
        lines += markdown_table(header, rows)
        lines += ["", nuts.get("note", "R̂ < 1.01 and bulk ESS > 400 are the usual marks of a trustworthy run."), ""]
    return "\n".join(lines)
