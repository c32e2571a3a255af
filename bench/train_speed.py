"""Seconds per training epoch: pyrovae's fit (a Pyro model/guide) vs the hand-written PyTorch loop.

Both sides run in this one process on the same device-resident data with the same networks: one
``fit`` call trains pyrovae for repeats + 1 epochs, and after each of its epochs the plain loop runs
one (so each plain epoch sits between two pyrovae epochs). The table gives the median and range over
repeats, the ratio of medians and of bests, and the median of the paired ratios (each plain epoch
against the mean of its two neighbours): a slow spell of a shared machine, which lasts seconds,
leaves such a ratio nearly intact. With ``--train-size`` an "epoch" is a block of train-size / batch
steps: many short pairs resist noise best. Validation is excluded from both timings.
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
from pyrovae.hostmem import keep_freed_memory  # noqa: E402
from pyrovae.runs import resolve_device  # noqa: E402


def time_both(splits, arch: str, elbo: str, bs: int, k: int, repeats: int, device: torch.device) -> dict[str, list]:
    """Seconds of one epoch, ``repeats`` times per side, interleaved: pyrovae's epochs are one ``fit`` call
    (its optimiser and caches live on, as in real training), and after each epoch its ``callback`` runs
    one epoch of the plain loop. The first epoch of each side is a warm-up and is not counted."""
    times: dict[str, list[float]] = {"pyrovae": [], "plain": []}
    torch.manual_seed(0)
    ours = build_vae(splits.train.shape, "bernoulli", arch, splits.train_pixel_mean.cpu()).to(device)
    theirs = build_vae(splits.train.shape, "bernoulli", arch, splits.train_pixel_mean.cpu()).to(device)
    opt = torch.optim.Adam(theirs.parameters(), lr=1e-3, foreach=True)

    def plain(row: dict) -> None:
        if row["epoch"] > repeats:  # the last pyrovae epoch closes the last pair
            return
        t0 = time.perf_counter()
        total = plain_epoch(theirs, splits.train, opt, bs, elbo, k)
        float(total)  # waits for the device
        times["plain"].append(time.perf_counter() - t0)

    res = fit(
        ours.model, ours.guide, splits.train, elbo=elbo, particles=k, epochs=repeats + 1, batch_size=bs,
        quiet=True, callback=plain,
    )  # fmt: skip
    times["pyrovae"] = [row["seconds"] for row in res.history][1:]
    times["plain"] = times["plain"][1:]
    return times


def paired_ratios(times: dict[str, list]) -> list[float]:
    """Each plain epoch against the mean of the two pyrovae epochs around it (one before, one after)."""
    ours, plain = times["pyrovae"], times["plain"]
    return [0.5 * (ours[i] + ours[i + 1]) / plain[i] for i in range(min(len(ours) - 1, len(plain)))]


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
    keep_freed_memory()  # as the CLI does for training
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
                paired = sorted(paired_ratios(times))
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
        f"Median and best of {args.repeats} interleaved epochs per side (pyrovae: one fit call; the plain loop runs "
        "after each of its epochs; first epochs are warm-up); validation excluded from both. Paired ratio: "
        "the mean of two neighbouring pyrovae epochs over the plain epoch between them, median and quartiles; "
        "on a shared VM it is the estimate that a slow spell disturbs least.",
    )


if __name__ == "__main__":
    main()
