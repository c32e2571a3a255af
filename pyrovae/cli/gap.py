"""``pyrovae gap``: :func:`pyrovae.tasks.gap.gap_run` on a run folder, and a summary line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..tasks.gap import gap_run
from .options import (
    add_device_option,
    add_evaluation_options,
    count,
    positive_float,
    positive_int,
    run_dir_argument,
    seed,
)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``pyrovae gap``."""
    g = sub.add_parser(
        "gap",
        help="approximation and amortisation gaps of a trained run, and its true posterior by NUTS",
        description="Writes RUN_DIR/gap.json, gap.md and (with --nuts-points > 0) posterior.nc.",
    )
    run_dir_argument(g, "pyrovae train")
    add_evaluation_options(
        g,
        k=5000,
        k_help="importance samples per proposal (default 5000)",
        n=100,
        n_help="images (default 100)",
    )
    g.add_argument("--steps", type=positive_int, help="SVI steps of the local fit (default: the guide family's, 500 "
                   "for a diagonal Gaussian, 2000 for the flow guide's)")  # fmt: skip
    g.add_argument("--lr", type=positive_float, default=0.01, help="Adam learning rate of the local fit (default 0.01)")
    g.add_argument("--particles", type=positive_int, default=10, help="draws per SVI step (default 10)")
    g.add_argument("--nuts-points", type=count, default=3, help="images sampled by NUTS (default 3; 0: none)")
    g.add_argument("--warmup", type=positive_int, default=300, help="NUTS warm-up steps per chain (default 300)")
    g.add_argument("--samples", type=positive_int, default=300, help="NUTS draws per chain (default 300)")
    g.add_argument("--chains", type=positive_int, default=2, help="NUTS chains, run in turn (default 2)")
    g.add_argument("--jit", action="store_true", help="JIT-trace the NUTS potential (about 2x faster)")
    g.add_argument("--seed", type=seed, default=0)
    add_device_option(g)
    g.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    g.set_defaults(func=cmd_gap)


def cmd_gap(args: argparse.Namespace) -> int:
    """Run ``pyrovae gap``; returns the exit code."""
    s = gap_run(
        args.run_dir,
        args.n,
        args.steps,
        args.k,
        args.nuts_points,
        warmup=args.warmup,
        samples=args.samples,
        chains=args.chains,
        lr=args.lr,
        particles=args.particles,
        split=args.split,
        seed=args.seed,
        memory_mb=args.memory_mb,
        device=args.device,
        jit=args.jit,
        progress=not args.quiet and sys.stderr.isatty(),
    )
    if not args.quiet:
        print(
            f"log p(x) {s['log_likelihood']:.2f}, L[q*] {s['elbo_qstar']:.2f}, L[q] {s['elbo_q']:.2f}: approximation "
            f"gap {s['approximation_gap']:.2f}, amortisation gap {s['amortization_gap']:.2f} nats/image over "
            f"{s['n']} images; see {Path(args.run_dir) / 'gap.md'}"
        )
    return 0
