"""``pyrovae compare``: a VAE and a Gaussian (or Bernoulli) mixture on one data representation, side by side.

Both models are trained by the same ``fit`` on the same device-resident split and scored by the same
importance-sampling code (``pyrovae.infer.importance``): for the mixture, whose guide is empty, one sample is
already its exact log-likelihood. Representations never mix in one column:

- ``binary``: dynamically binarised training images, test images binarised once (seeded);
  VAE with a Bernoulli decoder vs a Bernoulli mixture; nats/image and bits/dim.
- ``dequantized``: x = (pixel + u)/256 with u ~ U(0, 1) (test noise seeded); VAE with a Gaussian
  decoder vs a Gaussian mixture; nats/image and bits/dim of the 8-bit data.

Clustering against the labels (NMI, ARI, accuracy under the best one-to-one matching) for the
mixture on pixels and for a mixture fitted on the VAE's latent posterior means.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
from pyro.poutine.util import site_is_subsample

from ..config import DataConfig, MixtureConfig, RunConfig, TrainingConfig, with_options
from ..errors import PyrovaeError
from ..files import remove_files, write_json, write_text
from ..infer.ais import DEFAULT_CHAINS, DEFAULT_LEAPFROG, DEFAULT_STEPS, annealed_log_likelihood
from ..infer.diagnostics import ACTIVE_THRESHOLD, bits_per_dim, khat_summary
from ..infer.handlers import off_rng
from ..infer.importance import evaluate_points
from ..models.gmm import GMM
from ..reports.markdown import fmt, markdown_table
from ..runs import load_module_state, read_config, record_config, resolve_device, train_vae
from ..train import fit, load_checkpoint
from ..train.state import load_modules

REPRESENTATIONS = {
    # name: (VAE settings, mixture family, bits/dim kind)
    "binary": ({"binarize": "dynamic", "dequantize": False, "likelihood": "bernoulli"}, "bernoulli", "binary"),
    "dequantized": ({"binarize": "none", "dequantize": True, "likelihood": "gaussian-diag"}, "gaussian", "dequantized"),
}


def clustering_scores(labels: np.ndarray, clusters: np.ndarray) -> dict[str, float]:
    """NMI, ARI and accuracy under the best one-to-one cluster-to-label matching (Hungarian)."""
    from scipy.optimize import linear_sum_assignment
    from sklearn.metrics import adjusted_rand_score, confusion_matrix, normalized_mutual_info_score

    classes = np.union1d(np.unique(labels), np.unique(clusters))
    counts = confusion_matrix(labels, clusters, labels=classes)
    rows, cols = linear_sum_assignment(-counts)
    return {
        "nmi": float(normalized_mutual_info_score(labels, clusters)),
        "ari": float(adjusted_rand_score(labels, clusters)),
        "accuracy": float(counts[rows, cols].sum() / len(labels)),
    }


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def fit_mixture(
    x_train,
    k: int,
    family: str,
    covariance: str,
    epochs: int,
    out: Path | None,
    seed: int,
    quiet: bool,
    data: DataConfig | None = None,
) -> tuple[GMM, float]:
    """A mixture initialised by k-means++ and trained by ``fit`` (marginal form, Adam with a cosine schedule).

    With ``out``: a run folder of kind ``gmm`` (``data``: the config of the images ``x_train`` came from); its
    checkpoint holds the mixture's whole state_dict, the k-means scales (buffers) included."""
    device = x_train.device
    pyro.set_rng_seed(seed)
    sample = x_train.batch(torch.randperm(len(x_train), device=device)[: min(len(x_train), 20000)])
    t0 = time.perf_counter()
    gmm = GMM(k, x_train.shape, covariance=covariance, family=family).to(device)
    gmm.initialize(sample, generator=torch.Generator(device=device).manual_seed(seed))
    lr = 0.05 if family == "gaussian" else 0.02
    training = TrainingConfig(
        elbo=gmm.assignment, epochs=epochs, batch_size=256, lr=lr, lr_schedule="cosine", seed=seed, device=device.type
    )
    cfg = RunConfig(
        kind="gmm", data=data or DataConfig(), model=MixtureConfig(k, family, covariance), training=training
    )
    fit(
        gmm.model,
        gmm.guide,
        x_train,
        elbo=gmm.elbo(),
        epochs=epochs,
        batch_size=training.batch_size,
        lr=lr,
        lr_schedule=training.lr_schedule,
        out=out,
        quiet=quiet,
        config=record_config(cfg, {"n_train": len(x_train)}).to_dict(),
    )
    return gmm, time.perf_counter() - t0


