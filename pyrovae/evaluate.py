"""Evaluation you can trust: per-datapoint importance-sampled log p(x), the ELBO and its parts, and PSIS k̂.

    log p̂(x_i) = log (1/K) Σ_k w_ik,   w_ik = p(x_i, z_ik) / q(z_ik | x_i),   z_ik ~ q(z | x_i)

Each datapoint gets its own estimate (unlike ``pyro.infer.Importance``, which weights a whole batch
jointly), for any model/guide pair whose sample sites all sit in the data plate. The K particles run
vectorised in a particle plate, in chunks over K and over the batch so that memory stays bounded;
chunks combine by a running log-sum-exp. The Pareto k̂ of each datapoint's K weights (Vehtari et
al. 2024; Yao et al. 2018) says whether the estimate can be trusted: < 0.5 good, 0.5-0.7 ok, > 0.7 bad.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
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

from .errors import PyrovaeError
from .infer.renyi import PARTICLE_PLATE, per_datapoint_log_weights
from .inference_data import make_idata, psis_khat
from .models import parameters_collected

KHAT_GOOD, KHAT_BAD = 0.5, 0.7
EQUAL_WEIGHTS = 1e-4  # log-weights spread less than this: the weights are equal, k̂ is 0
MIN_K_FOR_KHAT = 30  # ArviZ needs a tail of at least 5 weights: min(0.2 K, 3 sqrt K) > 4
DEFAULT_MEMORY_MB = 1024.0
CPU_CHUNK_MB = 64.0  # on a CPU larger chunks only cost cache misses: 1024 MB ran 1.5x slower than 64 here
ACTIVE_THRESHOLD = 0.01  # Burda et al. 2016: unit d is active when Var_x E_q[z_d | x] > 0.01


# ------------------------------------------------------------------------------------------ tracing
def _traces(model: Callable, guide: Callable, x: torch.Tensor, k: int | None, dim: int | None):
    """Guide and replayed model traces with log-probs; vectorised over ``k`` particles at ``dim`` if given.
    Nothing is optimised here, so the models skip registering their modules in Pyro's param store."""
    n = len(x)
    plate = pyro.plate(PARTICLE_PLATE, k, dim=dim) if k is not None else nullcontext()
    with plate, parameters_collected():
        guide_tr = poutine.trace(guide).get_trace(x, num_data=n)
        model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(x, num_data=n)
    model_tr, guide_tr = prune_subsample_sites(model_tr), prune_subsample_sites(guide_tr)
    guide_tr.compute_log_prob()
    model_tr.compute_log_prob()
    return model_tr, guide_tr


def _max_plate_nesting(model: Callable, guide: Callable, x: torch.Tensor) -> int:
    """How many plate dims the model and guide use (as Pyro's ELBO guesses it), from one validated run."""
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []), pyro.validation_enabled(True):
        model_tr, guide_tr = _traces(model, guide, x, None, None)
    dims = [
        -f.dim
        for tr in (model_tr, guide_tr)
        for site in tr.nodes.values()
        if site["type"] == "sample"
        for f in site["cond_indep_stack"]
        if f.vectorized and f.dim is not None
    ]
    return max(dims, default=0)


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


