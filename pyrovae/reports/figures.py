"""Figures of a trained run: samples, reconstructions, latent space, interpolations, training curves, k̂.

Image grids go through ``torchvision.utils.save_image``; plots are matplotlib ``Figure`` objects drawn by
the Agg canvas (no display, and no process-wide ``matplotlib.use`` or pyplot state). Every function writes one
PNG and returns its path.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torchvision.utils import save_image as _torchvision_save_image

from ..files import atomic_write, save_figure
from ..models.vae import VAE


def save_image(imgs: torch.Tensor, path: str | Path, **kwargs) -> Path:
    """``torchvision.utils.save_image`` as PNG through the atomic writer (never following a planted symlink)."""
    buf = io.BytesIO()
    _torchvision_save_image(imgs, buf, format="png", **kwargs)
    atomic_write(path, buf.getvalue())
    return Path(path)


def prior_samples(vae: VAE, like: torch.Tensor, path: Path, n: int = 64) -> Path:
    """Mean images decoded from ``n`` draws of the prior, in a square grid."""
    imgs = vae.sample(n, like).clamp(0, 1).cpu()
    save_image(imgs, path, nrow=int(round(n**0.5)), padding=1)
    return path


def reconstructions(vae: VAE, x: torch.Tensor, path: Path, n: int = 32) -> Path:
    """Rows of test images (top of each pair) above their reconstructions at the posterior mean."""
    x = x[:n]
    with torch.no_grad():
        rec = vae.reconstruct(x).clamp(0, 1)
    per_row = min(8, len(x))
    rows = []
    for start in range(0, len(x), per_row):
        rows += [x[start : start + per_row], rec[start : start + per_row]]
    rows = [torch.cat([r, r.new_ones(per_row - len(r), *r.shape[1:])]) for r in rows]  # pad the last row
    save_image(torch.cat(rows).cpu(), path, nrow=per_row, padding=1)
    return path


def interpolations(vae: VAE, x: torch.Tensor, path: Path, pairs: int = 4, steps: int = 10) -> Path:
    """Decoded straight lines between the posterior means of pairs of images (one pair per row)."""
    pairs = max(1, min(pairs, len(x) // 2))
    with torch.no_grad():
        loc = vae.encoder(x[: 2 * pairs])[0]
        t = torch.linspace(0, 1, steps, device=loc.device)[:, None]
        rows = [loc[2 * i] * (1 - t) + loc[2 * i + 1] * t for i in range(pairs)]
        imgs = vae.likelihood.mean(vae.decoder(torch.cat(rows))).clamp(0, 1)
    save_image(imgs.cpu(), path, nrow=steps, padding=1)
    return path


def latent_scatter(z_mean: torch.Tensor, labels: torch.Tensor | None, path: Path, colour_label: str = "label") -> Path:
    """Posterior means in 2-D (the first two principal components when z has more than two dims)."""
    z = z_mean.detach().cpu().double()
    labels = torch.as_tensor(labels).cpu() if labels is not None else None
    title = "posterior means"
    if z.shape[1] > 2:
        centred = z - z.mean(0)
        _, _, v = torch.pca_lowrank(centred, q=2, center=False)
        z = centred @ v[:, :2]
        title += " (first two principal components)"
    elif z.shape[1] == 1:
        z = torch.cat([z, torch.zeros_like(z)], dim=1)
    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    colour = labels.numpy() if labels is not None else None
    points = ax.scatter(z[:, 0].numpy(), z[:, 1].numpy(), c=colour, cmap="tab10", s=4, alpha=0.7)
    if labels is not None:
        fig.colorbar(points, ax=ax, label=colour_label)
    ax.set_title(title)
    ax.set_xlabel("z1" if z_mean.shape[1] <= 2 else "PC1")
    ax.set_ylabel("z2" if z_mean.shape[1] <= 2 else "PC2")
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def training_curves(metrics_csv: Path, path: Path) -> Path | None:
    """Train and validation ELBO per epoch from ``metrics.csv``; None when there is none."""
    if not Path(metrics_csv).is_file():
        return None
    with open(metrics_csv) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    epochs = [int(r["epoch"]) for r in rows]
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for key, label in (("train_elbo", "train ELBO"), ("val_elbo", "validation ELBO")):
        values = [float(r[key]) if r.get(key) not in (None, "") else np.nan for r in rows]
        ax.plot(epochs, values, marker="o", ms=3, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per image")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def khat_plot(khat: np.ndarray, path: Path) -> Path | None:
    """Histogram of the per-image Pareto k̂ with the 0.5 and 0.7 thresholds; None without any k̂."""
    khat = np.asarray(khat, dtype=float)
    finite = khat[np.isfinite(khat)]
    if finite.size == 0:
        return None
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.hist(finite, bins=min(50, max(10, finite.size // 20)), color="0.5")
    for threshold, colour in ((0.5, "tab:orange"), (0.7, "tab:red")):
        ax.axvline(threshold, color=colour, ls="--", label=f"k̂ = {threshold}")
    ax.set_xlabel("Pareto k̂ of the importance weights")
    ax.set_ylabel("images")
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def ais_minus_is_plot(khat: np.ndarray, diff: np.ndarray, stderr: np.ndarray, path: Path) -> Path | None:
    """Per-datapoint AIS minus IS log p against the IS weights' k̂: where IS is loose (k̂ > 0.7), AIS sits above it."""
    ok = np.isfinite(khat) & np.isfinite(diff)
    if not ok.any():
        return None
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    se = np.nan_to_num(stderr[ok], nan=0.0)
    ax.errorbar(khat[ok], diff[ok], yerr=se, fmt="o", ms=2.5, alpha=0.5, elinewidth=0.5)
    ax.axhline(0.0, color="black", lw=0.8)
    for k in (0.5, 0.7):
        ax.axvline(k, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("Pareto k̂ of the importance weights")
    ax.set_ylabel("log p AIS − log p IS (nats)")
    ax.set_title("AIS against IS, per datapoint (bars: AIS standard error)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def make_figures(
    run_dir: Path,
    vae: VAE,
    x: torch.Tensor,
    labels: torch.Tensor | None,
    z_mean: torch.Tensor | None,
    khat: np.ndarray,
) -> list[Path]:
    """All the figures of a run, written into ``run_dir``; returns the paths written."""
    run_dir = Path(run_dir)
    paths: list[Path | None] = [
        prior_samples(vae, x, run_dir / "samples.png"),
        reconstructions(vae, x, run_dir / "reconstructions.png"),
        interpolations(vae, x, run_dir / "interpolations.png") if len(x) >= 2 else None,
        latent_scatter(z_mean, labels, run_dir / "latents.png") if z_mean is not None and len(z_mean) > 2 else None,
        training_curves(run_dir / "metrics.csv", run_dir / "training.png"),
        khat_plot(khat, run_dir / "khat.png"),
    ]
    return [p for p in paths if p is not None]


def compare_figures(vae: VAE, gmm, x: torch.Tensor, z_test: torch.Tensor, clusters, out: Path) -> list[str]:
    """For ``pyrovae compare``: samples of both models side by side, mixture means, latents by cluster."""
    out = Path(out)
    n = 32
    # Both as the mean of p(x | latent) at latents drawn from the prior: z ~ N(0, I), k ~ Cat(weights).
    with torch.no_grad():
        vae_samples = vae.sample(n, x).clamp(0, 1).cpu()
        k = torch.multinomial(gmm.weights, n, replacement=True, generator=torch.Generator(x.device).manual_seed(0))
        gmm_samples = gmm.means[k].reshape(n, *x.shape[1:]).clamp(0, 1).cpu()
    gap = torch.ones(8, *x.shape[1:])
    # 4 rows of 8 VAE samples | a blank column | 4 rows of 8 mixture samples, as one 17-wide grid
    rows = []
    for r in range(4):
        rows += [vae_samples[8 * r : 8 * r + 8], gap[:1], gmm_samples[8 * r : 8 * r + 8]]
    save_image(torch.cat(rows), out / "samples_vae_vs_mixture.png", nrow=17, padding=1)
    means = gmm.means.reshape(gmm.k, *x.shape[1:]).clamp(0, 1).cpu()
    save_image(means, out / "mixture_means.png", nrow=min(10, gmm.k), padding=1)
    latent_scatter(z_test, torch.as_tensor(clusters), out / "latents_by_cluster.png", "latent-GMM cluster")
    return [str(out / f) for f in ("samples_vae_vs_mixture.png", "mixture_means.png", "latents_by_cluster.png")]
