"""Seconds per training epoch: pyrovae's fit (a Pyro model/guide) vs the hand-written PyTorch loop.

Both sides run in this one process, interleaved (pyrovae, plain, plain, pyrovae, ...), on the same
device-resident data with the same networks; the table gives the median and range over repeats, the
ratio of medians, and the median of the paired ratios: each repeat's two epochs run back to back, so
their ratio is the one a slow spell of a shared machine (which lasts seconds) leaves nearly intact.
With ``--train-size`` an "epoch" is a block of train-size / batch steps: many short pairs resist noise
best. Validation is excluded from both timings.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results, markdown_table  # noqa: E402
from plain_vae import plain_epoch  # noqa: E402

from pyrovae import Pixels, build_vae, fit, load_dataset, make_splits, synthetic  # noqa: E402
from pyrovae.runs import resolve_device  # noqa: E402


def time_both(splits, arch: str, elbo: str, bs: int, k: int, repeats: int, device: torch.device) -> dict[str, list]:
    """Seconds of one epoch, ``repeats`` times per side, the sides interleaved with alternating order."""
    times: dict[str, list[float]] = {"pyrovae": [], "plain": []}
    torch.manual_seed(0)
    ours = build_vae(splits.train.shape, "bernoulli", arch, splits.train_pixel_mean.cpu()).to(device)
    theirs = build_vae(splits.train.shape, "bernoulli", arch, splits.train_pixel_mean.cpu()).to(device)
    opt = torch.optim.Adam(theirs.parameters(), lr=1e-3, foreach=True)

    def ours_epoch() -> None:
        res = fit(ours.model, ours.guide, splits.train, elbo=elbo, particles=k, epochs=1, batch_size=bs, quiet=True)
        times["pyrovae"].append(res.history[0]["seconds"])

    def plain() -> None:
        t0 = time.perf_counter()
        total = plain_epoch(theirs, splits.train, opt, bs, elbo, k)
        float(total)  # waits for the device
        times["plain"].append(time.perf_counter() - t0)

    for r in range(repeats):  # neither side always runs second
        for side in (ours_epoch, plain) if r % 2 == 0 else (plain, ours_epoch):
            side()
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--arch", default=["iwae"], nargs="+")
    p.add_argument("--elbo", default=["meanfield"], nargs="+", choices=["trace", "meanfield", "iwae"])
    p.add_argument("--batch-size", type=int, default=[100], nargs="+")
    p.add_argument("--particles", type=int, default=5, help="K for iwae")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = resolve_device(args.device)
    raw = synthetic(n_train=6000) if args.dataset == "synthetic" else load_dataset(args.dataset, args.data_dir)
    splits = make_splits(
        raw, Pixels("dynamic"), device, val_size=5000 if args.train_size is None else 0, train_size=args.train_size
    )
    archs = [args.arch] if isinstance(args.arch, str) else args.arch
    rows = []
    for arch in archs:
        for elbo in args.elbo:
            for bs in args.batch_size:
                k = args.particles if elbo == "iwae" else 1
                times = time_both(splits, arch, elbo, bs, k, args.repeats, device)
                med = {s: statistics.median(t) for s, t in times.items()}
                best = {s: min(t) for s, t in times.items()}
                paired = sorted(a / b for a, b in zip(times["pyrovae"], times["plain"]))
                q1, q3 = paired[len(paired) // 4], paired[(3 * len(paired)) // 4]
                rows.append(
                    [arch, elbo + (f" K={k}" if k > 1 else ""), bs, len(splits.train)]
                    + [f"{med[s]:.3f} ({best[s]:.3f}–{max(times[s]):.3f})" for s in ("pyrovae", "plain")]
                    + [f"{med['pyrovae'] / med['plain']:.3f}", f"{best['pyrovae'] / best['plain']:.3f}"]
                    + [f"**{statistics.median(paired):.3f}** ({q1:.3f}–{q3:.3f})"]
                )
                print(rows[-1], flush=True)
    header = [
        "arch",
        "ELBO",
        "batch",
        "N train",
        "pyrovae s/epoch (range)",
        "plain PyTorch s/epoch (range)",
        "ratio of medians",
        "ratio of bests",
        "paired ratio, median (quartiles)",
    ]
    append_results(
        f"Epoch time: pyrovae vs hand-written PyTorch ({args.dataset}, {device.type})",
        markdown_table(header, rows),
        "python bench/train_speed.py " + " ".join(sys.argv[1:]),
        f"Median and best of {args.repeats} interleaved repeats (order alternating); validation excluded from both. "
        "Paired ratio: pyrovae's time over the plain loop's in the same repeat (the two run back to back), median "
        "and quartiles over repeats; on a shared VM it is the estimate that a slow spell disturbs least.",
    )


if __name__ == "__main__":
    main()
