"""``evaluate_run``: a trained run evaluated on a split by the importance sweep (:mod:`pyrovae.infer.importance`),
written as eval.json, eval.md, eval.nc and figures.
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
from ..infer.importance import (
    PointEvaluation,
    active_units,
    bits_per_dim,
    evaluate_points,
    khat_summary,
)
from ..reports.inference_data import make_idata, scalar_attrs, write_idata
from ..reports.markdown import fmt, markdown_table

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
    }
    write_netcdf(run_dir / "eval.nc", res, labels, summary)
    if figures:
        from ..reports.figures import make_figures

        summary["figures"] = [p.name for p in make_figures(run_dir, vae, x, labels, res.z_mean, res.khat)]
    summary["seconds"] = time.perf_counter() - t0
    write_json(run_dir / "eval.json", summary)
    _write_markdown(run_dir / "eval.md", summary)
    return summary


def write_netcdf(path: Path, res: PointEvaluation, labels: torch.Tensor | None, summary: dict[str, Any]) -> None:
    """Per-point results as an ArviZ object (InferenceData or DataTree; group ``evaluation``, dims point and latent), atomically."""
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
    ds = xr.Dataset(data_vars, coords={"point": np.arange(len(res.log_likelihood))}, attrs=scalar_attrs(summary))
    write_idata(path, make_idata(evaluation=ds))


def _write_markdown(path: Path, s: dict[str, Any]) -> None:
    from ..train import atomic_write

    lines = [
        f"# Evaluation of {s['run']}",
        "",
        f"{s['n']} {s['split']} images, K = {s['k']} importance samples per image; nats per image.",
        "",
        *markdown_table(
            ["quantity", "value"],
            [
                [
                    "log p(x) (importance sampled)",
                    f"{fmt(s['log_likelihood'])} ± {fmt(s['log_likelihood_sem'])} (s.e.m.)",
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
    atomic_write(path, lambda f: f.write("\n".join(lines).encode()))
