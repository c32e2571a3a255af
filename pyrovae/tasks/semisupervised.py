"""Semi-supervised learning as a task: labelled subsets, M2 (:mod:`pyrovae.models.m2`) and a classifier baseline
trained by ``fit``, accuracy, and the run folder and report of ``pyrovae semisupervised``."""

from __future__ import annotations

import functools
import math
import sys
import time
from pathlib import Path
from typing import Any

import pyro
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PyrovaeError
from ..infer.paramstore import fresh_param_store
from ..models.m2 import M2, Classifier
from ..reports.markdown import markdown_table


def _take(images, idx: torch.Tensor) -> torch.Tensor:
    return images.batch(idx) if hasattr(images, "batch") else images[idx]


def balanced_labels(y: torch.Tensor, n_labels: int, n_classes: int = 10, seed: int = 0) -> torch.Tensor:
    """Indices of ``n_labels`` examples, ``n_labels / n_classes`` of each class, drawn with a seed."""
    if n_labels < n_classes or n_labels % n_classes:
        raise PyrovaeError(f"--labels must be a positive multiple of the {n_classes} classes, got {n_labels}")
    per = n_labels // n_classes
    g = torch.Generator().manual_seed(seed)
    y = y.cpu()
    picked = []
    for c in range(n_classes):
        members = (y == c).nonzero().flatten()
        if len(members) < per:
            raise PyrovaeError(f"class {c} has {len(members)} training examples, fewer than the {per} asked for")
        picked.append(members[torch.randperm(len(members), generator=g)[:per]])
    return torch.cat(picked).sort().values


class SemiSupervisedData:
    """A dataset for ``fit``: batches (x_unlabelled, x_labelled, y_labelled).

    ``images`` is an ImageData (fresh binarisation per batch) or a tensor. Indices from ``fit`` pick
    unlabelled images (all but ``labelled_idx``); each batch adds ``labelled_batch`` labelled ones
    drawn uniformly with replacement.
    """

    def __init__(self, images, labels: torch.Tensor, labelled_idx: torch.Tensor, labelled_batch: int = 50) -> None:
        n = len(images)
        device = labels.device
        self.images, self.labels = images, labels
        self.labelled = labelled_idx.to(device)
        mask = torch.ones(n, dtype=torch.bool, device=device)
        mask[self.labelled] = False
        self.unlabelled = mask.nonzero().flatten()
        if len(self.unlabelled) == 0:
            raise PyrovaeError("every training image is labelled: nothing for the unlabelled part")
        self.labelled_batch = max(1, min(labelled_batch, len(self.labelled)))
        self.device = device

    def __len__(self) -> int:
        return len(self.unlabelled)

    @property
    def num_labelled(self) -> int:
        return len(self.labelled)

    def labelled_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All labelled images (one draw) and their labels."""
        return _take(self.images, self.labelled), self.labels[self.labelled]

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        j = self.labelled[torch.randint(len(self.labelled), (self.labelled_batch,), device=self.device)]
        return _take(self.images, self.unlabelled[idx]), _take(self.images, j), self.labels[j]


# ---------------------------------------------------------------------------------------- training
def train_m2(
    m2: M2,
    data: SemiSupervisedData,
    *,
    epochs: int = 10,
    batch_size: int = 100,
    lr: float = 1e-3,
    alpha_scale: float = 1.0,
    seed: int = 0,
    test: tuple[torch.Tensor, torch.Tensor] | None = None,
    quiet: bool = True,
):
    """Train M2 by ``fit`` with TraceEnum_ELBO; α = ``alpha_scale`` · N. With ``test`` (x, y), each epoch's
    history row gets ``test_accuracy`` of q(y | x). Returns ``fit``'s result."""
    from ..train import fit

    m2.alpha = alpha_scale * (len(data) + data.num_labelled)

    def record(row: dict[str, float]) -> None:
        if test is not None:
            row["test_accuracy"] = accuracy(m2.predict(test[0]), test[1])
            if not quiet:
                print(f"  epoch {row['epoch']}: q(y|x) test accuracy {row['test_accuracy']:.3f}", file=sys.stderr)

    model = functools.partial(m2.model, num_labelled=data.num_labelled)
    guide = functools.partial(m2.guide, num_labelled=data.num_labelled)
    with fresh_param_store():  # M2's modules keep their parameters; the caller's store is left alone
        return fit(
            model, guide, data, elbo=m2.elbo(), epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, quiet=quiet,
            callback=record,
        )  # fmt: skip


