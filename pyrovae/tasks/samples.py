"""Better samples from a trained VAE: a two-stage VAE (Dai & Wipf 2019) and a latent mixture, against the prior.

A VAE's prior N(0, I) and its aggregate posterior q(z) = E_x q(z | x) differ, so decoding prior draws
lands partly where no training image was encoded. Both samplers here draw z from a model of q(z)
instead, then decode with the first-stage decoder (images are the likelihood's mean at z):

- two-stage: a second, small VAE on the codes z ~ q(z | x) of the training images, u ~ N(0, I),
  z ~ p(z | u) = N(decoder₂(u), γ₂ I), x = decoder(z). The γ₂ noise is kept: Dai & Wipf decode the
  mean, which agrees once γ₂ → 0, but a stage 2 that has not got there would collapse onto its mean;
- latent GMM: the diagonal :class:`pyrovae.models.gmm.GMM` fitted by ``fit`` to the same kind of codes.

Codes are posterior *samples* z ~ q(z | x) by default (fresh draws every stage-2 batch; one draw per
image for the GMM), because q(z) is a mixture of the posteriors, not of their means; ``codes="mean"``
uses the posterior means instead. Sample quality is measured without downloaded weights (see
:func:`mmd2` and :func:`sample_quality`); ``pyrovae samples RUN_DIR`` writes samples.json/.md/_compare.png.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import pyro
import torch

from ..config import RunConfig
from ..errors import PyrovaeError
from ..files import remove_files
from ..infer.paramstore import fresh_param_store
from ..models.gmm import GMM
from ..models.two_stage import LatentVAE
from ..models.vae import VAE
from ..reports.markdown import fmt, markdown_table

CODES = ("sample", "mean")


# ---------------------------------------------------------------------------------------------- MMD
def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(len(x), -1).double()


def _two_samples(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both samples flattened to rows, refused unless each has >= 2 points of one dimension."""
    x, y = _flat(x), _flat(y)
    if len(x) < 2 or len(y) < 2 or x.shape[1] != y.shape[1]:
        raise PyrovaeError(
            f"MMD needs two samples of >= 2 points of one dimension, got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    return x, y


def median_bandwidth(x: torch.Tensor, y: torch.Tensor, max_points: int = 1000, seed: int = 0) -> float:
    """The median heuristic: the median Euclidean distance between distinct points of the pooled sample.

    At most ``max_points`` pooled points (a seeded subsample) enter the median.
    """
    pooled = torch.cat([_flat(x), _flat(y)])
    if len(pooled) > max_points:
        idx = torch.randperm(len(pooled), generator=torch.Generator().manual_seed(seed))[:max_points]
        pooled = pooled[idx.to(pooled.device)]
    d = torch.cdist(pooled, pooled)
    off = d[~torch.eye(len(d), dtype=torch.bool, device=d.device)]
    med = float(off.median()) if off.numel() else 1.0
    return med if med > 0 else 1.0


def _kernel_sum(a: torch.Tensor, b: torch.Tensor, gamma: float, block: int = 2048) -> float:
    """Σ_ij exp(-γ ||a_i - b_j||²), in row blocks so that memory stays O(block · len(b))."""
    total = 0.0
    for i in range(0, len(a), block):
        total += float(torch.exp(-gamma * torch.cdist(a[i : i + block], b).pow(2)).sum())
    return total


def mmd2(
    x: torch.Tensor, y: torch.Tensor, bandwidth: float | None = None, unbiased: bool = True
) -> tuple[float, float]:
    """Squared MMD between samples ``x`` and ``y`` with k(a, b) = exp(-||a - b||² / (2 σ²)); returns (MMD², σ).

    σ defaults to the median heuristic (:func:`median_bandwidth`). The unbiased estimator (Gretton et
    al. 2012) drops the kernel's diagonal, so it is ~0 (and may be slightly negative) when x and y come
    from one distribution. Rows are flattened, so images and codes alike work; float64 throughout.
    """
    x, y = _two_samples(x, y)
    m, n = len(x), len(y)
    sigma = bandwidth if bandwidth is not None else median_bandwidth(x, y)
    gamma = 1.0 / (2.0 * sigma * sigma)
    kxx, kyy, kxy = _kernel_sum(x, x, gamma), _kernel_sum(y, y, gamma), _kernel_sum(x, y, gamma)
    if unbiased:  # k(a, a) = 1 on the diagonal
        value = (kxx - m) / (m * (m - 1)) + (kyy - n) / (n * (n - 1)) - 2 * kxy / (m * n)
    else:
        value = kxx / m**2 + kyy / n**2 - 2 * kxy / (m * n)
    return value, sigma


def mmd_permutation_test(
    x: torch.Tensor, y: torch.Tensor, permutations: int = 200, bandwidth: float | None = None, seed: int = 0
) -> tuple[float, float]:
    """Unbiased MMD² and its permutation p-value (the share of label shufflings with MMD² at least as large).

    Builds the pooled kernel matrix once (for up to a few thousand points in all) and scores all
    shufflings with one matrix product: MMD² = Σ_ij K_ij c_i c_j over group weights c (diagonal dropped).
    """
    x, y = _two_samples(x, y)
    m, n = len(x), len(y)
    sigma = bandwidth if bandwidth is not None else median_bandwidth(x, y)
    pooled = torch.cat([x, y])
    k = torch.exp(-torch.cdist(pooled, pooled).pow(2) / (2 * sigma * sigma))
    k.fill_diagonal_(0.0)
    g = torch.Generator().manual_seed(seed)
    orders = torch.stack([torch.arange(m + n)] + [torch.randperm(m + n, generator=g) for _ in range(permutations)])
    in_x = k.new_zeros(permutations + 1, m + n).scatter_(1, orders[:, :m].to(k.device), 1.0)  # row 0: observed
    in_y = 1.0 - in_x
    kx, ky = in_x @ k, in_y @ k
    stats = (kx * in_x).sum(1) / (m * (m - 1)) + (ky * in_y).sum(1) / (n * (n - 1)) - 2 * (kx * in_y).sum(1) / (m * n)
    observed = float(stats[0])
    return observed, (1 + int((stats[1:] >= stats[0]).sum())) / (1 + permutations)


# ----------------------------------------------------------------------------------- posterior codes
class PosteriorCodes:
    """A dataset (for ``fit``) of the first stage's codes: fresh z ~ q(z | x) per batch, or the means.

    Stores the encoder's (loc, scale) of every image once, so a stage-2 epoch costs no encoder passes.
    """

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, codes: str = "sample") -> None:
        if codes not in CODES:
            raise PyrovaeError(f"unknown codes {codes!r}; choose one of {', '.join(CODES)}")
        self.loc, self.scale, self.codes = loc, scale, codes

    def __len__(self) -> int:
        return len(self.loc)

    @property
    def device(self) -> torch.device:
        return self.loc.device

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        if self.codes == "mean":
            return self.loc[idx]
        return self.loc[idx] + self.scale[idx] * torch.randn_like(self.loc[idx])

    def all(self) -> torch.Tensor:
        return self.batch(torch.arange(len(self), device=self.device))


