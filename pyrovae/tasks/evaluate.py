"""``evaluate_run``: a trained run evaluated on a split by the importance sweep (:mod:`pyrovae.infer.importance`),
and with ``method`` ais or bdmc by annealed importance sampling (:mod:`pyrovae.infer.ais`) on the same images and
the BDMC sandwich on data simulated from the model (:mod:`pyrovae.infer.bdmc`), side by side in eval.json, eval.md,
eval.nc and figures: each number with what checks it (k̂, the AIS standard error and acceptance, the BDMC gap).
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import PyrovaeError
from ..infer.ais import (
    DEFAULT_CHAINS,
    DEFAULT_LEAPFROG,
    DEFAULT_STEPS,
    AnnealedEstimate,
    annealed_log_likelihood,
    check_annealable,
)
from ..infer.bdmc import Sandwich, bdmc, simulate
from ..infer.diagnostics import KHAT_BAD, active_units, bits_per_dim, khat_summary
from ..infer.importance import PointEvaluation, evaluate_points
from ..reports.inference_data import make_idata, scalar_attrs, write_idata
from ..reports.markdown import fmt, markdown_table

SPLITS = ("test", "val")
METHODS = ("is", "ais", "bdmc")
DIFFERENT = 1.0  # nats: AIS and IS "differ" for a datapoint when their estimates are further apart than this


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
    method: str = "is",
    steps: int = DEFAULT_STEPS,
    chains: int = DEFAULT_CHAINS,
    leapfrog: int = DEFAULT_LEAPFROG,
    bdmc_n: int = 100,
) -> dict[str, Any]:
    """Evaluate a trained run on ``n`` images (default all) of a split; write eval.json, eval.md, eval.nc, figures.

    ``method`` is: importance sampling with K = ``k`` (and k̂); ``ais``: that and AIS with ``steps`` annealing steps,
    ``chains`` chains and ``leapfrog`` leapfrog steps per transition on the same images; ``bdmc``: both, and the
    BDMC sandwich at that schedule on ``bdmc_n`` images simulated from the model. Returns the summary written to
    ``RUN_DIR/eval.json`` (nats per image unless stated).
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
    if method not in METHODS:
        raise PyrovaeError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    for name, v in (("--steps", steps), ("--chains", chains), ("--leapfrog", leapfrog), ("--bdmc-n", bdmc_n)):
        if v < 1:
            raise PyrovaeError(f"{name} must be at least 1, got {v}")
    from ..files import remove_stale_temp_files
    from ..runs import load_run
    from ..train import write_json

    remove_stale_temp_files(run_dir)  # of an evaluation or training killed mid-write
    t0 = time.perf_counter()
    cfg, splits, vae = load_run(run_dir, device)
    data = splits.test if split == "test" else splits.val
    count = min(n or len(data), len(data))
    idx = torch.arange(count, device=data.device)
    x = data.batch(idx)
    labels = data.labels[idx].cpu() if data.labels is not None else None
    vae.eval()
    if method != "is":  # refused before the importance sweep's minutes, not after
        check_annealable(vae.model, vae.guide, x[:2])
    res = evaluate_points(
        vae.model,
        vae.guide,
        x,
        num_samples=k,
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
        "method": method,
    }
    ais = sandwich = None
    if method in ("ais", "bdmc"):
        t1 = time.perf_counter()
        ais = annealed_log_likelihood(
            vae.model, vae.guide, x, num_steps=steps, num_chains=chains, num_leapfrog=leapfrog, memory_mb=memory_mb
        )
        summary["ais"] = ais_summary(ais, res, time.perf_counter() - t1)
        for w in summary["worst"]:
            w["ais_log_likelihood"] = float(ais.log_likelihood[w["index"]])
    if method == "bdmc":
        t1 = time.perf_counter()
        m = min(bdmc_n, count)
        sim = simulate(vae.model, x[:m])
        sandwich = bdmc(
            vae.model,
            vae.guide,
            sim["x"],
            latents={name: v for name, v in sim.items() if name != "x"},
            num_steps=steps,
            num_chains=chains,
            num_leapfrog=leapfrog,
            memory_mb=memory_mb,
        )
        summary["bdmc"] = bdmc_summary(sandwich, time.perf_counter() - t1)
    write_netcdf(run_dir / "eval.nc", res, labels, summary, ais, sandwich)
    if figures:
        from ..reports.figures import ais_minus_is_plot, make_figures

        paths = make_figures(run_dir, vae, x, labels, res.z_mean, res.khat)
        if ais is not None:
            diff = (ais.log_likelihood - res.log_likelihood).double().numpy()
            paths.append(ais_minus_is_plot(res.khat, diff, ais.stderr.double().numpy(), run_dir / "ais_vs_is.png"))
        summary["figures"] = [p.name for p in paths if p is not None]
    summary["seconds"] = time.perf_counter() - t0
    write_json(run_dir / "eval.json", summary)
    _write_markdown(run_dir / "eval.md", summary)
    return summary


