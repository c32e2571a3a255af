"""``pyrovae zoo``: every model of the zoo trained by the same ``fit`` on the same split and seed, scored by the
same estimator, on one leaderboard.

Layout of ``out``: ``zoo.json`` (the settings every row shares), one folder per model (``fit``'s run folder:
``checkpoint.pt``, ``metrics.csv``, ``config.json``; then ``score.json`` and ``samples.npy``), and the
leaderboard (``leaderboard.md``, ``.json``, ``.png``), rewritten after every model. An interrupted zoo resumes
where it stopped: a scored model is kept, a trained one is scored, a half-trained one resumes from its checkpoint.

Scoring goes through :func:`score` alone, which dispatches on the estimator's name (``SCORERS``): importance
sampling with the guide as proposal (``is``, K draws, with the share of datapoints whose PSIS k̂ > 0.7 beside the
number), or annealed importance sampling (``ais``, its default schedule, with the IS number and k̂ kept beside it).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
from torch import nn

from ..data import Call, ImageData
from ..errors import PyrovaeError
from ..files import RunLock, atomic_write, check_writable_folder, save_figure, write_json, write_text
from ..infer.importance import active_units, evaluate_points, khat_summary
from ..models.gmm import GMM
from ..models.zoo import ENTRIES, ZooEntry, training_pair, zoo_names
from ..reports.markdown import fmt, markdown_table
from ..runs import build_zoo_module, resolve_device, zoo_splits
from ..train import fit, load_training_checkpoint
from ..train.state import load_modules
from .gap import inference_gaps

QUICK = {"epochs": 3, "train_size": 5000, "k": 1000, "n": 200}  # --quick: about 20 minutes on a loaded 2-core CPU
FULL = {"epochs": 10, "train_size": None, "k": 5000, "n": 1000}
SHARED = ("dataset", "train_size", "epochs", "batch_size", "k", "n", "estimator", "seed")  # what every row shares
SAMPLES = 8  # images per model in leaderboard.png
GAP_N = 100  # the inference-gap split of the rows that ask for it: the first test images


@dataclass
class ZooOptions:
    """Settings of one zoo; ``None`` takes the value of the quick or the full setting (``QUICK``, ``FULL``)."""

    out: str
    models: str = "all"
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    root: str | None = None
    download: bool = False
    epochs: int | None = None
    train_size: int | None = None
    k: int | None = None
    n: int | None = None
    batch_size: int = 100
    estimator: str = "ais"
    seed: int = 0
    device: str = "cpu"
    quick: bool = False
    memory_mb: float | None = None
    figures: bool = True
    log: Callable[[str], None] | None = None  # progress lines (the command line prints them on stderr)

    def resolved(self) -> ZooOptions:
        """The options with the preset's values in place of ``None``."""
        preset = QUICK if self.quick else FULL
        return replace(self, **{key: preset[key] for key, v in asdict(self).items() if key in preset and v is None})


# ---------------------------------------------------------------------------------------------------- scoring
def importance_score(
    model: Callable, guide: Callable, x: torch.Tensor, *, k: int, memory_mb: float | None = None, **kwargs: Any
) -> dict[str, Any]:
    """log p̂(x) by importance sampling with the guide as proposal (K draws per image), with the ELBO and KL of the
    same draws, active units and the PSIS k̂ shares."""
    ev = evaluate_points(model, guide, x, num_samples=k, memory_mb=memory_mb, **kwargs)
    lp = ev.log_likelihood.double()
    z = ev.z_mean
    units = None if z is None or not torch.isfinite(z).all() else active_units(z)
    return {
        "log_likelihood": float(lp.mean()),
        "log_likelihood_sem": float(lp.std() / math.sqrt(len(lp))) if len(lp) > 1 else None,
        "elbo": float(ev.elbo.double().mean()),
        "kl": float(ev.kl.double().mean()),
        "gap": float(ev.gap.double().mean()),
        "active_units": units,
        **khat_summary(ev.khat),
        "estimator": f"IS, K={k}",
        "points": {"log_likelihood": lp.tolist(), "gap": ev.gap.double().tolist()},  # per image, for paired checks
    }


