"""Training-step time and page faults on a CPU with glibc's malloc defaults vs ``pyrovae.hostmem.keep_freed_memory``.

The setting is per process, so each measurement is a fresh process (this script, re-run with ``--child``);
the two settings alternate, ``--repeats`` processes each, and the table gives the median over processes of
each one's median step. The step is the hand-written PyTorch VAE step of ``plain_vae.py`` (iwae arch,
meanfield), so the figures show the allocator alone; ``fit`` applies the same setting on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def child(batch: int, steps: int) -> None:
    import torch
    from plain_vae import plain_loss

    from pyrovae import build_vae
    from pyrovae.hostmem import keep_freed_memory

    kept = keep_freed_memory()
    torch.manual_seed(0)
    vae = build_vae((1, 28, 28), "bernoulli", "iwae")
    x = (torch.rand(batch, 1, 28, 28) < 0.3).float()
    opt = torch.optim.Adam(vae.parameters(), lr=1e-6, foreach=True)
    times = []
    for i in range(steps + 10):  # 10 warm-up steps
        if i == 10:
            faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        plain_loss(vae, x, 60000).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / steps
    print(json.dumps({"kept": kept, "ms": statistics.median(times[10:]) * 1e3, "faults": faults}))


def run(batch: int, steps: int, keep: bool) -> dict:
    env = {**os.environ, "PYROVAE_KEEP_FREED_MEMORY": "1" if keep else "0"}
    cmd = [sys.executable, __file__, "--child", "--batch-size", str(batch), "--steps", str(steps)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, nargs="+", default=[100, 256, 1000])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=4, help="processes per setting and batch size")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.batch_size[0], args.steps)
        return
    from common import append_results, markdown_table

    rows = []
    for bs in args.batch_size:
        res: dict[bool, list[dict]] = {False: [], True: []}
        for r in range(args.repeats):  # the settings alternate, neither always first
            for keep in (False, True) if r % 2 == 0 else (True, False):
                res[keep].append(run(bs, max(20, args.steps * 100 // bs), keep))
        ms = {k: statistics.median(d["ms"] for d in v) for k, v in res.items()}
        faults = {k: statistics.median(d["faults"] for d in v) for k, v in res.items()}
        pairs = [a["ms"] / b["ms"] for a, b in zip(res[True], res[False])]
        rows.append(
            [bs, f"{ms[False]:.2f}", f"{faults[False]:.0f}", f"{ms[True]:.2f}", f"{faults[True]:.0f}"]
            + [f"{ms[True] / ms[False]:.3f}", f"{statistics.median(pairs):.3f} ({min(pairs):.3f}–{max(pairs):.3f})"]
        )
        print(rows[-1], flush=True)
    header = [
        "batch",
        "glibc defaults: ms/step",
        "page faults/step",
        "freed memory kept: ms/step",
        "page faults/step",
        "ratio of medians",
        "paired ratio, median (range)",
    ]
    append_results(
        "Host memory: a CPU training step with glibc's defaults vs pyrovae.hostmem.keep_freed_memory",
        markdown_table(header, rows),
        "python bench/host_memory.py " + " ".join(sys.argv[1:]),
        f"Hand-written PyTorch step (iwae arch, meanfield), {args.repeats} fresh processes per setting, alternating; "
        "each process's median step after 10 warm-up steps. Paired: the two processes of one repeat.",
    )


if __name__ == "__main__":
    main()