def _bytes_per_pair(model: Callable, guide: Callable, x: torch.Tensor, dim: int) -> float:
    """Peak bytes per (particle, datapoint), from one small probe chunk run on the side of the RNG.

    On CUDA the allocator's peak; on a CPU the bytes allocated in all (an upper bound on the peak).
    """
    k0, b0 = 8, min(len(x), 8)
    probe = x[:b0]
    cuda = x.device.type == "cuda"
    with torch.random.fork_rng(devices=[x.device] if cuda else []), torch.no_grad():
        if cuda:
            torch.cuda.synchronize(x.device)
            torch.cuda.reset_peak_memory_stats(x.device)
            base = torch.cuda.memory_allocated(x.device)
            _traces(model, guide, probe, k0, dim)
            used = torch.cuda.max_memory_allocated(x.device) - base
        else:
            with _AllocatedBytes() as counter:
                _traces(model, guide, probe, k0, dim)
            used = counter.total
    return max(float(used), 64.0) / (k0 * b0)


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
    kc = min(k, chunk_size or pairs)
    b = min(n, batch_size or max(1, pairs // kc))
    return kc, b


def _per_point(t: torch.Tensor | float, pdim: int, ddim: int, k: int, b: int) -> torch.Tensor:
    """A site's log-prob (or KL) reduced to (particles, datapoints): every other plate and dim summed."""
    t = torch.as_tensor(t)
    while t.dim() < max(-pdim, -ddim):
        t = t.unsqueeze(0)
    dims = [d for d in range(-t.dim(), 0) if d not in (pdim, ddim)]
    if dims:
        t = t.sum(dims, keepdim=True)
    return t.reshape(t.shape[pdim], t.shape[ddim]).expand(k, b)


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


def _sweep(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    k: int,
    *,
    chunk_size: int | None,
    batch_size: int | None,
    memory_mb: float | None,
    keep_weights: bool,
    parts: bool,
    progress: bool,
) -> Iterator[_Chunk]:
    """Run the importance sampler over ``x`` in chunks, yielding each batch chunk when its K particles are done."""
    if k < 1:
        raise PyrovaeError(f"the number of importance samples K must be at least 1, got {k}")
    for name, v in (("chunk size", chunk_size), ("batch size", batch_size)):
        if v is not None and v < 1:
            raise PyrovaeError(f"the {name} must be at least 1, got {v}")
    if memory_mb is not None and not memory_mb > 0:
        raise PyrovaeError(f"the memory budget must be positive, got {memory_mb} MB")
    n = len(x)
    if n == 0:
        return
    pdim = -_max_plate_nesting(model, guide, x[: min(n, 2)]) - 1
    budget = chunk_budget_mb(memory_mb, x.device)
    kc, b = _plan(k, n, chunk_size, batch_size, budget, lambda: _bytes_per_pair(model, guide, x, pdim))
    bar = tqdm(
        total=n,
        disable=not progress or not sys.stderr.isatty(),
        unit="img",
        dynamic_ncols=True,
        desc=f"log p(x), K={k}",
    )
    with torch.no_grad(), pyro.validation_enabled(False), bar:
        for start in range(0, n, b):
            xb = x[start : start + b]
            nb = len(xb)
            acc = xb.new_full((nb,), -math.inf, dtype=torch.float32)
            sums = {key: xb.new_zeros(nb, dtype=torch.float64) for key in ("elbo", "rec", "kl")}  # K terms each
            z_sum: torch.Tensor | None = None
            kept = []
            for p0 in range(0, k, kc):
                kk = min(kc, k - p0)
                model_tr, guide_tr = _traces(model, guide, xb, kk, pdim)
                log_w, _ = per_datapoint_log_weights(model_tr, guide_tr)
                ddim = _data_dim(model_tr, guide_tr, nb, pdim)
                log_w = _per_point(log_w, pdim, ddim, kk, nb).float()
                acc = torch.logaddexp(acc, torch.logsumexp(log_w, dim=0))
                sums["elbo"] += log_w.sum(0, dtype=torch.float64)
                if keep_weights:
                    kept.append(log_w.T)
                if parts:
                    rec, kl, z = _parts(model_tr, guide_tr, pdim, ddim, kk, nb)
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
            )


def _data_dim(model_tr, guide_tr, b: int, pdim: int) -> int:
    """The dim of the data plate: the plate (other than the particles') common to every sample site."""
    stacks = [
        {f for f in site["cond_indep_stack"] if f.vectorized and f.name != PARTICLE_PLATE}
        for tr in (model_tr, guide_tr)
        for site in tr.nodes.values()
        if site["type"] == "sample"
    ]
    common = set.intersection(*stacks)
    dims = sorted((f.size != b, -f.dim) for f in common)
    return -dims[0][1] if dims else pdim + 1


def _parts(model_tr, guide_tr, pdim: int, ddim: int, k: int, b: int):
    """Per (particle, datapoint): log p(x|z) of the observed sites, the KL of the latent ones, and the guide means.

    The KL of a latent site is analytic (``torch.distributions.kl_divergence``, given the particle's
    upstream draws) where registered, else the single-draw log q - log p.
    """
    rec = torch.zeros(k, b, device=_device(guide_tr, model_tr))
    kl = torch.zeros_like(rec)
    for site in model_tr.nodes.values():
        if site["type"] == "sample" and site["is_observed"]:
            rec = rec + _per_point(site["log_prob"], pdim, ddim, k, b)
    means = []
    for name, site in guide_tr.nodes.items():
        if site["type"] != "sample" or site["is_observed"]:
            continue
        prior = model_tr.nodes.get(name)
        if prior is None:  # a guide-only (auxiliary) site: its log q still counts
            site_kl = site["log_prob"]
        else:
            try:
                site_kl = kl_divergence(site["fn"], prior["fn"])
            except NotImplementedError:
                site_kl = site["log_prob"] - prior["log_prob"]
        kl = kl + _per_point(site_kl, pdim, ddim, k, b)
        try:
            mean = site["fn"].mean.expand(site["value"].shape)
        except NotImplementedError:
            mean = site["value"]
        means.append(_means_per_point(mean, site["fn"].event_dim, pdim, ddim, k, b))
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
    x: torch.Tensor,
    num_samples: int = 5000,
    *,
    chunk_size: int | None = None,
    batch_size: int | None = None,
    memory_mb: float | None = None,
    return_log_weights: bool = False,
    progress: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One importance-sampled estimate of log p(x_i) per datapoint: log-mean-exp of K weights, shape (B,).

    ``chunk_size`` particles and ``batch_size`` datapoints go through the model per call; left out,
    they are the most that keep a call under ``memory_mb`` (default 1024; on a CPU at most 64, faster). With ``return_log_weights``,
    also the (B, K) log-weights. Draws come from Pyro's (torch's) global RNG; runs on ``x``'s device.
    """
    out, weights = [], []
    for c in _sweep(
        model,
        guide,
        x,
        num_samples,
        chunk_size=chunk_size,
        batch_size=batch_size,
        memory_mb=memory_mb,
        keep_weights=return_log_weights,
        parts=False,
        progress=progress,
    ):
        out.append(c.log_p)
        if return_log_weights:
            weights.append(c.log_weights)
    log_p = torch.cat(out) if out else x.new_zeros(0)
    return (log_p, torch.cat(weights)) if return_log_weights else log_p


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
    x: torch.Tensor,
    num_samples: int = 5000,
    *,
    chunk_size: int | None = None,
    batch_size: int | None = None,
    memory_mb: float | None = None,
    progress: bool = False,
) -> PointEvaluation:
    """log p̂, ELBO, its reconstruction and KL parts, k̂ and posterior means of every datapoint, in one pass.

    The ELBO and its parts average the same K particles that log p̂ uses; k̂ is computed one batch
    chunk at a time so that the (B, K) weights are never all held at once.
    """
    cols: dict[str, list] = {"log_p": [], "elbo": [], "rec": [], "kl": [], "z": [], "khat": []}
    need_khat = num_samples >= MIN_K_FOR_KHAT
    for c in _sweep(
        model,
        guide,
        x,
        num_samples,
        chunk_size=chunk_size,
        batch_size=batch_size,
        memory_mb=memory_mb,
        keep_weights=need_khat,
        parts=True,
        progress=progress,
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
SPLITS = ("test", "val")


def evaluate_run(
    run_dir: str | Path,
    k: int = 5000,
    split: str = "test",
    n: int | None = None,
    *,
    batch_size: int | None = None,
    memory_mb: float | None = None,
    device: str = "auto",
    figures: bool = True,
    quiet: bool = False,
    worst: int = 10,
) -> dict[str, Any]:
    """Evaluate a trained run on ``n`` images (default all) of a split; write eval.json, eval.md, eval.nc, figures.

    Returns the summary written to ``RUN_DIR/eval.json`` (nats per image unless stated).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PyrovaeError(f"no run folder {run_dir}")
    if not os.access(run_dir, os.W_OK | os.X_OK):  # found before the evaluation's minutes, not after
        raise PyrovaeError(f"cannot write the results into {run_dir}: permission denied")
    if k < 1:
        raise PyrovaeError(f"--k must be at least 1, got {k}")
    if split not in SPLITS:
        raise PyrovaeError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if n is not None and n < 1:
        raise PyrovaeError(f"--n must be at least 1, got {n}")
    from .files import remove_stale_temp_files
    from .runs import load_run
    from .train import write_json

    remove_stale_temp_files(run_dir)  # of an evaluation or training killed mid-write
    t0 = time.perf_counter()
    cfg, splits, vae = load_run(run_dir, device)
    data = splits.test if split == "test" else splits.val
    count = min(n or len(data), len(data))
    idx = torch.arange(count, device=data.device)
    x = data.batch(idx)
    labels = data.labels[idx].cpu() if data.labels is not None else None
    vae.eval()
    res = evaluate_points(
        vae.model,
        vae.guide,
        x,
        k,
        batch_size=batch_size,
        memory_mb=memory_mb,
        progress=not quiet and sys.stderr.isatty(),
    )
    dims = int(torch.Size(data.shape).numel())
    kind = "binary" if data.pixels.binary else "dequantized" if data.pixels.dequantize else "undefined"
    lp = res.log_likelihood.double()
    order = np.argsort(-np.nan_to_num(res.khat, nan=-np.inf))[: min(worst, count)]
    summary: dict[str, Any] = {
        "run": str(run_dir),
        "split": split,
        "n": count,
        "k": k,
        "elbo": float(res.elbo.double().mean()),
        "log_likelihood": float(lp.mean()),
        "log_likelihood_sem": float(lp.std() / math.sqrt(count)) if count > 1 else None,
        "bits_per_dim": bits_per_dim(lp, dims, kind),
        "bits_per_dim_kind": {
            "binary": "binary pixels: -log p(x) / (D ln 2)",
            "dequantized": "dequantised 8-bit pixels x = (pixel + u)/256: (-log p(x) + D ln 256) / (D ln 2)",
            "undefined": "not defined: continuous pixels without dequantisation have no discrete likelihood",
        }[kind],
        "dims": dims,
        "reconstruction": float(res.reconstruction.double().mean()),
        "kl": float(res.kl.double().mean()),
        "gap": float(res.gap.double().mean()),
        "active_units": active_units(res.z_mean),
        "latent_dims": int(res.z_mean.shape[1]) if res.z_mean is not None else 0,
        **khat_summary(res.khat),
        "worst": [
            {
                "index": int(i),
                "khat": float(res.khat[i]) if np.isfinite(res.khat[i]) else None,
                "log_likelihood": float(res.log_likelihood[i]),
                "elbo": float(res.elbo[i]),
                **({"label": int(labels[i])} if labels is not None else {}),
            }
            for i in order
            if not np.isnan(res.khat[i])
        ],
        "units": "nats per image",
    }
    write_netcdf(run_dir / "eval.nc", res, labels, summary)
    if figures:
        from .figures import make_figures

        summary["figures"] = [p.name for p in make_figures(run_dir, vae, x, labels, res.z_mean, res.khat)]
    summary["seconds"] = time.perf_counter() - t0
    write_json(run_dir / "eval.json", summary)
    _write_markdown(run_dir / "eval.md", summary)
    return summary