def annealed_score(
    model: Callable, guide: Callable, x: torch.Tensor, *, k: int, memory_mb: float | None = None, **kwargs: Any
) -> dict[str, Any]:
    """log p̂(x) by AIS (the default schedule of :func:`pyrovae.infer.ais.annealed_log_likelihood`), with the IS row's
    ELBO, KL, active units and k̂ beside it and the IS estimate kept as ``is_log_likelihood``. A program AIS cannot
    run (a discrete guide site; no continuous latent) keeps its IS number, and its estimator label says why."""
    from ..infer.ais import annealed_log_likelihood

    row = importance_score(model, guide, x, k=k, memory_mb=memory_mb, **kwargs)
    try:
        est = annealed_log_likelihood(model, guide, x, memory_mb=memory_mb, **kwargs)
    except PyrovaeError as e:
        row["estimator"] += f" (AIS refused: {e})"
        return row
    lp = est.log_likelihood.double()
    elbo = torch.tensor(row["points"]["log_likelihood"], dtype=torch.float64) - torch.tensor(
        row["points"]["gap"], dtype=torch.float64
    )
    row.update(
        is_log_likelihood=row["log_likelihood"],
        log_likelihood=float(lp.mean()),
        log_likelihood_sem=float(lp.std() / math.sqrt(len(lp))) if len(lp) > 1 else None,
        ais_stderr=float(est.stderr.double().mean()),
        ais_acceptance=float(est.acceptance.double().mean()),
        gap=float((lp - elbo).mean()),
        estimator=f"AIS, {est.steps} steps x {est.chains} chains x {est.leapfrog} leapfrog",
        points={"log_likelihood": lp.tolist(), "gap": (lp - elbo).tolist()},
    )
    return row


SCORERS: dict[str, Callable[..., dict[str, Any]]] = {"is": importance_score, "ais": annealed_score}


def score(
    model: Callable, guide: Callable, x: torch.Tensor, *, estimator: str = "ais", k: int = 5000, **kwargs: Any
) -> dict[str, Any]:
    """The one estimate of log p(x) every zoo row gets: ``SCORERS[estimator]`` on the model/guide pair."""
    if estimator not in SCORERS:
        raise PyrovaeError(f"unknown estimator {estimator!r}; choose one of {', '.join(SCORERS)}")
    return SCORERS[estimator](model, guide, x, k=k, **kwargs)


# ------------------------------------------------------------------------------------------------------- data
class Labelled:
    """A split's images with their labels as the keyword ``y``: what a conditional program takes."""

    def __init__(self, images: ImageData) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, idx: torch.Tensor) -> Call:
        return Call((self.images.batch(idx),), {"y": self.images.labels[idx]})


def _splits(opts: ZooOptions, device: torch.device):
    return zoo_splits(opts.dataset, opts.train_size, opts.seed, device, opts.data_dir, opts.root, opts.download)


# --------------------------------------------------------------------------------------------------- one row
def _train(entry: ZooEntry, module: nn.Module, splits, folder: Path, opts: ZooOptions, say: Callable) -> None:
    """Train ``module`` into ``folder``, resuming from its checkpoint; a finished checkpoint is only loaded."""
    ckpt = folder / "checkpoint.pt"
    if ckpt.exists():
        saved = load_training_checkpoint(ckpt, map_location=splits.train.device)
        if saved["epoch"] >= opts.epochs:
            load_modules(ckpt, saved.get("modules"), {"model": module})
            return
        say(f"{entry.name}: resuming after epoch {saved['epoch']}")
    model, guide = training_pair(module)

    def progress(row: dict[str, float]) -> None:
        say(f"{entry.name}: epoch {int(row['epoch'])}/{opts.epochs}, val ELBO {row['val_elbo']:.2f}")

    fit(
        model,
        guide,
        Labelled(splits.train) if entry.conditional else splits.train,
        elbo=entry.elbo(module),
        particles=entry.particles,
        epochs=opts.epochs,
        batch_size=opts.batch_size,
        lr=entry.lr,
        val_data=Labelled(splits.val) if entry.conditional else splits.val,
        out=folder,
        resume=ckpt.exists(),
        seed=opts.seed,
        quiet=True,
        callback=progress,
        modules={"model": module},
        config={"kind": "zoo", "model": entry.name, **{key: getattr(opts, key) for key in SHARED}},
    )


def _samples(module: nn.Module, like: torch.Tensor, seed: int) -> np.ndarray:
    pyro.set_rng_seed(seed)
    with torch.no_grad():
        if isinstance(module, GMM):  # the mixture: the mean image of each drawn component
            out = module.means[torch.multinomial(module.weights, SAMPLES, replacement=True)]
        else:
            out = module.sample(SAMPLES, like)
    return out.reshape(SAMPLES, -1, *like.shape[-2:]).float().cpu().numpy()


