"""``pyrovae train-masked`` and ``pyrovae complete``: a masked VAE trained with every training option of
``pyrovae train``, and completions of its missing pixels (:mod:`pyrovae.tasks.complete`)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from ..config import MaskConfig, RunConfig
from ..errors import PyrovaeError
from ..infer import check_alpha
from ..models.masked import MASK_KINDS
from ..tasks.complete import complete_run
from ..training import train_run
from .options import (
    add_data_options,
    add_device_option,
    add_evaluation_options,
    add_model_options,
    add_run_options,
    add_training_options,
    positive_int,
    rate,
    run_dir_argument,
    seed,
)
from .train import train_config


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``pyrovae train-masked`` and ``pyrovae complete``."""
    t = sub.add_parser(
        "train-masked",
        help="train a VAE on images with missing pixels (for 'pyrovae complete')",
        description="Train a masked VAE; writes OUT/metrics.csv, config.json, checkpoint.pt.",
    )
    add_data_options(t)
    g = t.add_argument_group("masks")
    g.add_argument("--mask", choices=MASK_KINDS, help="training masks (default mix)")
    g.add_argument("--rate", type=rate, help="missing rate of random masks (default 0.5)")
    add_model_options(t)
    add_training_options(t)
    add_run_options(t, "runs/masked")
    t.set_defaults(func=cmd_train_masked)

    c = sub.add_parser(
        "complete",
        help="complete missing pixels with a masked run: SNIS log p(x_miss|x_obs) vs a baseline, and a grid",
        description="Writes RUN_DIR/complete.json, complete.md and completions.png.",
    )
    run_dir_argument(c, "pyrovae train-masked")
    c.add_argument("--mask", choices=MASK_KINDS, default="top-half", help="evaluation masks (default top-half)")
    c.add_argument("--rate", type=rate, default=0.5, help="missing rate of random masks (default 0.5)")
    add_evaluation_options(
        c,
        k=1000,
        k_help="importance samples per image (default 1000)",
        n=500,
        n_help="images to complete (default 500)",
    )
    c.add_argument("--show", type=int, default=8, help="images in completions.png (default 8; 0: no figure)")
    c.add_argument("--completions", type=positive_int, default=5, help="draws per image in the figure (default 5)")
    c.add_argument("--seed", type=seed, default=0, help="seed of the masks and draws (default 0)")
    add_device_option(c)
    c.add_argument("--quiet", action="store_true", help="no summary line")
    c.set_defaults(func=cmd_complete)


def masked_config(args: argparse.Namespace) -> RunConfig:
    """The masked run's config: :func:`train_config` plus the masks; on --resume, refuse other masks; check α."""
    cfg = train_config(args)  # on --resume: the saved run's, refusing changed options
    masks = {"mask": args.mask, "rate": args.rate}
    if args.resume:
        if cfg.kind != "masked":
            raise PyrovaeError(
                f"{Path(args.out)} was not trained by 'pyrovae train-masked'; continue it with 'pyrovae train --resume'"
            )
        changed = [k for k, v in masks.items() if v is not None and v != getattr(cfg.extra, k)]
        if changed:
            raise PyrovaeError(f"--resume continues the saved run; these options differ from it: {', '.join(changed)}")
    else:
        extra = MaskConfig(mask=args.mask or "mix", rate=0.5 if args.rate is None else args.rate)
        cfg = dataclasses.replace(cfg, kind="masked", extra=extra)
    check_alpha(cfg.training.elbo, cfg.training.alpha)
    return cfg


def cmd_train_masked(args: argparse.Namespace) -> int:
    """Run ``pyrovae train-masked``; returns the exit code (130 when interrupted)."""
    out = Path(args.out)
    _, result = train_run(
        args.out,
        lambda: masked_config(args),
        resume=args.resume,
        overwrite=args.overwrite,
        quiet=args.quiet,
        masked=True,
    )
    if result.interrupted:
        print(
            f"interrupted: checkpoint saved in {out}; continue with: pyrovae train-masked --out {out} --resume",
            file=sys.stderr,
        )
        return 130
    last = result.history[-1]
    print(f"done: {result.epochs_done} epochs, val ELBO (observed pixels) {last['val_elbo']:.2f} nats/image; {out}")
    return 0


def cmd_complete(args: argparse.Namespace) -> int:
    """Run ``pyrovae complete``; returns the exit code."""
    s = complete_run(
        args.run_dir,
        args.mask,
        args.rate,
        args.k,
        args.n,
        split=args.split,
        show=args.show,
        completions=args.completions,
        seed=args.seed,
        memory_mb=args.memory_mb,
        device=args.device,
    )
    if not args.quiet:
        print(
            f"log p(x_miss|x_obs) {s['log_p_missing']:.2f} nats/image ({s['log_p_missing_per_pixel']:.4f}/pixel) vs "
            f"baseline {s['baseline_log_p_missing']:.2f} ({s['baseline_log_p_missing_per_pixel']:.4f}/pixel) over "
            f"{s['n']} images, K={s['k']}; see {Path(args.run_dir) / 'complete.md'}"
        )
    return 0
