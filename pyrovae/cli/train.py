"""``pyrovae train``: options to a run config, then :func:`pyrovae.runs.train_vae` in the run folder."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from .. import distributed
from ..errors import PyrovaeError
from ..files import RunLock, check_run_folder, remove_derived
from ..infer import check_alpha
from ..runs import DEFAULTS, read_config, resolve_device, train_vae
from .options import add_data_options, add_model_options, add_run_options, add_training_options, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``pyrovae train``."""
    t = sub.add_parser(
        "train", help="train a VAE", description="Train a VAE; writes OUT/metrics.csv, config.json, checkpoint.pt."
    )
    add_data_options(t)
    add_model_options(t)
    add_training_options(t)
    g = add_run_options(t, "runs/latest", nproc=True)
    g.add_argument(
        "--tensorboard",
        metavar="DIR",
        help="also write TensorBoard event files into DIR: per-epoch ELBOs, sample and reconstruction grids "
        "(needs: pip install 'pyrovae[tensorboard]')",
    )
    g.add_argument(
        "--eval-k", type=positive_int, help="after training, run 'pyrovae evaluate' with K importance samples"
    )
    t.set_defaults(func=cmd_train)


def train_config(args: argparse.Namespace) -> dict[str, Any]:
    """The run's config: saved settings on --resume, then the options given, then the defaults."""
    given = {k: v for k, v in vars(args).items() if k in DEFAULTS and v is not None}
    base = read_config(args.out) if args.resume else dict(DEFAULTS)
    if args.resume:
        changed = {k for k, v in given.items() if k not in ("epochs", "device") and v != base.get(k)}
        if changed:
            raise PyrovaeError(
                f"--resume continues the saved run; these options differ from it: {', '.join(sorted(changed))}"
            )
    return {**base, **given}


def without_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` less ``--nproc N`` (or ``--nproc=N``, or an abbreviation): torchrun's own parser refuses it."""
    out, skip = [], False
    for arg in argv:
        name = arg.split("=", 1)[0]
        if skip or len(name) > 3 and "--nproc".startswith(name):
            skip = not skip and "=" not in arg
            continue
        out.append(arg)
    return out


def _checked_config(args: argparse.Namespace) -> dict[str, Any]:
    out = check_run_folder(args.out, resume=args.resume, overwrite=args.overwrite)
    cfg = train_config(args)
    if args.resume and cfg.get("masked"):
        raise PyrovaeError(
            f"{out} was trained by 'pyrovae train-masked'; continue it with 'pyrovae train-masked --resume'"
        )
    check_alpha(cfg["elbo"], cfg["alpha"])
    return cfg


def cmd_train(args: argparse.Namespace) -> int:
    out = Path(args.out)
    cfg = _checked_config(args)  # refuse bad options before locking, loading or launching anything
    if args.nproc is not None and not distributed.launched():
        distributed.check_nproc(args.nproc, resolve_device(cfg["device"]))
        if args.nproc > 1:  # start the processes; each runs this command (less --nproc) under torchrun
            return distributed.launch(args.nproc, without_nproc(args.argv))
    first = distributed.env_rank() == 0  # under torchrun only global rank 0 touches the run folder and prints
    with RunLock(out) if first else nullcontext():
        cfg = _checked_config(args)  # again, now that no other command can change the folder
        replaced = (lambda: remove_derived(out)) if args.overwrite and first else None
        try:
            distributed.setup(resolve_device(cfg["device"]))  # under torchrun: join the process group, pick the GPU
            # the old run (with --overwrite) is replaced only once the new one has written its first checkpoint
            _, _, result = train_vae(
                cfg,
                out,
                resume=args.resume,
                quiet=args.quiet,
                on_first_checkpoint=replaced,
                tensorboard=args.tensorboard if first else None,
            )
        finally:
            distributed.teardown()
    if not first:
        return 130 if result.interrupted else 0
    if result.interrupted and result.checkpoint is None:
        print(f"interrupted before the first step: nothing saved in {out}", file=sys.stderr)
        return 130
    if result.interrupted:
        print(
            f"interrupted: checkpoint saved in {out}; continue with: pyrovae train --out {out} --resume",
            file=sys.stderr,
        )
        return 130
    last = result.history[-1]
    print(f"done: {result.epochs_done} epochs, val ELBO {last['val_elbo']:.2f} nats/image; run folder {out}")
    if args.eval_k:
        from ..evaluate import evaluate_run

        s = evaluate_run(out, k=args.eval_k, device=cfg["device"], quiet=args.quiet)
        print(f"test log p(x) {s['log_likelihood']:.2f} nats/image (K={args.eval_k}); see {out / 'eval.md'}")
    return 0