def _latents(vae, data, batch: int = 2000) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([vae.encoder(x)[0] for x in data.batches(batch)])


@dataclass
class Fitted:
    """A trained model/guide pair for :func:`compare`, with what the report says about it (all optional)."""

    model: Callable
    guide: Callable
    description: str = ""
    parameters: int | None = None
    train_seconds: float | None = None
    clusters: np.ndarray | None = None  # a cluster for each test point, scored against the labels
    clustering_source: str = ""
    owner: Any = None  # the object the program belongs to (its exact log_prob, if any, checks the estimate)
    args: tuple = ()  # further arguments after the data, e.g. the labels of a conditional VAE: log p(x | y)


def as_fitted(name: str, entry: Any) -> Fitted:
    """A :class:`Fitted` from a Fitted, a ``(model, guide)`` pair, or an object with ``model`` and ``guide`` methods."""
    if isinstance(entry, Fitted):
        return entry
    if isinstance(entry, tuple) and len(entry) == 2 and all(callable(f) for f in entry):
        return Fitted(entry[0], entry[1], description=name)
    if callable(getattr(entry, "model", None)) and callable(getattr(entry, "guide", None)):
        params = n_params(entry) if isinstance(entry, torch.nn.Module) else None
        return Fitted(entry.model, entry.guide, description=name, parameters=params, owner=entry)
    raise PyrovaeError(f"{name}: expected a (model, guide) pair, an object with model and guide, or a Fitted")