def _mean_sem(t: torch.Tensor) -> tuple[float, float | None]:
    t = t.double()
    return float(t.mean()), (float(t.std() / math.sqrt(len(t))) if len(t) > 1 else None)


def ais_summary(ais: AnnealedEstimate, res: PointEvaluation, seconds: float) -> dict[str, Any]:
    """AIS beside IS on the same images: its mean and what checks it (its Monte Carlo standard error, the HMC
    acceptance rate, the chains' ESS), the mean difference AIS − IS with its standard error, and where they differ
    by more than ``DIFFERENT`` nats, the share of those points whose IS k̂ flagged them."""
    lp, sem = _mean_sem(ais.log_likelihood)
    diff = (ais.log_likelihood - res.log_likelihood).double()
    d, d_sem = _mean_sem(diff)
    differ = (diff.abs() > DIFFERENT).numpy()
    bad = np.nan_to_num(res.khat, nan=0.0) > KHAT_BAD
    return {
        "log_likelihood": lp,
        "log_likelihood_sem": sem,
        "mc_stderr": float(ais.stderr.double().nan_to_num(0.0).pow(2).sum().sqrt() / len(diff)),
        "stderr_median": float(ais.stderr.double().nanmedian()),
        "acceptance": float(ais.acceptance.double().mean()),
        "ess": float(ais.ess.double().mean()),
        "minus_is": d,
        "minus_is_sem": d_sem,
        "differ_frac": float(differ.mean()),
        "differ_khat_bad_frac": float(bad[differ].mean()) if differ.any() else None,
        "khat_bad_differ_frac": float(differ[bad].mean()) if bad.any() else None,
        "steps": ais.steps,
        "chains": ais.chains,
        "leapfrog": ais.leapfrog,
        "evaluations_per_chain": ais.evaluations,
        "seconds": seconds,
    }


def bdmc_summary(s: Sandwich, seconds: float) -> dict[str, Any]:
    """The sandwich on simulated images: mean lower and upper bounds and the gap (mean, its s.e.m., max)."""
    gap, gap_sem = _mean_sem(s.gap)
    return {
        "n": len(s.gap),
        "lower": float(s.lower.log_likelihood.double().mean()),
        "upper": float(s.upper.log_likelihood.double().mean()),
        "gap": gap,
        "gap_sem": gap_sem,
        "gap_max": float(s.gap.max()),
        "acceptance": float(s.lower.acceptance.double().mean()),
        "acceptance_reverse": float(s.upper.acceptance.double().mean()),
        "steps": s.lower.steps,
        "chains": s.lower.chains,
        "leapfrog": s.lower.leapfrog,
        "seconds": seconds,
    }


def write_netcdf(
    path: Path,
    res: PointEvaluation,
    labels: torch.Tensor | None,
    summary: dict[str, Any],
    ais: AnnealedEstimate | None = None,
    sandwich: Sandwich | None = None,
) -> None:
    """Per-point results as an ArviZ object (InferenceData or DataTree; group ``evaluation``, dims point and latent,
    and ``simulated`` for the BDMC bounds), atomically."""
    import xarray as xr

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
    coords = {"point": np.arange(len(res.log_likelihood))}
    if ais is not None:
        data_vars["ais_log_likelihood"] = ("point", ais.log_likelihood.double().numpy())
        data_vars["ais_stderr"] = ("point", ais.stderr.double().numpy())
        data_vars["ais_acceptance"] = ("point", ais.acceptance.double().numpy())
        data_vars["ais_ess"] = ("point", ais.ess.double().numpy())
    if sandwich is not None:
        coords["simulated"] = np.arange(len(sandwich.gap))
        data_vars["bdmc_lower"] = ("simulated", sandwich.lower.log_likelihood.double().numpy())
        data_vars["bdmc_upper"] = ("simulated", sandwich.upper.log_likelihood.double().numpy())
        data_vars["bdmc_gap"] = ("simulated", sandwich.gap.double().numpy())
    ds = xr.Dataset(data_vars, coords=coords, attrs=scalar_attrs(summary))
    write_idata(path, make_idata(evaluation=ds))