def _row(entry: ZooEntry, splits, folder: Path, opts: ZooOptions, say: Callable) -> dict[str, Any]:
    """Train (or resume) and score one model; its ``score.json`` is the row."""
    done = folder / "score.json"
    if done.exists():
        return json.loads(done.read_text())
    device = splits.train.device
    pyro.set_rng_seed(opts.seed)
    module = build_zoo_module(entry.name, splits)
    _train(entry, module, splits, folder, opts, say)
    module.eval()
    n = min(opts.n, len(splits.test))
    x = splits.test.batch(torch.arange(n, device=device))
    kwargs = {"y": splits.test.labels[:n]} if entry.conditional else {}
    say(f"{entry.name}: scoring {n} test images ({opts.estimator}, K={opts.k})")
    pyro.set_rng_seed(opts.seed)
    row = {"model": entry.name, "about": entry.about, "conditional": entry.conditional}
    t0 = time.perf_counter()
    row.update(score(module.model, module.guide, x, estimator=opts.estimator, k=opts.k, memory_mb=opts.memory_mb,
                     **kwargs))  # fmt: skip
    seconds = {"score": time.perf_counter() - t0}
    if entry.gap:
        t0 = time.perf_counter()
        row.update(_gaps(module, x[:GAP_N], opts, say, entry.name, row["points"]["log_likelihood"]))
        seconds["gap"] = time.perf_counter() - t0
    history = load_training_checkpoint(folder / "checkpoint.pt")["history"]
    row["parameters"] = sum(p.numel() for p in module.parameters() if p.requires_grad)
    row["seconds_per_epoch"] = float(np.mean([h["seconds"] for h in history])) if history else None
    row["seconds"] = {"train": float(sum(h["seconds"] for h in history)), **seconds}  # wall time of each phase
    row["epochs"] = len(history)
    row["val_elbo"] = history[-1]["val_elbo"] if history else None
    atomic_write(folder / "samples.npy", lambda f: np.save(f, _samples(module, x, opts.seed)))
    write_json(done, row)
    return row


def _gaps(
    module: nn.Module, x: torch.Tensor, opts: ZooOptions, say: Callable, name: str, log_p: list[float]
) -> dict[str, Any]:
    """``pyrovae gap``'s split of the inference gap on ``x``: q* is the best member of the guide's own family per
    image (for the flow guide, the flows' weights too), so the approximation gaps of two guide families compare.
    ``log_p``: the row's own estimate for the same images (AIS by default), beside IS with q* as proposal."""
    say(f"{name}: inference gap of {len(x)} test images (q* per image by SVI, K={opts.k})")
    pyro.set_rng_seed(opts.seed)
    g = inference_gaps(module, x, None, opts.k, seed=opts.seed, memory_mb=opts.memory_mb or 1024.0)
    by_row = torch.tensor(log_p[: len(x)], dtype=torch.float64) - g.elbo_qstar.double()
    return {
        "gap_family": g.family,
        "gap_n": len(x),
        "gap_steps": g.steps,
        "approximation_gap": float(g.approximation_gap.double().mean()),
        "approximation_gap_by_row_estimate": float(by_row.mean()),
        "amortization_gap": float(g.amortization_gap.double().mean()),
        "elbo_qstar": float(g.elbo_qstar.double().mean()),
        "khat_qstar_bad": float((g.khat_qstar > 0.7).double().mean()),
        "gap_points": {
            "approximation_gap": g.approximation_gap.double().tolist(),
            "amortization_gap": g.amortization_gap.double().tolist(),
            "approximation_gap_by_row_estimate": by_row.tolist(),
            "elbo_qstar": g.elbo_qstar.double().tolist(),
        },  # fmt: skip
    }


# ------------------------------------------------------------------------------------------------- the zoo
def _check_settings(out: Path, opts: ZooOptions) -> None:
    """A zoo in ``out`` resumes only with the settings it was started with (models may be added)."""
    path = out / "zoo.json"
    mine = {key: getattr(opts, key) for key in SHARED}
    if path.exists():
        theirs = json.loads(path.read_text())
        diff = next((key for key in SHARED if theirs.get(key) != mine[key]), None)
        if diff is not None:
            raise PyrovaeError(
                f"{out} holds a zoo with {diff} = {theirs.get(diff)!r}, not {mine[diff]!r}; "
                "resume it with its settings or use another --out"
            )
    else:
        write_json(path, mine)