def compare(
    models: Mapping[str, Any],
    x: torch.Tensor,
    *,
    labels: np.ndarray | torch.Tensor | None = None,
    k: int = 1000,
    out: str | Path | None = None,
    bits_per_dim_kind: str = "undefined",
    memory_mb: float | None = None,
    seed: int = 0,
    dataset: str = "",
    representation: str = "",
    n_train: int | None = None,
    settings: dict[str, Any] | None = None,
    notes: Sequence[str] = (),
    title: str | None = None,
    progress: bool = False,
    method: str = "is",
    steps: int = DEFAULT_STEPS,
    chains: int = DEFAULT_CHAINS,
    leapfrog: int = DEFAULT_LEAPFROG,
) -> dict[str, Any]:
    """Score fitted programs on the same test data by the same code; with ``out``, write compare.json and compare.md.

    ``models`` maps a name to a fitted program: a user's own VAE, the built-in one, a GMM (see :func:`as_fitted`).
    Each gets per-image log p(x) (exact with one draw when its guide has no latent, else importance-sampled
    with ``k`` draws), the ELBO and bits/dim; with ``labels``, clustering scores: from ``Fitted.clusters``, a
    model's ``assign``, or a mixture fitted on its posterior means (active units). ``notes`` end the report;
    ``title`` heads it (default: the names joined by "vs"). With ``method`` ``ais``, a model with latents is scored
    by AIS (``steps``, ``chains``, ``leapfrog``) and its IS estimate and k̂ are kept beside it; every row says which
    estimator gave its number, and every IS number comes with the share of images whose k̂ > 0.7.
    """
    if not models:
        raise PyrovaeError("compare needs at least one fitted program")
    if method not in ("is", "ais"):
        raise PyrovaeError(f"unknown method {method!r} for compare; choose is or ais")
    fitted = {name: as_fitted(name, entry) for name, entry in models.items()}
    y = None if labels is None else np.asarray(torch.as_tensor(labels).cpu())
    n_test, dims = len(x), int(x[0].numel())
    pyro.set_rng_seed(seed)
    rows: dict[str, dict[str, Any]] = {}
    for name, f in fitted.items():
        t0 = time.perf_counter()
        exact = not _has_latents(f.guide, x, *f.args)
        res = evaluate_points(
            f.model, f.guide, x, *f.args, num_samples=1 if exact else k, memory_mb=memory_mb, progress=progress
        )
        log_p = res.log_likelihood.double()
        if exact and callable(getattr(f.owner, "log_prob", None)):
            reference = f.owner.log_prob(x).detach().cpu().double()
            if not torch.allclose(log_p, reference, rtol=1e-4, atol=1e-2):
                raise PyrovaeError(f"internal check failed: {name}'s one-draw and exact log p(x) differ")
        khat_bad = None if exact else khat_summary(res.khat)["khat_bad"]
        row: dict[str, Any] = {
            "model": f.description or name,
            "log_likelihood": float(log_p.mean()),
            "log_likelihood_sem": float(log_p.std() / math.sqrt(n_test)) if n_test > 1 else None,
            "elbo": float(res.elbo.double().mean()),
            "bits_per_dim": bits_per_dim(log_p.mean(), dims, bits_per_dim_kind),
            "estimator": "exact" if exact else "is",
            "khat_bad": khat_bad,
            "likelihood_kind": "exact" if exact else f"importance-sampled, K={k}",
            "clustering": None,
            "parameters": f.parameters,
            "train_seconds": f.train_seconds,
            "eval_seconds": time.perf_counter() - t0,
        }
        if method == "ais" and not exact:
            a = annealed_log_likelihood(
                f.model,
                f.guide,
                x,
                *f.args,
                num_steps=steps,
                num_chains=chains,
                num_leapfrog=leapfrog,
                memory_mb=memory_mb,
            )
            ais_lp = a.log_likelihood.double()
            row["importance_sampled"] = {"k": k, "log_likelihood": row["log_likelihood"], "khat_bad": khat_bad}
            row.update(
                estimator="ais",
                log_likelihood=float(ais_lp.mean()),
                log_likelihood_sem=float(ais_lp.std() / math.sqrt(n_test)) if n_test > 1 else None,
                bits_per_dim=bits_per_dim(ais_lp.mean(), dims, bits_per_dim_kind),
                likelihood_kind=f"AIS, {steps} steps x {chains} chains x {leapfrog} leapfrog",
                ais_mc_stderr=float(a.stderr.double().nan_to_num(0.0).pow(2).sum().sqrt() / n_test),
                ais_acceptance=float(a.acceptance.double().mean()),
                eval_seconds=time.perf_counter() - t0,
            )
        if y is not None:
            clusters, source = _clusters(f, x, res.z_mean, len(np.unique(y)), seed)
            if clusters is not None:
                row["clustering"] = {"source": source, **clustering_scores(y, clusters)}
        rows[name] = row
    summary = {
        "representation": representation,
        "bits_per_dim_kind": bits_per_dim_kind,
        "dataset": dataset,
        "n_train": n_train,
        "n_test": n_test,
        "k": k,
        "method": method,
        "settings": settings or {},
        "models": rows,
        "notes": list(notes),
        "title": title or " vs ".join(fitted),
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "compare.json", summary)
        write_text(out / "compare.md", _markdown(summary))
    return summary


def _has_latents(guide: Callable, x: torch.Tensor, *args: Any) -> bool:
    """Whether the guide samples anything (off the RNG): without latents, one draw gives the exact log p(x)."""
    with off_rng(x.device), torch.no_grad():
        tr = pyro.poutine.trace(guide).get_trace(x, *args)
    return any(site["type"] == "sample" and not site_is_subsample(site) for site in tr.nodes.values())


def _clusters(f: Fitted, x: torch.Tensor, z_mean: torch.Tensor | None, n_classes: int, seed: int):
    """A cluster per test point and where it came from, or (None, "") when the program offers none."""
    if f.clusters is not None:
        return np.asarray(f.clusters), f.clustering_source or "given"
    if callable(getattr(f.owner, "assign", None)):
        return f.owner.assign(x).cpu().numpy(), "mixture on pixels"
    if z_mean is None or len(z_mean) < n_classes:
        return None, ""
    active = z_mean.var(0) > ACTIVE_THRESHOLD
    if not bool(active.any()):
        active = torch.ones_like(active)
    gmm, _ = fit_mixture_latent(z_mean[:, active].to(x.device), n_classes, seed)
    source = f"{n_classes}-component GMM on test latent means ({int(active.sum())} active units)"
    return gmm.assign(z_mean[:, active].to(x.device)).cpu().numpy(), source


