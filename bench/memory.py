"""Memory: host memory of training on full Fashion-MNIST beyond PyTorch itself, and evaluation's peak under a budget.

Each measurement runs in a fresh process and reads the peak resident set size (``ru_maxrss``):
- train: the peak after importing torch, Pyro and pyrovae (PyTorch itself) vs the peak over loading
  the data and one epoch of ``fit`` (iwae arch, meanfield, batch 100, dynamic binarisation).
- eval: for each ``--memory-mb`` budget, the highest resident set size during one ``log_likelihood``
  call (K importance samples over ``--n`` test images of a trained run), sampled every millisecond,
  above the one before it (on CUDA: the allocator's peak above what was allocated before).
The table is printed and appended to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class RssSampler:
    """The highest resident set size seen while the block runs, sampled every millisecond by a thread
    (torch ops release the GIL): the process-wide ``ru_maxrss`` would remember the data loading instead."""

    def __enter__(self) -> RssSampler:
        self.before = self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def child_train(args: argparse.Namespace) -> dict:
    import torch  # noqa: F401

    import pyrovae
    from pyrovae.hostmem import keep_freed_memory

    base = peak_mb()
    keep_freed_memory()  # as the CLI does for training
    raw = pyrovae.load_dataset("fashion-mnist", args.data_dir)
    splits = pyrovae.make_splits(raw, pyrovae.Pixels("dynamic"), torch.device("cpu"), val_size=0)
    vae = pyrovae.build_vae(splits.train.shape, "bernoulli", "iwae", splits.train_pixel_mean)
    res = pyrovae.fit(vae.model, vae.guide, splits.train, elbo="meanfield", epochs=1, batch_size=100, quiet=True)
    return {"base": base, "peak": peak_mb(), "n": len(splits.train), "seconds": res.history[0]["seconds"]}


def child_eval(args: argparse.Namespace) -> dict:
    import pyro
    import torch

    from pyrovae.infer.importance import log_likelihood
    from pyrovae.runs import load_run

    pyro.set_rng_seed(0)
    _, splits, vae = load_run(args.run, "auto")
    x = splits.test.batch(torch.arange(args.n, device=splits.test.device))
    cuda = x.device.type == "cuda"
    log_likelihood(vae.model, vae.guide, x[:2], num_samples=64, memory_mb=args.budget)  # warm-up: lazy inits, allocator
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
        log_p = log_likelihood(vae.model, vae.guide, x, num_samples=args.k, memory_mb=args.budget)
        rise = torch.cuda.max_memory_allocated() / 2**20 - before
    else:
        with RssSampler() as rss:
            log_p = log_likelihood(vae.model, vae.guide, x, num_samples=args.k, memory_mb=args.budget)
        rise = rss.peak - rss.before
    return {"rise": rise, "mean_log_p": float(log_p.mean()), "device": x.device.type}


def run_child(*extra: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *extra], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST idx files")
    p.add_argument("--run", default="runs/fm", help="a trained run folder for the evaluation rows")
    p.add_argument("--k", type=int, default=5000)
    p.add_argument("--n", type=int, default=20, help="test images per evaluation")
    p.add_argument("--memory-mb", type=float, nargs="+", default=[16, 64, 256, 1024])
    p.add_argument("--child", choices=["train", "eval"], help=argparse.SUPPRESS)
    p.add_argument("--budget", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child_train(args) if args.child == "train" else child_eval(args)))
        return

    sys.path.insert(0, str(HERE))
    from common import append_results, markdown_table

    data = ["--data-dir", args.data_dir] if args.data_dir else []
    tr = run_child("--child", "train", *data)
    rows = [
        [
            f"train 1 epoch, N={tr['n']}",
            "–",
            f"{tr['base']:.0f} MB after importing torch/pyro/pyrovae",
            f"{tr['peak']:.0f}",
            f"{tr['peak'] - tr['base']:.0f}",
        ]
    ]
    print(rows[-1], flush=True)
    for budget in args.memory_mb:
        ev = run_child(
            "--child", "eval", "--run", args.run, "--k", str(args.k), "--n", str(args.n), "--budget", str(budget)
        )
        rows.append(
            [
                f"log p(x), K={args.k}, {args.n} images ({ev['device']})",
                f"{budget:g}",
                "RSS before the call",
                "–",
                f"{ev['rise']:.0f}",
            ]
        )
        print(rows[-1], flush=True)
    header = ["work", "budget MB", "reference", "peak RSS MB", "rise over reference MB"]
    cmd = "python bench/memory.py " + " ".join(sys.argv[1:])
    append_results(
        "Memory: training beyond PyTorch, evaluation under a budget",
        markdown_table(header, rows),
        cmd,
        "A fresh process per row. Training: peak resident set size (ru_maxrss). Evaluation: resident set "
        "size sampled every millisecond during the call, minus the one before; on CUDA the allocator's peak. "
        "The chunk planner counts every byte its ops allocate on a small probe (an upper bound on the live "
        "peak), so the rise should stay under the budget; on a CPU it chunks at most 64 MB whatever the "
        "budget (faster), so budgets above that run alike.",
    )


if __name__ == "__main__":
    main()
