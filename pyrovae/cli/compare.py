"""``pyrovae compare``: options to a :class:`pyrovae.tasks.compare.CompareOptions`, then ``run_compare``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..tasks.compare import REPRESENTATIONS, CompareOptions, run_compare
from .options import (
    add_annealing_options,
    add_data_options,
    add_device_option,
    add_evaluation_options,
    positive_int,
    seed,
)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``pyrovae compare``."""
    p = sub.add_parser(
        "compare",
        help="VAE vs Gaussian/Bernoulli mixture on one representation",
        description="Train (or load) a VAE and a mixture on the same data; write compare.json, compare.md and figures.",
    )
    p.add_argument(
        "--representation",
        choices=list(REPRESENTATIONS),
        default="binary",
        help="binary or dequantized (default binary)",
    )
    add_data_options(p, only=("dataset", "data_dir", "root", "download", "train_size"))
    p.set_defaults(dataset="fashion-mnist", download=False)
    p.add_argument("--vae-run", help="load the VAE from this run folder instead of training one")
    p.add_argument("--arch", default="iwae", help="VAE arch preset when training (default iwae)")
    p.add_argument("--likelihood", help="VAE decoder (default: bernoulli for binary, gaussian-diag for dequantized)")
    p.add_argument("--epochs", type=positive_int, default=10, help="VAE epochs when training (default 10)")
    p.add_argument("--gmm-run", help="load the mixture from this folder (a comparison's gmm/) instead of training")
    p.add_argument("--gmm-k", type=positive_int, default=10, help="mixture components (default 10)")
    p.add_argument("--gmm-covariance", choices=["diag", "full"], default="diag", help="Gaussian mixture covariance")
    p.add_argument("--gmm-epochs", type=positive_int, default=20, help="mixture epochs (default 20)")
    add_evaluation_options(
        p,
        k=1000,
        k_help="importance samples for the VAE's log p(x) (default 1000)",
        n=None,
        n_help="evaluate on the first N test images (default all)",
        memory_help="memory bound of the evaluation",
        split=False,
    )
    add_annealing_options(p, methods=("is", "ais"))
    add_device_option(p)
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--out", default="runs/compare", help="output folder (default runs/compare)")
    p.add_argument("--overwrite", action="store_true", help="replace a comparison already in --out")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_compare)


def compare_options(args: argparse.Namespace) -> CompareOptions:
    """The parsed options as the library's typed settings."""
    return CompareOptions(
        out=args.out,
        representation=args.representation,
        dataset=args.dataset,
        data_dir=args.data_dir,
        root=args.root,
        download=bool(args.download),
        train_size=args.train_size,
        vae_run=args.vae_run,
        arch=args.arch,
        likelihood=args.likelihood,
        epochs=args.epochs,
        gmm_run=args.gmm_run,
        gmm_k=args.gmm_k,
        gmm_covariance=args.gmm_covariance,
        gmm_epochs=args.gmm_epochs,
        k=args.k,
        n=args.n,
        memory_mb=args.memory_mb,
        method=args.method,
        steps=args.steps,
        chains=args.chains,
        leapfrog=args.leapfrog,
        device=args.device,
        seed=args.seed,
        overwrite=args.overwrite,
        no_figures=args.no_figures,
        quiet=args.quiet,
    )


def cmd_compare(args: argparse.Namespace) -> int:
    """Run ``pyrovae compare``; returns the exit code."""
    s = run_compare(compare_options(args))
    vae, gmm = s["models"]["vae"], s["models"]["gmm"]
    print(
        f"{s['representation']}: VAE log p(x) {vae['log_likelihood']:.2f} ({vae['likelihood_kind']}) vs mixture "
        f"{gmm['log_likelihood']:.2f} nats/image; see {Path(args.out) / 'compare.md'}"
    )
    return 0
