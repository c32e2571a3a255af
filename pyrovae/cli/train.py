"""``pyrovae train``: options to a run config, then :func:`pyrovae.training.train_run` (with ``--nproc``:
:func:`pyrovae.training.train_parallel`, whose workers run this command again)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .. import distributed
from ..config import OPTIONS, RunConfig, flat_options, parse_hidden, with_options
from ..errors import PeerLost, PyrovaeError
from ..files import check_run_folder, write_text
from ..infer import check_alpha
from ..runs import read_config, resolve_device
from ..training import saved_progress, train_parallel, train_run
from .options import add_data_options, add_model_options, add_run_options, add_training_options, positive_int

WORKERS_LOG = "workers.log"  # what ranks other than 0 printed, kept in the run folder when a run fails


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


def train_config(args: argparse.Namespace) -> RunConfig:
    """The run's config: saved settings on --resume, then the options given, then the defaults."""
    given = {k: parse_hidden(v) if k == "hidden" else v for k, v in vars(args).items() if k in OPTIONS}
    given = {k: v for k, v in given.items() if v is not None}
    base = read_config(args.out) if args.resume else RunConfig()
    if args.resume:
        saved = flat_options(base) if base.kind in ("vae", "masked") else {}
        changed = {k for k, v in given.items() if k not in ("epochs", "device") and v != saved.get(k)}
        if changed:
            raise PyrovaeError(
                f"--resume continues the saved run; these options differ from it: {', '.join(sorted(changed))}"
            )
    return with_options(base, given)


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


def checked_config(args: argparse.Namespace) -> RunConfig:
    """:func:`train_config`, refused for a masked run or a bad α."""
    cfg = train_config(args)
    if args.resume and cfg.kind == "masked":
        raise PyrovaeError(
            f"{Path(args.out)} was trained by 'pyrovae train-masked'; continue it with 'pyrovae train-masked --resume'"
        )
    check_alpha(cfg.training.elbo, cfg.training.alpha)
    return cfg


def progress(out: Path, epochs: int) -> str:
    """How far a stopped run got, as the end of its line: what its checkpoint holds, and how to continue."""
    saved = saved_progress(out)
    if saved is None:
        return f"; nothing was saved in {out}"
    done, batch = saved
    if done >= epochs:
        return f" after its last epoch; the checkpoint of epoch {done} in {out} is complete"
    kept = f"epoch {done}" if batch == 0 else f"epoch {done + 1}, batch {batch}"
    return f" during epoch {done + 1}; the checkpoint of {kept} is intact; continue with: pyrovae train --out {out} --resume"


def cmd_train(args: argparse.Namespace) -> int:
    """Run ``pyrovae train``; returns the exit code (130 when interrupted)."""
    out = Path(args.out)
    check_run_folder(args.out, resume=args.resume, overwrite=args.overwrite)
    cfg = checked_config(args)  # refuse bad options before locking, loading or launching anything
    if args.nproc is not None and not distributed.launched():
        distributed.check_nproc(args.nproc, resolve_device(cfg.training.device))
        if args.nproc > 1:  # start the processes; each runs this command (less --nproc)
            return launch_train(args, out)
    try:
        cfg, result = train_run(
            args.out,
            lambda: checked_config(args),
            resume=args.resume,
            overwrite=args.overwrite,
            quiet=args.quiet,
            tensorboard=args.tensorboard,
            timeout=args.peer_timeout,
        )
    except PeerLost as exc:  # under torchrun: say how far the run got (pyrovae's launcher says it for all)
        if distributed.under_launcher():
            raise
        raise PeerLost(f"{exc}{progress(out, cfg.training.epochs)}") from None
    first = distributed.env_rank() == 0  # under torchrun only global rank 0 prints
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
        from ..tasks.evaluate import evaluate_run

        s = evaluate_run(out, k=args.eval_k, device=cfg.training.device, quiet=args.quiet)
        print(f"test log p(x) {s['log_likelihood']:.2f} nats/image (K={args.eval_k}); see {out / 'eval.md'}")
    return 0


def launch_train(args: argparse.Namespace, out: Path) -> int:
    """``pyrovae train --nproc N``: checked once, then N workers; one line for a failure on any of them."""
    cfg, outcome, log = train_parallel(
        args.out,
        lambda: checked_config(args),
        without_nproc(args.argv),
        nproc=args.nproc,
        resume=args.resume,
        overwrite=args.overwrite,
        timeout=args.peer_timeout,
    )
    if outcome.code not in (0, 130) and log.strip() and out.is_dir():
        write_text(out / WORKERS_LOG, log)  # what the other ranks printed, for a closer look
    if outcome.cause:
        print(f"pyrovae train: error: {outcome.cause}{progress(out, cfg.training.epochs)}", file=sys.stderr)
    for line in outcome.lines:
        print(line, file=sys.stderr)
    return outcome.code