def train_classifier(
    classifier: nn.Module,
    images,
    labels: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 50,
    lr: float = 1e-3,
    seed: int = 0,
) -> nn.Module:
    """The supervised baseline: plain cross-entropy and Adam on the labelled examples only, ``steps`` minibatches
    drawn with replacement (``images`` an ImageData or a tensor, as in :class:`SemiSupervisedData`)."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(classifier.parameters(), lr=lr)
    n = len(labels)
    idx_all = torch.arange(n, device=labels.device)
    for _ in range(steps):
        j = idx_all[torch.randint(n, (min(batch_size, n),), device=labels.device)]
        loss = F.cross_entropy(classifier(_take(images, j)), labels[j])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return classifier.eval()


def accuracy(predicted: torch.Tensor, y: torch.Tensor) -> float:
    return float((predicted.to(y.device) == y).double().mean())


@torch.no_grad()
def predict(classifier: nn.Module, x: torch.Tensor, batch_size: int = 2000) -> torch.Tensor:
    return torch.cat([classifier(b).argmax(-1) for b in x.split(batch_size)])


# -------------------------------------------------------------------------------------------- run
class _Subset:
    """Some images of an ImageData, still drawn fresh per batch (for the baseline's labelled examples)."""

    def __init__(self, images, idx: torch.Tensor) -> None:
        self.images, self.idx = images, idx

    def batch(self, j: torch.Tensor) -> torch.Tensor:
        return _take(self.images, self.idx[j])

    def __len__(self) -> int:
        return len(self.idx)


def run_semisupervised(
    out: str | Path,
    *,
    dataset: str = "fashion-mnist",
    data_dir: str | None = None,
    labels: int = 100,
    epochs: int = 10,
    batch_size: int = 100,
    labelled_batch: int = 50,
    lr: float = 1e-3,
    alpha_scale: float = 1.0,
    likelihood: str = "bernoulli",
    binarize: str = "dynamic",
    hidden: tuple[int, ...] = (500,),
    z_dim: int = 50,
    train_size: int | None = None,
    seed: int = 0,
    device: str = "auto",
    overwrite: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    """M2 on ``labels`` balanced labels plus the unlabelled rest, against the same classifier trained on the
    labels alone; writes ssl.json, ssl.md and samples_per_class.png into ``out``."""
    from ..config import DataConfig, LabelsConfig, M2Config, RunConfig, TrainingConfig
    from ..data import Pixels, load_dataset, make_splits, synthetic
    from ..runs import record_config, resolve_device
    from ..train import atomic_write, write_json
    from ..train.state import module_states

    out = Path(out)
    if (out / "ssl.json").exists() and not overwrite:
        raise PyrovaeError(f"{out} already holds a semi-supervised run; pass --overwrite or choose another --out")
    for name, v in (("--epochs", epochs), ("--batch-size", batch_size), ("--labelled-batch", labelled_batch)):
        if v < 1:
            raise PyrovaeError(f"{name} must be at least 1, got {v}")
    if not lr > 0 or not alpha_scale >= 0:
        raise PyrovaeError(f"need --lr > 0 and --alpha-scale >= 0, got {lr} and {alpha_scale}")
    dev = resolve_device(device)
    t0 = time.perf_counter()
    raw = synthetic(seed=seed) if dataset == "synthetic" else load_dataset(dataset, data_dir)
    splits = make_splits(raw, Pixels(binarize), dev, val_size=0, train_size=train_size, seed=seed)
    train, test = splits.train, splits.test
    n_classes = int(raw.train_y.max()) + 1
    labelled_idx = balanced_labels(train.labels, labels, n_classes, seed)
    data = SemiSupervisedData(train, train.labels, labelled_idx.to(dev), labelled_batch)
    x_test, y_test = test.all(), test.labels

    pyro.set_rng_seed(seed)
    m2 = M2(train.shape, likelihood, hidden, z_dim, n_classes).to(dev)
    m2.likelihood.check_support(train.batch(torch.arange(min(1000, len(train)), device=dev)))
    init = {k: v.clone() for k, v in m2.classifier.state_dict().items()}
    result = train_m2(
        m2, data, epochs=epochs, batch_size=batch_size, lr=lr, alpha_scale=alpha_scale, seed=seed,
        test=(x_test, y_test), quiet=quiet,
    )  # fmt: skip
    m2.eval()
    t_m2 = time.perf_counter() - t0
    steps = epochs * math.ceil(len(data) / batch_size)

    # the baseline: the same classifier architecture and initial weights, the same labelled examples
    t1 = time.perf_counter()
    baseline = Classifier(train.shape, hidden, n_classes, "softplus").to(dev)
    baseline.load_state_dict(init)
    train_classifier(
        baseline, _Subset(train, labelled_idx.to(dev)), train.labels[labelled_idx.to(dev)], steps=steps,
        batch_size=data.labelled_batch, lr=lr, seed=seed,
    )  # fmt: skip
    t_base = time.perf_counter() - t1

    acc_m2 = accuracy(m2.predict(x_test), y_test)
    acc_base = accuracy(predict(baseline, x_test), y_test)
    out.mkdir(parents=True, exist_ok=True)
    pyro.set_rng_seed(seed + 1)
    grid = m2.sample_per_class(10, x_test).clamp(0, 1).cpu()
    from ..reports.figures import save_image

    save_image(grid, out / "samples_per_class.png", nrow=10, padding=1, pad_value=1.0)
    summary: dict[str, Any] = {
        "dataset": dataset,
        "labels": labels,
        "labels_per_class": labels // n_classes,
        "n_unlabelled": len(data),
        "n_test": len(y_test),
        "epochs": epochs,
        "steps": steps,
        "m2": {
            "test_accuracy": acc_m2,
            "test_error": 1 - acc_m2,
            "accuracy_per_epoch": [r.get("test_accuracy") for r in result.history],
            "final_objective": result.history[-1]["train_elbo"] if result.history else None,
            "alpha": m2.alpha,
            "seconds": t_m2,
        },
        "baseline": {
            "model": "the same q(y|x) MLP, same initial weights, cross-entropy on the labelled examples only",
            "test_accuracy": acc_base,
            "test_error": 1 - acc_base,
            "steps": steps,
            "seconds": t_base,
        },
        "settings": {
            "likelihood": likelihood,
            "binarize": binarize,
            "hidden": list(hidden),
            "z_dim": z_dim,
            "activation": "softplus",
            "batch_size": batch_size,
            "labelled_batch": data.labelled_batch,
            "lr": lr,
            "alpha_scale": alpha_scale,
            "seed": seed,
            "train_size": train_size,
            "data_source": splits.source,
        },
        "figure": "samples_per_class.png",
    }
    write_json(out / "ssl.json", summary)
    atomic_write(out / "ssl.md", lambda f: f.write(_markdown(summary).encode()))
    state = {"modules": module_states({"model": m2}), "params": {}}  # read back by pyrovae.load_run
    atomic_write(out / "m2.pt", lambda f: torch.save(state, f))
    cfg = RunConfig(
        kind="semisupervised",
        data=DataConfig(dataset=dataset, data_dir=data_dir, binarize=binarize, val_size=0, train_size=train_size),
        model=M2Config(likelihood, tuple(hidden), z_dim, float(alpha_scale), n_classes),
        training=TrainingConfig(
            elbo="trace-enum", epochs=epochs, batch_size=batch_size, lr=float(lr), seed=seed, device=device
        ),
        extra=LabelsConfig(labels, data.labelled_batch),
    )
    write_json(out / "config.json", record_config(cfg, {"data_source": splits.source, "n_train": len(train)}).to_dict())
    return summary


def _markdown(s: dict[str, Any]) -> str:
    m2, base, st = s["m2"], s["baseline"], s["settings"]
    hidden = "-".join(map(str, st["hidden"]))
    lines = [
        f"# M2 (Kingma et al. 2014) on {s['dataset']} with {s['labels']} labels ({s['labels_per_class']} per class)",
        "",
        f"{s['n_unlabelled']} unlabelled training images, {s['n_test']} test images; {s['epochs']} epochs "
        f"({s['steps']} steps of {st['batch_size']} unlabelled + {st['labelled_batch']} labelled images).",
        "",
        *markdown_table(
            ["classifier q(y\\|x)", "test accuracy", "test error", "trained on", "seconds"],
            [
                [
                    "M2",
                    f"{m2['test_accuracy']:.4f}",
                    f"{m2['test_error']:.4f}",
                    f"{s['labels']} labelled + {s['n_unlabelled']} unlabelled",
                    f"{m2['seconds']:.0f}",
                ],
                [
                    "supervised baseline",
                    f"{base['test_accuracy']:.4f}",
                    f"{base['test_error']:.4f}",
                    f"{s['labels']} labelled only, {base['steps']} cross-entropy steps",
                    f"{base['seconds']:.0f}",
                ],
            ],
        ),
        "",
        f"Both classifiers: MLP {hidden} softplus, the same initial weights and examples; Adam lr {st['lr']}. "
        f"M2: z of {st['z_dim']}, {st['likelihood']} decoder ({st['binarize']} binarisation), "
        f"α = {st['alpha_scale']}·N = {m2['alpha']:.0f}.",
        "",
        "M2 test accuracy per epoch: " + ", ".join(f"{a:.3f}" for a in m2["accuracy_per_epoch"] if a is not None),
        "",
        "Figure: `samples_per_class.png`, one row per class (0-9); each column shares one z ~ N(0, I), "
        "so a column changes only y. Images are the decoder's means.",
        "",
    ]
    return "\n".join(lines)


__all__ = [
    "SemiSupervisedData",
    "accuracy",
    "balanced_labels",
    "predict",
    "run_semisupervised",
    "train_classifier",
    "train_m2",
]