def _estimators_table(s: dict[str, Any]) -> list[str]:
    """One row per estimator run, each number beside what checks it."""
    rows = [
        [
            f"IS, K={s['k']}",
            f"{fmt(s['log_likelihood'])} ± {fmt(s['log_likelihood_sem'])}",
            f"k̂ > 0.7 for {fmt(s['khat_bad'], '.1%')} of the images",
        ]
    ]
    if s.get("ais"):
        a = s["ais"]
        rows.append(
            [
                f"AIS, {a['steps']} steps x {a['chains']} chains x {a['leapfrog']} leapfrog",
                f"{fmt(a['log_likelihood'])} ± {fmt(a['log_likelihood_sem'])}",
                f"Monte Carlo s.e. {fmt(a['mc_stderr'], '.3f')} (median per image {fmt(a['stderr_median'], '.3f')}), "
                f"acceptance {fmt(a['acceptance'], '.2f')}, ESS {fmt(a['ess'], '.1f')} of {a['chains']}",
            ]
        )
    if s.get("bdmc"):
        b = s["bdmc"]
        rows.append(
            [
                f"BDMC on {b['n']} simulated images, same schedule",
                f"[{fmt(b['lower'])}, {fmt(b['upper'])}]",
                f"gap {fmt(b['gap'], '.3f')} ± {fmt(b['gap_sem'], '.3f')} nats per image (max {fmt(b['gap_max'], '.2f')})",
            ]
        )
    return markdown_table(["log p(x) estimator", "mean ± s.e.m. (nats/image)", "checked by"], rows)


def _write_markdown(path: Path, s: dict[str, Any]) -> None:
    from ..train import atomic_write

    lines = [
        f"# Evaluation of {s['run']}",
        "",
        f"{s['n']} {s['split']} images, K = {s['k']} importance samples per image; nats per image.",
        "",
        *_estimators_table(s),
        "",
        *markdown_table(
            ["quantity", "value"],
            [
                [
                    "log p(x) (importance sampled)",
                    f"{fmt(s['log_likelihood'])} ± {fmt(s['log_likelihood_sem'])} (s.e.m.; "
                    f"k̂ > 0.7 for {fmt(s['khat_bad'], '.1%')})",
                ],
                ["ELBO", fmt(s["elbo"])],
                ["reconstruction E_q log p(x\\|z)", fmt(s["reconstruction"])],
                ["KL(q(z\\|x) \\|\\| p(z))", fmt(s["kl"])],
                ["gap log p - ELBO", fmt(s["gap"])],
                ["bits/dim", f"{fmt(s['bits_per_dim'], '.4f')} ({s['bits_per_dim_kind']})"],
                ["active units", f"{s['active_units']} of {s['latent_dims']}"],
                [
                    "Pareto k̂ < 0.5 / 0.5-0.7 / > 0.7",
                    f"{fmt(s['khat_good'], '.1%')} / {fmt(s['khat_ok'], '.1%')} / {fmt(s['khat_bad'], '.1%')}",
                ],
            ],
        ),
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
    if s.get("ais"):
        a = s["ais"]
        lines += [
            f"AIS − IS = {fmt(a['minus_is'])} ± {fmt(a['minus_is_sem'])} nats per image (s.e.m.); the two differ by more "
            f"than {DIFFERENT:g} nat for {fmt(a['differ_frac'], '.1%')} of the images, of which "
            f"{fmt(a['differ_khat_bad_frac'], '.1%')} have k̂ > 0.7.",
            "",
        ]
    if s.get("bdmc"):
        lines += [
            "BDMC: on images simulated from the model, forward AIS is a stochastic lower bound and reverse AIS from the "
            "true z an upper bound of log p(x); their gap bounds the error of AIS at this schedule.",
            "",
        ]
    atomic_write(path, lambda f: f.write("\n".join(lines).encode()))