def run_zoo(options: ZooOptions) -> dict[str, Any]:
    """Train and score the chosen models (resuming a zoo already in ``out``); write the leaderboard; return it."""
    opts = options.resolved()
    names = zoo_names(opts.models)
    if opts.epochs < 1 or opts.k < 1 or opts.n < 1 or opts.batch_size < 1:
        raise PyrovaeError(f"need --epochs, --k, --n, --batch-size >= 1; got {opts.epochs}, {opts.k}, {opts.n}, "
                           f"{opts.batch_size}")  # fmt: skip
    if opts.estimator not in SCORERS:
        raise PyrovaeError(f"unknown estimator {opts.estimator!r}; choose one of {', '.join(SCORERS)}")
    out = Path(opts.out)
    check_writable_folder(out)
    say = opts.log or (lambda line: None)
    device = resolve_device(opts.device)
    splits = _splits(opts, device)
    with RunLock(out):
        _check_settings(out, opts)
        rows = []
        for i, name in enumerate(names, 1):
            say(f"[{i}/{len(names)}] {name}")
            rows.append(_row(ENTRIES[name], splits, out / name, opts, say))
            write_leaderboard(out, _all_rows(out), opts, figures=opts.figures)
    return {"rows": rows, "out": str(out), **{key: getattr(opts, key) for key in SHARED}}


def _all_rows(out: Path) -> list[dict[str, Any]]:
    """Every scored row in ``out``, in the zoo's order (a zoo run model by model keeps them all)."""
    return [json.loads((out / n / "score.json").read_text()) for n in ENTRIES if (out / n / "score.json").exists()]


# ------------------------------------------------------------------------------------------------ leaderboard
ORDERINGS = (  # (claim, better, worse, column, higher is better), the published orderings the zoo checks
    ("IWAE (k=5) training ≥ ELBO training, two layers", "hvae-iwae5", "hvae", "log_likelihood", True),
    ("IWAE (k=50) training ≥ ELBO training, two layers", "hvae-iwae50", "hvae", "log_likelihood", True),
    ("two stochastic layers ≥ one", "hvae", "vae", "log_likelihood", True),
    ("VampPrior ≥ standard prior", "vampprior", "vae", "log_likelihood", True),
    ("flow guide's approximation gap < diagonal Gaussian's", "flow", "vae", "approximation_gap", False),
)