@dataclass(frozen=True)
class CompareOptions:
    """What ``run_compare`` trains or loads, and how it evaluates: the settings of one comparison."""

    out: str = "runs/compare"
    representation: str = "binary"  # a key of REPRESENTATIONS
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    root: str | None = None
    download: bool = False
    train_size: int | None = None
    vae_run: str | None = None  # load the VAE from this run folder instead of training one
    arch: str = "iwae"
    likelihood: str | None = None  # None: the representation's decoder
    epochs: int = 10
    gmm_run: str | None = None  # load the mixture from this folder (a comparison's gmm/) instead of training
    gmm_k: int = 10
    gmm_covariance: str = "diag"
    gmm_epochs: int = 20
    k: int = 1000
    n: int | None = None
    memory_mb: float = 1024.0
    method: str = "is"  # is, or ais: the VAE scored by AIS, IS kept beside it
    steps: int = DEFAULT_STEPS
    chains: int = DEFAULT_CHAINS
    leapfrog: int = DEFAULT_LEAPFROG
    device: str = "auto"
    seed: int = 0
    overwrite: bool = False
    no_figures: bool = False
    quiet: bool = False


def run_compare(options: CompareOptions) -> dict[str, Any]:
    """Train or load both models, evaluate them with the same code, write compare.json/.md and figures."""
    out = Path(options.out)
    if options.representation not in REPRESENTATIONS:
        raise PyrovaeError(f"unknown representation {options.representation!r}; choose {', '.join(REPRESENTATIONS)}")
    vae_settings, family, bpd_kind = REPRESENTATIONS[options.representation]
    if (out / "compare.json").exists() and not options.overwrite:
        raise PyrovaeError(f"{out} already holds a comparison; pass --overwrite to replace it or choose another --out")
    resolve_device(options.device)  # fail early on a bad device
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("vae", "gmm"):
        remove_files(out / sub)

    # -- the VAE: loaded from a run folder, or trained here on the representation's data
    if options.vae_run:
        cfg = read_config(options.vae_run)
        wanted = {k: v for k, v in vae_settings.items() if k != "likelihood"}
        if cfg.kind != "vae" or any(getattr(cfg.data, k) != v for k, v in wanted.items()):
            raise PyrovaeError(
                f"{options.vae_run} was trained on another representation than {options.representation!r}"
            )
        from ..runs import load_run

        cfg, splits, vae = load_run(options.vae_run, options.device)
        vae_seconds = sum(float(r) for r in _metric_column(Path(options.vae_run), "seconds"))
    else:
        given = {**vae_settings, "dataset": options.dataset, "data_dir": options.data_dir, "epochs": options.epochs}
        given.update({"train_size": options.train_size, "device": options.device, "seed": options.seed})
        given.update({"arch": options.arch, "root": options.root, "download": options.download})
        if options.likelihood:
            given["likelihood"] = options.likelihood
        cfg = with_options(RunConfig(), given)
        t0 = time.perf_counter()
        splits, vae, _ = train_vae(cfg, out / "vae", quiet=options.quiet)
        vae_seconds = time.perf_counter() - t0
    n_test = min(options.n or len(splits.test), len(splits.test))
    x_test = splits.test.batch(torch.arange(n_test, device=splits.test.device))
    y_test = splits.test.labels[:n_test].cpu().numpy()

    # -- the mixture: loaded from a run folder, or trained here on the same split and device
    if options.gmm_run:
        gmm, gmm_seconds = load_mixture(Path(options.gmm_run), family, splits.train)
    else:
        gmm, gmm_seconds = fit_mixture(
            splits.train, options.gmm_k, family, options.gmm_covariance, options.gmm_epochs, out / "gmm", options.seed, options.quiet,
            data=cfg.data,
        )  # fmt: skip

    # -- clustering of the VAE: a mixture on its latent means, on the active units only (Var_x E[z_d|x] > 0.01):
    # collapsed units have posterior means ~0 with tiny spread, and a diagonal mixture would cluster on that noise.
    z_train = _latents(vae, splits.train)
    active = z_train.var(0) > ACTIVE_THRESHOLD
    if not bool(active.any()):
        active = torch.ones_like(active)
    z_test = vae.encoder(x_test)[0].detach()
    latent_gmm, _ = fit_mixture_latent(z_train[:, active], options.gmm_k, options.seed)
    latent_clusters = latent_gmm.assign(z_test[:, active]).cpu().numpy()

    # -- the same evaluation code for both
    models = {
        "vae": Fitted(
            vae.model,
            vae.guide,
            description=f"VAE ({cfg.model.arch}, z={vae.z_dim}, {cfg.model.likelihood} decoder, {cfg.training.elbo})",
            parameters=n_params(vae),
            train_seconds=vae_seconds,
            clusters=latent_clusters,
            clustering_source=f"{options.gmm_k}-component GMM on latent means ({int(active.sum())} active units)",
        ),
        "gmm": Fitted(
            gmm.model,
            gmm.guide,
            description=f"{family} mixture, K={options.gmm_k}"
            + (f", {options.gmm_covariance} covariance" if family == "gaussian" else ""),
            parameters=n_params(gmm),
            train_seconds=gmm_seconds,
            clusters=gmm.assign(x_test).cpu().numpy(),
            clustering_source="mixture on pixels",
            owner=gmm,
        ),
    }
    summary = compare(
        models,
        x_test,
        labels=y_test,
        k=options.k,
        out=out,
        bits_per_dim_kind=bpd_kind,
        memory_mb=options.memory_mb,
        seed=options.seed,
        dataset=cfg.data.dataset,
        representation=options.representation,
        n_train=len(splits.train),
        settings=asdict(options),
        notes=[
            "Figures: `samples_vae_vs_mixture.png` (left 8 columns: VAE, decoder means at z ~ N(0, I); right 8: "
            "mixture, component means at k ~ Cat(weights)), `mixture_means.png` (all component means), "
            "`latents_by_cluster.png` (VAE posterior means of the test images, PCA, coloured by latent-GMM cluster)."
        ],
        title="VAE vs mixture",
        progress=not options.quiet,
        method=options.method,
        steps=options.steps,
        chains=options.chains,
        leapfrog=options.leapfrog,
    )

    if not options.no_figures:
        from ..reports.figures import compare_figures

        summary["figures"] = compare_figures(vae, gmm, x_test, z_test, latent_clusters, out)
    return summary


