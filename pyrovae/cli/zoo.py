"""``pyrovae zoo``: options to a :class:`pyrovae.tasks.zoo.ZooOptions`, then ``run_zoo``; progress on stderr."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..models.zoo import ENTRIES
from ..tasks.zoo import FULL, QUICK, SCORERS, ZooOptions, run_zoo
from .options import add_data_options, add_device_option, positive_float, positive_int, seed


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``pyrovae zoo``."""
    p = sub.add_parser(
        "zoo",
        help="train every zoo model the same way and score them on one leaderboard",
        description="Writes OUT/leaderboard.md, .json and .png (and one run folder per model); run it again to "
        "resume an interrupted zoo.",
    )
    p.add_argument("--models", default="all", help=f"all, or some of: {','.join(ENTRIES)} (default all)")
    add_data_options(p, only=("dataset", "data_dir", "root", "download", "train_size"))
    p.set_defaults(dataset="fashion-mnist", download=False)
    p.add_argument("--epochs", type=positive_int, help=f"epochs per model (default {FULL['epochs']}; "
                   f"--quick: {QUICK['epochs']})")  # fmt: skip
    p.add_argument("--batch-size", type=positive_int, default=100, help="training batch (default 100)")
    p.add_argument("--k", type=positive_int, help=f"importance samples per test image (default {FULL['k']}; "
                   f"--quick: {QUICK['k']})")  # fmt: skip
    p.add_argument("--n", type=positive_int, help=f"test images scored (default {FULL['n']}; --quick: {QUICK['n']})")
    p.add_argument(
        "--estimator",
        choices=list(SCORERS),
        default="ais",
        help="how log p(x) is estimated: ais (annealed, its default schedule; IS "
        "with K draws and k̂ kept beside it) or is (importance sampling alone) (default ais)",
    )
    p.add_argument("--quick", action="store_true", help=f"the small setting: {QUICK} (about 20 minutes on 2 cores)")
    p.add_argument("--memory-mb", type=positive_float, help="memory bound of the scoring chunks")
    add_device_option(p)
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--out", default="runs/zoo", help="output folder (default runs/zoo)")
    p.add_argument("--no-figures", action="store_true", help="no leaderboard.png")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_zoo)


def cmd_zoo(args: argparse.Namespace) -> int:
    """Run ``pyrovae zoo``; returns the exit code."""

    def log(line: str) -> None:
        sys.stderr.write(f"pyrovae zoo: {line}\n")
        sys.stderr.flush()

    s = run_zoo(
        ZooOptions(
            out=args.out,
            models=args.models,
            dataset=args.dataset,
            data_dir=args.data_dir,
            root=args.root,
            download=bool(args.download),
            epochs=args.epochs,
            train_size=args.train_size,
            k=args.k,
            n=args.n,
            batch_size=args.batch_size,
            estimator=args.estimator,
            seed=args.seed,
            device=args.device,
            quick=args.quick,
            memory_mb=args.memory_mb,
            figures=not args.no_figures,
            log=None if args.quiet else log,
        )
    )
    best = max((r for r in s["rows"] if not r["conditional"]), key=lambda r: r["log_likelihood"], default=None)
    top = f"best log p(x) {best['log_likelihood']:.2f} nats/image ({best['model']}); " if best else ""
    print(f"zoo of {len(s['rows'])} models: {top}see {Path(args.out) / 'leaderboard.md'}")
    return 0