def write_netcdf(path: Path, res: PointEvaluation, labels: torch.Tensor | None, summary: dict[str, Any]) -> None:
    """Per-point results as an ArviZ object (InferenceData or DataTree; group ``evaluation``, dims point and latent), atomically."""
    import xarray as xr

    from .files import atomic_path

    data_vars = {
        "log_likelihood": ("point", res.log_likelihood.double().numpy()),
        "elbo": ("point", res.elbo.double().numpy()),
        "reconstruction": ("point", res.reconstruction.double().numpy()),
        "kl": ("point", res.kl.double().numpy()),
        "khat": ("point", res.khat.astype(float)),
    }
    if labels is not None:
        data_vars["label"] = ("point", labels.numpy())
    if res.z_mean is not None:
        data_vars["z_mean"] = (("point", "latent"), res.z_mean.double().numpy())
    attrs = {k: v for k, v in summary.items() if isinstance(v, int | float | str) and not isinstance(v, bool)}
    ds = xr.Dataset(data_vars, coords={"point": np.arange(len(res.log_likelihood))}, attrs=attrs)
    idata = make_idata(evaluation=ds)
    with atomic_path(path) as tmp:  # a fresh temporary name: a planted symlink cannot redirect the write
        idata.to_netcdf(str(tmp))