def load_mixture(run_dir: Path, family: str, like) -> tuple[GMM, float]:
    """A mixture trained earlier (the ``gmm`` folder of a comparison), with its training seconds; its state
    (k-means scales included) comes from the checkpoint."""
    if not (run_dir / "config.json").is_file():
        raise PyrovaeError(f"{run_dir} is not a mixture run folder: no config.json")
    if (run_dir / "model.pt").is_file():  # written by an earlier release: its whole state_dict in model.pt
        return _load_old_mixture(run_dir, family, like)
    cfg = read_config(run_dir)
    if cfg.kind != "gmm" or cfg.model.family != family:
        raise PyrovaeError(f"{run_dir} holds no {family} mixture, as this representation needs")
    m = cfg.model
    gmm = GMM(m.k, like.shape, covariance=m.covariance, family=family).to(like.device)
    load_module_state(gmm, run_dir / "checkpoint.pt", like.device)
    return gmm, sum(float(r) for r in _metric_column(run_dir, "seconds"))


def _load_old_mixture(run_dir: Path, family: str, like) -> tuple[GMM, float]:
    """A mixture folder of an earlier release: a flat config (``model: gmm``, ``k``, ``family``, ``covariance``) and
    the state_dict, buffers included, in ``model.pt``."""
    try:
        cfg = json.loads((run_dir / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PyrovaeError(f"{run_dir / 'config.json'} is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict) or cfg.get("model") != "gmm" or cfg.get("family") != family:
        raise PyrovaeError(f"{run_dir} holds no {family} mixture, as this representation needs")
    k, covariance = cfg.get("k"), cfg.get("covariance")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1 or covariance not in ("diag", "full"):
        raise PyrovaeError(f"{run_dir / 'config.json'}: 'k' or 'covariance' is missing or not valid")
    gmm = GMM(k, like.shape, covariance=covariance, family=family).to(like.device)
    state = load_checkpoint(run_dir / "model.pt", map_location=like.device)
    load_modules(run_dir / "model.pt", {"model": state}, {"model": gmm})
    return gmm, sum(float(r) for r in _metric_column(run_dir, "seconds"))


def fit_mixture_latent(z: torch.Tensor, k: int, seed: int, covariance: str = "full") -> tuple[GMM, float]:
    """A GMM on latent codes (a plain tensor), by the same fit. Full covariance by default: the posterior
    means mix units of variance ~1 with barely active ones (~0.01); a diagonal mixture spends its
    components on the sharp structure of the latter (Fashion-MNIST: NMI 0.06 diag vs 0.56 full)."""
    from ..data import TensorData

    t0 = time.perf_counter()
    pyro.set_rng_seed(seed)
    gmm = GMM(k, z.shape[1], covariance=covariance, name="latent_gmm").to(z.device)
    gmm.initialize(z, generator=torch.Generator(device=z.device).manual_seed(seed))
    fit(gmm.model, gmm.guide, TensorData(z), elbo=gmm.elbo(), epochs=10, batch_size=512, lr=0.02, quiet=True)
    return gmm, time.perf_counter() - t0


def _metric_column(run_dir: Path, column: str) -> list[str]:
    import csv

    path = run_dir / "metrics.csv"
    return [row[column] for row in csv.DictReader(open(path))] if path.is_file() else []


def _how(r: dict[str, Any]) -> str:
    """Which estimator gave the row's number, and what checks it: an IS number's share of images with k̂ > 0.7."""
    how = r["likelihood_kind"]
    if r.get("estimator") == "is":
        how += f"; k̂ > 0.7 for {fmt(r.get('khat_bad'), '.1%')}"
    if r.get("estimator") == "ais":
        is_ = r["importance_sampled"]
        how += (
            f" (MC s.e. {fmt(r['ais_mc_stderr'], '.3f')}, acceptance {fmt(r['ais_acceptance'], '.2f')}); "
            f"IS K={is_['k']}: {fmt(is_['log_likelihood'])}, k̂ > 0.7 for {fmt(is_['khat_bad'], '.1%')}"
        )
    return how


def _markdown(s: dict[str, Any]) -> str:
    bpd = {
        "binary": "bits/dim (binary pixels)",
        "dequantized": "bits/dim (8-bit, dequantised)",
    }.get(s["bits_per_dim_kind"], "bits/dim")
    data = s["dataset"] or "the test data"
    lines = [
        f"# {s.get('title') or ' vs '.join(s['models'])} on {data}"
        + (f", representation: {s['representation']}" if s["representation"] else ""),
        "",
        f"Test images: {s['n_test']} · training images: {s['n_train'] if s['n_train'] is not None else 'n/a'}"
        + (
            f" · all numbers on the {s['representation']} representation only (never compare across representations)."
            if s["representation"]
            else "."
        ),
        "",
    ]
    header = ["model", "log p(x) nats/image", "± s.e.", bpd, "how", "NMI", "ARI", "accuracy", "clusters from"]
    rows = []
    for r in s["models"].values():
        c = r["clustering"] or {}
        rows.append(
            [r["model"], f"{r['log_likelihood']:.2f}", fmt(r["log_likelihood_sem"]), fmt(r["bits_per_dim"], ".4f")]
            + [_how(r), fmt(c.get("nmi"), ".3f"), fmt(c.get("ari"), ".3f"), fmt(c.get("accuracy"), ".3f")]
            + [c.get("source", "n/a"), fmt(r["parameters"], ","), fmt(r["train_seconds"], ".0f")]
        )
    lines += [*markdown_table([*header, "parameters", "train s"], rows), ""]
    for name, r in s["models"].items():
        if r["likelihood_kind"] != "exact":
            gap = r["log_likelihood"] - r["elbo"]
            label = name.upper() if name == "vae" else name  # "VAE test ELBO", as the report always said
            lines.append(f"{label} test ELBO: {r['elbo']:.2f} nats/image (gap to log p̂: {gap:.2f}).")
    lines.append("")
    for note in s.get("notes", []):
        lines += [note, ""]
    lines += ["Settings: `" + json.dumps(s["settings"], default=str) + "`", ""]
    return "\n".join(lines)
