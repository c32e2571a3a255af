"""Diagnostics of per-datapoint log p(x) estimates: PSIS k̂ of importance weights, bits/dim, active units.

The Pareto k̂ of each datapoint's K weights (Vehtari et al. 2024; Yao et al. 2018) says whether its estimate can be
trusted: < 0.5 good, 0.5-0.7 ok, > 0.7 bad.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..reports.inference_data import psis_khat

KHAT_GOOD, KHAT_BAD = 0.5, 0.7
EQUAL_WEIGHTS = 1e-4  # log-weights spread less than this: the weights are equal, k̂ is 0
MIN_K_FOR_KHAT = 30  # ArviZ needs a tail of at least 5 weights: min(0.2 K, 3 sqrt K) > 4
ACTIVE_THRESHOLD = 0.01  # Burda et al. 2016: unit d is active when Var_x E_q[z_d | x] > 0.01


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