def _fmt(v: Any, spec: str = ".2f") -> str:
    return "n/a" if v is None else format(v, spec)


def _write_markdown(path: Path, s: dict[str, Any]) -> None:
    from .train import atomic_write

    lines = [
        f"# Evaluation of {s['run']}",
        "",
        f"{s['n']} {s['split']} images, K = {s['k']} importance samples per image; nats per image.",
        "",
        "| quantity | value |",
        "| --- | --- |",
        f"| log p(x) (importance sampled) | {_fmt(s['log_likelihood'])} ± {_fmt(s['log_likelihood_sem'])} (s.e.m.) |",
        f"| ELBO | {_fmt(s['elbo'])} |",
        f"| reconstruction E_q log p(x\\|z) | {_fmt(s['reconstruction'])} |",
        f"| KL(q(z\\|x) \\|\\| p(z)) | {_fmt(s['kl'])} |",
        f"| gap log p - ELBO | {_fmt(s['gap'])} |",
        f"| bits/dim | {_fmt(s['bits_per_dim'], '.4f')} ({s['bits_per_dim_kind']}) |",
        f"| active units | {s['active_units']} of {s['latent_dims']} |",
        f"| Pareto k̂ < 0.5 / 0.5-0.7 / > 0.7 | {_fmt(s['khat_good'], '.1%')} / {_fmt(s['khat_ok'], '.1%')} / "
        f"{_fmt(s['khat_bad'], '.1%')} |",
        "",
    ]
    if s["khat_bad"]:
        lines += [
            "Images with k̂ > 0.7 have unreliable log p estimates (Yao et al. 2018): the guide misses "
            "posterior mass there, and log p is probably underestimated.",
            "",
        ]
    if s["worst"]:
        lines += ["Worst k̂: " + ", ".join(f"#{w['index']} ({w['khat']:.2f})" for w in s["worst"]), ""]
    atomic_write(path, lambda f: f.write("\n".join(lines).encode()))


