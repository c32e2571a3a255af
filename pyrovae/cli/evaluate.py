"""``pyrovae evaluate``: :func:`pyrovae.tasks.evaluate.evaluate_run` on a run folder, and a summary line."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..reports.markdown import fmt
from ..tasks.evaluate import evaluate_run
from .options import add_annealing_options, add_device_option, add_evaluation_options, positive_int, run_dir_argument


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``pyrovae evaluate``."""
    e = sub.add_parser(
        "evaluate",
        help="log p(x) by importance sampling (with k̂), AIS and BDMC; ELBO, bits/dim and figures of a trained run",
        description="Evaluate a trained run; writes RUN_DIR/eval.json, eval.md, eval.nc and figures.",
    )
    run_dir_argument(e, "pyrovae train --out")
    add_evaluation_options(
        e,
        k=5000,
        k_help="importance samples per image (default 5000)",
        n=None,
        n_help="evaluate only the first N images of the split",
        memory_mb=None,
        memory_help="memory budget per model call (default 1024)",
        batch_size_help="images per model call (default: from --memory-mb)",
    )
    add_annealing_options(e)
    e.add_argument(
        "--bdmc-n",
        type=positive_int,
        default=100,
        help="with --method bdmc: images simulated from the model for the sandwich (default 100)",
    )
    add_device_option(e)
    e.add_argument("--no-figures", action="store_true", help="skip the figures")
    e.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    e.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Run ``pyrovae evaluate``; returns the exit code."""
    s = evaluate_run(
        args.run_dir,
        k=args.k,
        split=args.split,
        n=args.n,
        batch_size=args.batch_size,
        memory_mb=args.memory_mb,
        device=args.device,
        figures=not args.no_figures,
        quiet=args.quiet,
        method=args.method,
        steps=args.steps,
        chains=args.chains,
        leapfrog=args.leapfrog,
        bdmc_n=args.bdmc_n,
    )
    if not args.quiet:
        bpd = f", {s['bits_per_dim']:.4f} bits/dim" if s["bits_per_dim"] is not None else ""
        print(
            f"log p(x) {s['log_likelihood']:.2f} ± {fmt(s['log_likelihood_sem'])}{bpd}, ELBO {s['elbo']:.2f} "
            f"nats/image over {s['n']} {s['split']} images (K={s['k']}); k̂ > 0.7 for "
            f"{fmt(s['khat_bad'], '.1%')}; written to {Path(args.run_dir) / 'eval.json'}"
        )
        if "ais" in s:
            a = s["ais"]
            print(
                f"AIS log p(x) {a['log_likelihood']:.2f} ± {fmt(a['log_likelihood_sem'])} (Monte Carlo s.e. "
                f"{a['mc_stderr']:.3f}, acceptance {a['acceptance']:.2f}); AIS − IS {a['minus_is']:.3f} ± "
                f"{fmt(a['minus_is_sem'], '.3f')}"
            )
        if "bdmc" in s:
            b = s["bdmc"]
            print(f"BDMC gap {b['gap']:.3f} ± {fmt(b['gap_sem'], '.3f')} nats/image on {b['n']} simulated images")
    return 0