@torch.no_grad()
def encode(vae: VAE, data, codes: str = "sample", batch_size: int = 2000) -> PosteriorCodes:
    """The encoder's q(z | x) for every image of ``data`` (an ImageData or a tensor), as :class:`PosteriorCodes`."""
    xs = data.batches(batch_size) if hasattr(data, "batches") else data.split(batch_size)
    locs, scales = [], []
    for x in xs:
        loc, scale = vae.encoder(x)
        locs.append(loc)
        scales.append(scale)
    return PosteriorCodes(torch.cat(locs), torch.cat(scales), codes)


class TwoStageSampler:
    """Codes from a fitted :class:`LatentVAE`, decoded by the first stage's decoder."""

    def __init__(self, vae: VAE, stage2: LatentVAE, noise: bool = True) -> None:
        self.vae, self.stage2, self.noise = vae, stage2, noise

    @torch.no_grad()
    def sample_codes(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """``n`` codes z ~ p(z | u), u ~ N(0, I) (the decoder₂ mean only when ``noise`` is off)."""
        return self.stage2.sample(n, like, self.noise)

    @torch.no_grad()
    def sample(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """``n`` images: the first stage's likelihood mean at stage-2 codes."""
        return decode(self.vae, self.sample_codes(n, like))


class LatentGMMSampler:
    """Codes z ~ a GMM fitted in the first stage's latent space, decoded by the first stage's decoder."""

    def __init__(self, vae: VAE, gmm: GMM) -> None:
        self.vae, self.gmm = vae, gmm

    @torch.no_grad()
    def sample_codes(self, n: int, like: torch.Tensor | None = None, generator: torch.Generator | None = None):
        return self.gmm.sample(n, generator=generator)

    @torch.no_grad()
    def sample(self, n: int, like: torch.Tensor | None = None, generator: torch.Generator | None = None):
        return decode(self.vae, self.sample_codes(n, generator=generator))


@torch.no_grad()
def decode(vae: VAE, z: torch.Tensor, batch_size: int = 2000) -> torch.Tensor:
    """The first stage's likelihood mean at codes ``z``, in batches."""
    return torch.cat([vae.likelihood.mean(vae.decoder(c)) for c in z.split(batch_size)])


def fit_two_stage(
    vae: VAE,
    train_codes: PosteriorCodes,
    *,
    epochs: int = 20,
    hidden: tuple[int, ...] = (512, 512),
    batch_size: int = 100,
    lr: float = 1e-3,
    seed: int = 0,
    val_codes: PosteriorCodes | None = None,
    quiet: bool = True,
) -> tuple[TwoStageSampler, list[dict[str, float]]]:
    """Fit the stage-2 VAE on the codes by ``fit`` (analytic-KL ELBO, Adam, cosine learning rate)."""
    from ..train import fit

    pyro.set_rng_seed(seed)
    stage2 = LatentVAE(train_codes.loc.shape[1], hidden=hidden).to(train_codes.device)
    with fresh_param_store():  # the stage-2 modules keep their parameters; the caller's store is left alone
        result = fit(
            stage2.model,
            stage2.guide,
            train_codes,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            lr_schedule="cosine",
            val_data=val_codes,
            quiet=quiet,
            seed=seed,
        )
    return TwoStageSampler(vae, stage2.eval()), result.history


def fit_latent_gmm(vae: VAE, train_codes: PosteriorCodes, k: int = 20, seed: int = 0) -> LatentGMMSampler:
    """A diagonal GMM (k-means++ start, then ``fit``) on one draw of the codes (or the means) per image."""
    from .compare import fit_mixture_latent

    torch.manual_seed(seed)
    z = train_codes.all()
    if len(z) < k:
        raise PyrovaeError(f"--gmm-k {k} is more than the {len(z)} training codes")
    with fresh_param_store():
        gmm, _ = fit_mixture_latent(z, k, seed, covariance="diag")
    return LatentGMMSampler(vae, gmm)


# ---------------------------------------------------------------------------------- sample quality
def sample_quality(
    generated: dict[str, torch.Tensor],
    codes: dict[str, torch.Tensor],
    test_x: torch.Tensor,
    test_codes: torch.Tensor,
    referee: VAE | None = None,
    k: int = 100,
) -> dict[str, dict[str, float]]:
    """Per sampler: MMD² to the test set on pixels, on the referee's encoder means and on stage-1 codes,
    and the mean importance-sampled log p(x) of the samples under ``referee`` (a separately trained VAE).

    One bandwidth per feature map (the median heuristic on test vs the first sampler), so that the
    rows of one table are comparable.
    """

    names = list(generated)
    feats: dict[str, dict[str, torch.Tensor]] = {"pixels": {n: generated[n] for n in names}}
    test_feats = {"pixels": test_x}
    if referee is not None:
        with torch.no_grad():
            feats["referee"] = {n: referee.encoder(generated[n])[0] for n in names}
            test_feats["referee"] = referee.encoder(test_x)[0]
    feats["latent"] = {n: codes[n] for n in names if n in codes}
    test_feats["latent"] = test_codes
    bandwidths = {f: median_bandwidth(test_feats[f], next(iter(feats[f].values()))) for f in feats}
    out: dict[str, dict[str, float]] = {n: {} for n in names}
    for f, per in feats.items():
        for n, v in per.items():
            out[n][f"mmd2_{f}"] = mmd2(v, test_feats[f], bandwidths[f])[0]
    if referee is not None:
        for n in names:
            lp = _referee_log_p(referee, generated[n], k)
            out[n]["referee_log_likelihood"] = float(lp.mean())
            out[n]["referee_log_likelihood_sem"] = float(lp.std() / math.sqrt(len(lp)))
    for n in out:
        out[n]["bandwidths"] = {f: bandwidths[f] for f in feats}
    return out


# ------------------------------------------------------------------------------------------- figure
def compare_figure(blocks: dict[str, torch.Tensor], path: Path, per_block: int = 64) -> Path:
    """One PNG: a labelled square grid of ``per_block`` images per sampler, side by side."""
    from matplotlib.figure import Figure
    from torchvision.utils import make_grid

    from ..files import save_figure

    nrow = int(round(per_block**0.5))
    fig = Figure(figsize=(4 * len(blocks), 4.4))
    axes = fig.subplots(1, len(blocks), squeeze=False)[0]
    for ax, (title, imgs) in zip(axes, blocks.items()):
        grid = make_grid(imgs[:per_block].clamp(0, 1).cpu(), nrow=nrow, padding=1, pad_value=1.0)
        ax.imshow(grid.permute(1, 2, 0).numpy().squeeze(), cmap="gray" if grid.shape[0] in (1, 3) else None)
        ax.set_title(title, fontsize=11)
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


# --------------------------------------------------------------------------------------- run folder
def _referee(run_dir: Path, cfg: RunConfig, referee_run: str | None, epochs: int, device: str, quiet: bool):
    """The referee VAE: loaded from ``referee_run``, or trained once into RUN_DIR/referee (seed + 1000)."""
    from ..runs import load_run, read_config, train_vae

    if referee_run:
        _, _, ref = load_run(referee_run, device)
        return ref, str(referee_run), read_config(referee_run)
    folder = run_dir / "referee"
    ref_cfg = cfg.replace(training={"seed": cfg.training.seed + 1000, "epochs": epochs, "device": device}, facts={})
    if (folder / "checkpoint.pt").is_file():
        saved = read_config(folder)
        same = lambda c: (c.kind, c.training.seed, c.training.epochs, c.data.dataset, c.model.likelihood, c.model.arch)  # noqa: E731
        if same(saved) == same(ref_cfg):
            _, _, ref = load_run(folder, device)
            return ref, str(folder), saved
        remove_files(folder)
    with fresh_param_store():
        _, ref, _ = train_vae(ref_cfg, folder, quiet=quiet)
    return ref, str(folder), ref_cfg


def run_samples(
    run_dir: str | Path,
    *,
    stage2_epochs: int = 20,
    stage2_hidden: tuple[int, ...] = (512, 512),
    gmm_k: int = 20,
    n: int = 1000,
    codes: str = "sample",
    referee_run: str | None = None,
    referee_epochs: int = 5,
    k: int = 100,
    seed: int = 0,
    device: str = "auto",
    out: str | Path | None = None,
    allow_other_likelihood: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    """Fit both samplers on a run's training codes, draw ``n`` images from each and from the prior, and
    score them against ``n`` test images; writes samples.json, samples.md and samples_compare.png."""
    from ..runs import load_run, read_config
    from ..train import atomic_write, write_json

    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir
    cfg = read_config(run_dir)
    if codes not in CODES:
        raise PyrovaeError(f"unknown codes {codes!r}; choose one of {', '.join(CODES)}")
    if cfg.kind != "vae":
        raise PyrovaeError(f"{run_dir} is a {cfg.kind} run; the two-stage VAE needs a run of 'pyrovae train'")
    if cfg.model.likelihood != "gaussian-learned" and not allow_other_likelihood:
        raise PyrovaeError(
            f"{run_dir} was trained with the {cfg.model.likelihood} likelihood; the two-stage VAE needs the learned-γ "
            "Gaussian decoder (train with --likelihood gaussian-learned --binarize none), or pass --allow-other-likelihood"
        )
    for name, v in (("--n", n), ("--stage2-epochs", stage2_epochs), ("--gmm-k", gmm_k), ("--k", k)):
        if v < 1:
            raise PyrovaeError(f"{name} must be at least 1, got {v}")
    t0 = time.perf_counter()
    cfg, splits, vae = load_run(run_dir, device)
    vae.eval()
    out.mkdir(parents=True, exist_ok=True)
    n_test = min(n, len(splits.test))
    test_x = splits.test.batch(torch.arange(n_test, device=splits.test.device))
    n_ref = min(n, len(splits.val))
    val_x = splits.val.batch(torch.arange(n_ref, device=splits.val.device))

    pyro.set_rng_seed(seed)
    train_codes = encode(vae, splits.train, codes)
    val_codes = encode(vae, splits.val, codes)
    test_codes = encode(vae, test_x, "sample").all()  # the held-out aggregate posterior, always as samples
    t_stage2 = time.perf_counter()
    two_stage, history = fit_two_stage(
        vae, train_codes, epochs=stage2_epochs, hidden=stage2_hidden, seed=seed, val_codes=val_codes, quiet=quiet
    )
    t_gmm = time.perf_counter()
    latent_gmm = fit_latent_gmm(vae, train_codes, gmm_k, seed)
    t_draw = time.perf_counter()

    pyro.set_rng_seed(seed + 1)
    gen = torch.Generator(device=test_x.device).manual_seed(seed + 1)
    z = {
        "prior": vae.prior(test_x).sample((n,)),
        "two_stage": two_stage.sample_codes(n, test_x),
        "latent_gmm": latent_gmm.sample_codes(n, generator=gen),
        "aggregate_posterior": encode(vae, val_x, "sample").all(),
    }
    images = {name: decode(vae, c) for name, c in z.items()}
    images["real_val"] = val_x
    referee, referee_where, referee_cfg = _referee(run_dir, cfg, referee_run, referee_epochs, device, quiet)
    referee.eval()
    scores = sample_quality(images, z, test_x, test_codes, referee, k)
    pyro.set_rng_seed(seed + 2)
    with torch.no_grad():
        lp_test = _referee_log_p(referee, test_x, k)
    labels = {
        "prior": "prior: z ~ N(0, I)",
        "two_stage": f"two-stage VAE (stage 2: {'-'.join(map(str, stage2_hidden))}, γ₂ learned)",
        "latent_gmm": f"latent GMM (K={gmm_k}, diag)",
        "aggregate_posterior": "aggregate posterior: z ~ q(z|x), x = validation images (ideal latent sampler)",
        "real_val": "real validation images (noise floor)",
    }
    summary: dict[str, Any] = {
        "run": str(run_dir),
        "dataset": cfg.data.dataset,
        "likelihood": cfg.model.likelihood,
        "stage1_gamma": float(vae.likelihood.log_gamma.detach().exp())
        if hasattr(vae.likelihood, "log_gamma")
        else None,
        "codes": codes,
        "codes_note": (
            "stage 2 and the GMM were fitted on posterior samples z ~ q(z|x) (fresh each stage-2 batch, one per image for the GMM)"
            if codes == "sample"
            else "stage 2 and the GMM were fitted on posterior means E[z|x]"
        ),
        "n": n,
        "n_test": n_test,
        "n_train_codes": len(train_codes),
        "stage2": {
            "hidden": list(stage2_hidden),
            "epochs": stage2_epochs,
            "gamma2": two_stage.stage2.gamma,
            "final_train_elbo": history[-1]["train_elbo"],
            "final_val_elbo": history[-1]["val_elbo"],
            "seconds": t_gmm - t_stage2,
        },
        "gmm": {"k": gmm_k, "covariance": "diag", "seconds": t_draw - t_gmm},
        "referee": {
            "run": referee_where,
            "model": f"VAE ({referee_cfg.model.arch}, {referee_cfg.model.likelihood}, seed {referee_cfg.training.seed}, "
            f"{referee_cfg.training.epochs} epochs)",
            "k": k,
            "test_log_likelihood": float(lp_test.mean()),
        },
        "samplers": {name: {"label": labels[name], **scores[name]} for name in images},
        "units": "MMD²: unbiased, Gaussian kernel, σ = median pairwise distance; log-likelihood: nats per image",
    }
    summary["seconds"] = time.perf_counter() - t0
    fig = compare_figure(
        {
            labels["prior"]: images["prior"],
            "two-stage VAE": images["two_stage"],
            f"latent GMM (K={gmm_k})": images["latent_gmm"],
        },
        out / "samples_compare.png",
    )
    summary["figure"] = fig.name
    write_json(out / "samples.json", summary)
    atomic_write(out / "samples.md", lambda f: f.write(_markdown(summary).encode()))
    state = {"stage2": two_stage.stage2.state_dict(), "latent_gmm": latent_gmm.gmm.state_dict(), "gmm_k": gmm_k}
    atomic_write(out / "samplers.pt", lambda f: torch.save(state, f))
    return summary


def _referee_log_p(referee: VAE, x: torch.Tensor, k: int) -> torch.Tensor:
    from ..infer.importance import log_likelihood

    with fresh_param_store():  # the referee's modules must not meet another VAE's of the same name
        return log_likelihood(referee.model, referee.guide, x, num_samples=k).double()


def _markdown(s: dict[str, Any]) -> str:
    ref = s["referee"]
    lines = [
        f"# Samples from {s['run']} ({s['dataset']}, {s['likelihood']} decoder)",
        "",
        f"{s['n']} images per sampler, scored against the first {s['n_test']} test images. "
        f"{s['codes_note'][0].upper() + s['codes_note'][1:]}. Stage-1 γ = {fmt(s['stage1_gamma'], '.4g')}, "
        f"stage-2 γ₂ = {s['stage2']['gamma2']:.4g}.",
        "",
    ]
    rows = []
    for r in s["samplers"].values():
        lp = r.get("referee_log_likelihood")
        lp_text = f"{lp:.1f} ± {r['referee_log_likelihood_sem']:.1f}" if lp is not None else "n/a"
        mmd = [fmt(r.get(f"mmd2_{f}"), ".4f") for f in ("pixels", "referee", "latent")]
        rows.append([r["label"], *mmd, lp_text])
    header = ["sampler", "MMD² pixels", "MMD² referee features", "MMD² stage-1 codes", "referee log p(x) ± s.e."]
    lines += markdown_table(header, rows)
    lines += [
        "",
        f"Referee: {ref['model']} in `{ref['run']}`; importance-sampled log p(x) with K={ref['k']}; "
        f"the test images themselves score {ref['test_log_likelihood']:.1f} nats/image.",
        "",
        "How to read it (lower MMD² is better; 0 means indistinguishable at this sample size):",
        "",
        "- MMD² is the unbiased estimate with a Gaussian kernel whose bandwidth is the median pairwise distance "
        "(one bandwidth per feature map, shared by all rows). It is ~0 only for identical distributions, but its "
        "scale depends on the features and the bandwidth: compare rows, not numbers across tables or datasets.",
        "- Pixels: Euclidean distance between images is dominated by global brightness and shape, not by detail; "
        "the generated images are decoder means (no pixel noise), so even a perfect latent sampler stays above the "
        "real-vs-real floor. The *aggregate posterior* row (validation codes decoded) is the best any latent sampler "
        "can do with this decoder.",
        "- Referee features: encoder means of a separately trained VAE (same data, another seed). A learned feature "
        "map without downloaded weights, but a weak one next to Inception features (FID); it sees what a VAE encoder "
        "sees and shares the first stage's architecture, so it can favour the same blur.",
        "- Stage-1 codes: MMD² between the sampler's codes and posterior samples of the test images; it measures "
        "how well each sampler matches the aggregate posterior, the quantity the two samplers are fitted to.",
        "- Referee log p(x): how probable a separately trained VAE finds the samples. Smooth, average-looking "
        "images score high, and a sampler that repeats a few typical images can score higher than the test set, "
        "so it measures plausibility, not diversity; read it next to MMD².",
        "",
        "Figure: `samples_compare.png` (prior, two-stage and latent-GMM samples, 64 each, decoder means).",
        "",
    ]
    return "\n".join(lines)


__all__ = [
    "LatentGMMSampler",
    "PosteriorCodes",
    "TwoStageSampler",
    "decode",
    "encode",
    "fit_latent_gmm",
    "fit_two_stage",
    "mmd2",
    "mmd_permutation_test",
    "median_bandwidth",
    "run_samples",
    "sample_quality",
]
