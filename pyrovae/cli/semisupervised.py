"""``pyrovae semisupervised``: :func:`pyrovae.tasks.semisupervised.run_semisupervised`, and a summary line."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..nn.likelihoods import LIKELIHOODS
from ..tasks.semisupervised import run_semisupervised
from .options import add_data_options, add_device_option, hidden, positive_float, positive_int, seed, sizes


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``pyrovae semisupervised``."""
    p = sub.add_parser(
        "semisupervised",
        help="M2 semi-supervised VAE on a few labels, against a supervised baseline",
        description="Train M2 (Kingma et al. 2014) on --labels balanced labels plus the unlabelled rest; "
        "write OUT/ssl.json, ssl.md and samples_per_class.png.",
    )
    add_data_options(p, only=("dataset", "data_dir", "binarize", "train_size"))
    p.set_defaults(dataset="fashion-mnist", binarize="dynamic")
    p.add_argument(
        "--labels", type=positive_int, default=100, help="labelled examples, balanced per class (default 100)"
    )
    p.add_argument("--epochs", type=positive_int, default=10, help="passes over the unlabelled images (default 10)")
    p.add_argument("--batch-size", type=positive_int, default=100, help="unlabelled images per step (default 100)")
    p.add_argument("--labelled-batch", type=positive_int, default=50, help="labelled images per step (default 50)")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument(
        "--alpha-scale", type=float, default=1.0, help="α = this · N for the classification term (default 1; paper 0.1)"
    )
    p.add_argument("--likelihood", choices=list(LIKELIHOODS), default="bernoulli", help="decoder (default bernoulli)")
    p.add_argument("--hidden", type=hidden, default="500", help="hidden sizes of all three MLPs (default 500)")
    p.add_argument("--z-dim", type=positive_int, default=50, help="latent dimension (default 50)")
    p.add_argument("--seed", type=seed, default=0, help="seed (default 0)")
    add_device_option(p)
    p.add_argument("--out", default="runs/ssl", help="output folder (default runs/ssl)")
    p.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines or summary")
    p.set_defaults(func=cmd_semisupervised)


def cmd_semisupervised(args: argparse.Namespace) -> int:
    """Run ``pyrovae semisupervised``; returns the exit code."""
    s = run_semisupervised(
        args.out,
        dataset=args.dataset,
        data_dir=args.data_dir,
        labels=args.labels,
        epochs=args.epochs,
        batch_size=args.batch_size,
        labelled_batch=args.labelled_batch,
        lr=args.lr,
        alpha_scale=args.alpha_scale,
        likelihood=args.likelihood,
        binarize=args.binarize,
        hidden=sizes(args.hidden),
        z_dim=args.z_dim,
        train_size=args.train_size,
        seed=args.seed,
        device=args.device,
        overwrite=args.overwrite,
        quiet=args.quiet,
    )
    if not args.quiet:
        print(
            f"test accuracy with {s['labels']} labels: M2 {s['m2']['test_accuracy']:.4f}, supervised baseline "
            f"{s['baseline']['test_accuracy']:.4f}; see {Path(args.out) / 'ssl.md'}"
        )
    return 0