def orderings(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each published ordering whose two rows are present: the two numbers, whether it holds here, and the
    standard error of their difference paired over the same test images (far smaller than either row's); the
    verdict is "within noise" where the difference is within 2 of those standard errors."""
    by = {r["model"]: r for r in rows}
    out = []
    for claim, a, b, col, higher in ORDERINGS:
        if a in by and b in by and col in by[a] and col in by[b]:
            va, vb = by[a][col], by[b][col]
            pa, pb = (by[m].get("points", {}).get(col) or by[m].get("gap_points", {}).get(col) for m in (a, b))
            se = None
            if pa and pb and len(pa) == len(pb) > 1:
                d = np.asarray(pa) - np.asarray(pb)
                se = float(d.std(ddof=1) / math.sqrt(len(d)))
            holds = bool(va >= vb if higher else va < vb)
            noise = se is not None and abs(va - vb) <= 2 * se  # the sign alone says nothing within 2 s.e.
            out.append({"claim": claim, "models": [a, b], "column": col, "values": [va, vb], "difference": va - vb,
                        "difference_se": se, "holds": holds,
                        "verdict": "within noise" if noise else "yes" if holds else "no"})  # fmt: skip
    return out


def write_leaderboard(out: Path, rows: list[dict[str, Any]], opts: ZooOptions, figures: bool = True) -> None:
    """leaderboard.json, leaderboard.md and (with ``figures``) leaderboard.png: one row per scored model."""
    shared = {key: getattr(opts, key) for key in SHARED}
    checks = orderings(rows)
    brief = [
        {key: v for key, v in r.items() if key not in ("points", "gap_points")} for r in rows
    ]  # per image: score.json
    write_json(out / "leaderboard.json", {"settings": shared, "rows": brief, "orderings": checks})
    ranked = sorted(rows, key=lambda r: (r["conditional"], -r["log_likelihood"]))
    table = markdown_table(
        ["model", "log p̂ (nats)", "± s.e.", "estimator", "k̂ > 0.7", "ELBO", "KL", "log p̂ − ELBO", "active units",
         "parameters", "s/epoch", "minutes", "about"],
        [
            [r["model"], fmt(r["log_likelihood"]) + (" (log p(x|y))" if r["conditional"] else ""),
             fmt(r["log_likelihood_sem"]), r["estimator"], fmt(r["khat_bad"], ".0%"), fmt(r["elbo"]), fmt(r["kl"]),
             fmt(r["gap"]), fmt(r["active_units"], "d"), f"{r['parameters']:,}", fmt(r["seconds_per_epoch"], ".1f"),
             _minutes(r), r["about"]]
            for r in ranked
        ],
    )  # fmt: skip
    lines = [
        "# pyrovae zoo leaderboard",
        "",
        f"{shared['dataset']}, dynamically binarised; train size {shared['train_size'] or 'all'}, {shared['epochs']} "
        f"epochs of batch {shared['batch_size']}, seed {shared['seed']}; scored on the first {shared['n']} test images "
        f"(binarised once, seeded). Every number in nats per image.",
        "",
        *table,
        "",
        "k̂ > 0.7: share of test images whose importance weights have Pareto k̂ above 0.7 (their log p̂ is unreliable, "
        "usually too low). log p̂ − ELBO estimates KL(q(z|x) || p(z|x)), the inference gap. minutes: the model's wall "
        "time, (training + scoring [+ the gap's split]).",
        "",
        *_gap_lines(rows),
        "## Published orderings, measured here",
        "",
        *markdown_table(
            ["claim", "models", "values", "difference ± paired s.e.", "holds here"],
            [
                [
                    c["claim"],
                    " vs ".join(c["models"]),
                    " vs ".join(fmt(v) for v in c["values"]),
                    f"{c['difference']:.2f} ± {fmt(c['difference_se'])}",
                    c["verdict"],
                ]
                for c in checks
            ],
        ),  # fmt: skip
    ]
    write_text(out / "leaderboard.md", "\n".join(lines) + "\n")
    if figures and rows:
        _leaderboard_figure(out, ranked)


def _minutes(row: dict[str, Any]) -> str:
    """The row's wall time, training + scoring (+ the gap's split), in minutes."""
    parts = row.get("seconds")
    if not parts:
        return "–"
    return f"{sum(parts.values()) / 60:.1f} (" + " + ".join(f"{v / 60:.1f}" for v in parts.values()) + ")"


def _gap_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The inference-gap split of the rows that have one (``pyrovae gap``'s), as a table and a line."""
    split = [r for r in rows if "approximation_gap" in r]
    if not split:
        return []
    return [
        "## Inference gap, split (`pyrovae gap`)",
        "",
        *markdown_table(
            [
                "model",
                "guide family of q*",
                "images",
                "SVI steps",
                "approximation gap log p̂ − L[q*]",
                "the same, log p̂ by the row's estimator",
                "amortisation gap L[q*] − L[q]",
                "L[q*]",
                "k̂ > 0.7 (q*)",
            ],
            [
                [
                    r["model"],
                    r["gap_family"],
                    r["gap_n"],
                    fmt(r.get("gap_steps"), "d"),
                    fmt(r["approximation_gap"]),
                    fmt(r.get("approximation_gap_by_row_estimate")),
                    fmt(r["amortization_gap"]),
                    fmt(r["elbo_qstar"]),
                    fmt(r["khat_qstar_bad"], ".0%"),
                ]
                for r in split
            ],
        ),  # fmt: skip
        "",
        "q* is the best member of the guide's own family for each image on its own (fitted by the SVI steps shown, "
        "decoder frozen; the flow's weights per image too), log p̂ importance-sampled with q* as proposal (as `pyrovae gap` "
        "does; biased low where k̂ is bad, and the gap with it) and, in the next column, the row's own estimate of "
        "the same images (AIS by default).",
        "",
    ]


def _leaderboard_figure(out: Path, rows: list[dict[str, Any]]) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(SAMPLES * 0.8 + 1.6, 0.85 * len(rows) + 0.2))
    for i, r in enumerate(rows):
        imgs = np.load(out / r["model"] / "samples.npy", allow_pickle=False)  # (S, C, H, W)
        strip = np.concatenate([im[0] for im in imgs], axis=1)
        ax = fig.add_subplot(len(rows), 1, i + 1)
        ax.imshow(strip, cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(r["model"], rotation=0, ha="right", va="center", fontsize=9)
    fig.subplots_adjust(left=0.18, right=0.99, top=0.99, bottom=0.01, hspace=0.1)
    save_figure(fig, out / "leaderboard.png", dpi=100)


__all__ = ["ORDERINGS", "QUICK", "SCORERS", "ZooOptions", "annealed_score", "importance_score", "orderings", "run_zoo", "score",
           "write_leaderboard"]  # fmt: skip