# ------------------------------------------------------------------------------------------------ CLI
def register_cli(sub: argparse._SubParsersAction) -> None:
    """Add ``pyrovae evaluate`` to the CLI's subparsers."""
    from .cli import _positive_float, _positive_int

    e = sub.add_parser(
        "evaluate",
        help="importance-sampled log p(x), ELBO, bits/dim, Pareto k̂ and figures of a trained run",
        description="Evaluate a trained run; writes RUN_DIR/eval.json, eval.md, eval.nc and figures.",
    )
    e.add_argument("run_dir", metavar="RUN_DIR", help="run folder made by 'pyrovae train --out'")
    e.add_argument("--k", type=_positive_int, default=5000, help="importance samples per image (default 5000)")
    e.add_argument("--split", choices=SPLITS, default="test", help="which split (default test)")
    e.add_argument("--n", type=_positive_int, help="evaluate only the first N images of the split")
    e.add_argument("--batch-size", type=_positive_int, help="images per model call (default: from --memory-mb)")
    e.add_argument("--memory-mb", type=_positive_float, help="memory budget per model call (default 1024)")
    e.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    e.add_argument("--no-figures", action="store_true", help="skip the figures")
    e.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    e.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    s = evaluate_run(
        args.run_dir,
        k=args.k,
        split=args.split,
        n=args.n,
        batch_size=args.batch_size,
        memory_mb=args.memory_mb,
        device=args.device,
        figures=not args.no_figures,
        quiet=args.quiet,
    )
    if not args.quiet:
        bpd = f", {s['bits_per_dim']:.4f} bits/dim" if s["bits_per_dim"] is not None else ""
        print(
            f"log p(x) {s['log_likelihood']:.2f} ± {_fmt(s['log_likelihood_sem'])}{bpd}, ELBO {s['elbo']:.2f} "
            f"nats/image over {s['n']} {s['split']} images (K={s['k']}); k̂ > 0.7 for "
            f"{_fmt(s['khat_bad'], '.1%')}; written to {Path(args.run_dir) / 'eval.json'}"
        )
    return 0
