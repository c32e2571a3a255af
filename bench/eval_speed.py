"""Importance-sampled log p(x) speed: images per second at K importance samples, against the FLOP floor.

The floor: the FLOPs of one image's K model+guide evaluations (counted by torch's FlopCounterMode:
matrix products, the bulk of the work) divided by the device's measured dense matmul rate (the
best of several large float32 GEMMs). The ratio measured/floor shows how far from the limit the
evaluation runs. On a CPU the full 10k x 5000 run takes minutes, so ``--n`` images are timed and
the 10k time extrapolated (the work per image is constant). The images run in ``--blocks`` blocks,
each right after its own GEMM-rate measurement: a shared machine's speed drifts by tens of percent
over minutes, and a ratio of two timings taken far apart would carry that drift.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import pyro
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results, markdown_table  # noqa: E402
from plain_vae import plain_log_likelihood  # noqa: E402

from pyrovae.infer.importance import log_likelihood  # noqa: E402
from pyrovae.infer.memory import CPU_CHUNK_MB, DEFAULT_MEMORY_MB, _plan, _probe_particles, chunk_budget_mb  # noqa: E402
from pyrovae.infer.program import _inspect, _traces  # noqa: E402
from pyrovae.runs import load_run  # noqa: E402


def gemm_flops_per_second(device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        (a @ b).sum().item()
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def flops_per_image(model, guide, x: torch.Tensor, k: int) -> float:
    """Matmul FLOPs of the guide and model for one image and k particles (counted on 64 particles)."""
    probe_k = min(k, 64)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        _traces(model, guide, (x[:1],), {}, probe_k, -2)
    return counter.get_total_flops() * k / probe_k


def planned_chunks(vae, xb: torch.Tensor, k: int, budget: float, pdim: int) -> tuple[int, int]:
    """Particles and images per call as pyrovae's planner picks them for ``xb`` under ``budget`` MB."""
    prog = _inspect(vae.model, vae.guide, (xb[:8],), {}, None)
    return _plan(k, len(xb), None, None, budget, lambda: _probe_particles(prog, (xb[:8],), {}, len(xb[:8]), 8))


def time_call(fn, xb: torch.Tensor, device: torch.device) -> tuple[float, torch.Tensor]:
    """Seconds for ``fn(xb)`` (a log p estimator), device work included, and its estimates."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    lp = fn(xb)
    float(lp.mean())  # waits for the device
    return time.perf_counter() - t0, lp


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a trained run folder (e.g. runs/fm)")
    p.add_argument("--k", type=int, default=5000)
    p.add_argument("--n", type=int, default=500, help="test images timed")
    p.add_argument("--blocks", type=int, default=10, help="blocks of images, each timed against its own GEMM rate")
    p.add_argument("--memory-mb", type=float, nargs="+", default=[None])
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    pyro.set_rng_seed(0)
    cfg, splits, vae = load_run(args.run, args.device)
    device = splits.test.device
    x = splits.test.batch(torch.arange(min(args.n, len(splits.test)), device=device))
    per_image = flops_per_image(vae.model, vae.guide, x, args.k)
    rows = []
    pdim = _inspect(vae.model, vae.guide, (x[:2],), {}, None).pdim
    blocks = max(1, min(args.blocks, len(x)))
    bounds = [round(i * len(x) / blocks) for i in range(blocks + 1)]
    for mb in args.memory_mb:
        budget = chunk_budget_mb(mb, device)
        ours = functools.partial(log_likelihood, vae.model, vae.guide, num_samples=args.k, memory_mb=mb)
        plan = planned_chunks(vae, x[:4], args.k, budget, pdim)
        for side in (ours, functools.partial(plain_log_likelihood, vae, k=args.k, chunk=plan[0], batch=plan[1])):
            side(x[:4])  # warm-up
        seconds, ratios, peaks, vs_plain, diffs = 0.0, [], [], [], []
        for i, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
            # the hand-written estimator runs the chunks pyrovae's planner picks for this block (its probe reads
            # the block's first images, so the chunks can differ by a particle between blocks)
            plan = planned_chunks(vae, x[lo:hi], args.k, budget, pdim)
            sides = {
                "pyrovae": ours,
                "plain": functools.partial(plain_log_likelihood, vae, k=args.k, chunk=plan[0], batch=plan[1]),
            }
            peak = gemm_flops_per_second(device, repeats=2)
            timed = {}
            for name in sorted(sides, reverse=i % 2 == 1):  # neither side always runs first
                pyro.set_rng_seed(i)  # both sides draw the same z: their estimates must agree
                timed[name] = time_call(sides[name], x[lo:hi], device)
            dt = timed["pyrovae"][0]
            seconds += dt
            peaks.append(peak)
            ratios.append((dt / (hi - lo)) / (per_image / peak))
            vs_plain.append(dt / timed["plain"][0])
            diffs.append(float((timed["pyrovae"][1] - timed["plain"][1]).abs().max()))
        rate = len(x) / seconds
        ratios.sort()
        vs_plain.sort()
        rows.append(
            [
                f"{args.k}",
                f"{len(x)} in {blocks}",
                f"{mb or DEFAULT_MEMORY_MB:g}"
                + (f" ({CPU_CHUNK_MB:g} used on a CPU)" if device.type == "cpu" and (mb or 1e9) > CPU_CHUNK_MB else ""),
                f"{rate:.1f}",
                f"{10000 / rate:.0f}",
                f"{per_image / 1e9:.2f}",
                f"{statistics.median(peaks) / 1e9:.0f} ({min(peaks) / 1e9:.0f}–{max(peaks) / 1e9:.0f})",
                f"{10000 * per_image / statistics.median(peaks):.0f}",
                f"**{statistics.median(ratios):.2f}** ({ratios[len(ratios) // 4]:.2f}–{ratios[(3 * len(ratios)) // 4]:.2f})",
                f"{plan[0]} x {plan[1]}",
                f"**{statistics.median(vs_plain):.3f}** ({vs_plain[len(vs_plain) // 4]:.3f}–{vs_plain[(3 * len(vs_plain)) // 4]:.3f})",
                f"{max(diffs):.1e}",
            ]
        )
        print(rows[-1], flush=True)
    header = [
        "K",
        "images timed",
        "memory MB",
        "images/s",
        "s for 10k",
        "GFLOP/image",
        "GEMM GFLOP/s, median (range)",
        "floor s for 10k",
        "measured/floor per block, median (quartiles)",
        "particles x images per call",
        "pyrovae / hand-written, per block, median (quartiles)",
        "max abs log p̂ difference (nats)",
    ]
    append_results(
        f"Evaluation speed: log p(x), K={args.k} ({cfg.data.dataset}, arch {cfg.model.arch}, {device.type})",
        markdown_table(header, rows),
        "python bench/eval_speed.py " + " ".join(sys.argv[1:]),
        "FLOPs counted by torch.utils.flop_counter (matrix products only); the floor assumes the whole "
        "work ran at the 2048x2048 float32 GEMM rate measured just before each block of images. Hand-written: the "
        "same estimator in plain PyTorch (bench/plain_vae.py), same networks and chunks, run next to pyrovae on "
        "each block (order alternating) from the same seed, so the two must give the same estimates (last column).",
    )


if __name__ == "__main__":
    main()
