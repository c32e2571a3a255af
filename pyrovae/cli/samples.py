"""``pyrovae samples``: :func:`pyrovae.tasks.samples.run_samples` on a run folder, and a summary line."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..tasks.samples import CODES, run_samples
from .options import add_device_option, hidden, positive_int, run_dir_argument, seed, sizes


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``pyrovae samples``."""
    p = sub.add_parser(
        "samples",
        help="two-stage VAE and latent-GMM samples of a trained run, against the prior",
        description="Fit a two-stage VAE and a latent GMM on a run's codes; write samples.json, samples.md, "
        "samples_compare.png into RUN_DIR (or --out).",
    )
    run_dir_argument(p, "pyrovae train --likelihood gaussian-learned")
    p.add_argument("--stage2-epochs", type=positive_int, default=20, help="epochs of the stage-2 VAE (default 20)")
    p.add_argument("--stage2-hidden", type=hidden, default="512,512", help="stage-2 hidden sizes (default 512,512)")
    p.add_argument("--gmm-k", type=positive_int, default=20, help="latent GMM components (default 20)")
    p.add_argument("--n", type=positive_int, default=1000, help="samples per sampler and test images (default 1000)")
    p.add_argument(
        "--codes", choices=CODES, default="sample", help="fit on posterior samples or means (default sample)"
    )
    p.add_argument(
        "--referee", help="a run folder whose VAE scores the samples (default: train one, see --referee-epochs)"
    )
    p.add_argument("--referee-epochs", type=positive_int, default=5, help="epochs of the referee VAE (default 5)")
    p.add_argument(
        "--k", type=positive_int, default=100, help="importance samples for the referee's log p(x) (default 100)"
    )
    p.add_argument("--seed", type=seed, default=0, help="seed (default 0)")
    add_device_option(p)
    p.add_argument("--out", help="output folder (default RUN_DIR)")
    p.add_argument("--allow-other-likelihood", action="store_true", help="run on a decoder other than gaussian-learned")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines or summary")
    p.set_defaults(func=cmd_samples)


def cmd_samples(args: argparse.Namespace) -> int:
    """Run ``pyrovae samples``; returns the exit code."""
    s = run_samples(
        args.run_dir,
        stage2_epochs=args.stage2_epochs,
        stage2_hidden=sizes(args.stage2_hidden),
        gmm_k=args.gmm_k,
        n=args.n,
        codes=args.codes,
        referee_run=args.referee,
        referee_epochs=args.referee_epochs,
        k=args.k,
        seed=args.seed,
        device=args.device,
        out=args.out,
        allow_other_likelihood=args.allow_other_likelihood,
        quiet=args.quiet,
    )
    if not args.quiet:
        rows = s["samplers"]
        text = ", ".join(f"{name} {rows[name]['mmd2_pixels']:.4f}" for name in ("prior", "two_stage", "latent_gmm"))
        print(f"pixel MMD² to the test set: {text}; see {Path(args.out or args.run_dir) / 'samples.md'}")
    return 0
