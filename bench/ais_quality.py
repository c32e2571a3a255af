"""AIS and BDMC on a trained run: how far the IS estimate of log p(x) is from AIS, whether k̂ flags it, and what
AIS costs against the FLOP floor of its gradient evaluations.

On ``--n`` test images: IS with K importance samples (and each image's k̂) and AIS at the given schedule, both from
the same seed; the mean of AIS − IS with its standard error, and the share of images where they differ by more
than 1 nat, beside the share of those with k̂ > 0.7. On ``--bdmc-n`` images simulated from the model: the BDMC gap
at the same schedule. The floor: the matmul FLOPs of one gradient evaluation of the program per (chain, image)
(torch's FlopCounterMode, forward and backward) times the evaluations AIS made, at the measured GEMM rate.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import pyro
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results, markdown_table  # noqa: E402
from eval_speed import gemm_flops_per_second  # noqa: E402

from pyrovae.infer.ais import annealed_log_likelihood  # noqa: E402
from pyrovae.infer.bdmc import bdmc, simulate  # noqa: E402
from pyrovae.infer.diagnostics import KHAT_BAD, pareto_khat  # noqa: E402
from pyrovae.infer.hmc import _run  # noqa: E402
from pyrovae.infer.importance import log_likelihood  # noqa: E402
from pyrovae.infer.program import _inspect  # noqa: E402
from pyrovae.runs import load_run  # noqa: E402


def flops_per_evaluation(vae, x: torch.Tensor, chains: int) -> float:
    """Matmul FLOPs of one gradient evaluation per (chain, image): the program's forward (counted) times 3, for the
    backward pass through the decoder (2x its forward; the log q backward adds no matmul). FlopCounterMode cannot
    count inside ``torch.autograd.grad`` with leaf inputs, so the backward is not counted directly."""
    prog = _inspect(vae.model, vae.guide, (x[:2],), {}, None)
    args = (x[:8],)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        _run(prog, args, {}, None, chains)
    return 3 * counter.get_total_flops() / (chains * len(args[0]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--k", type=int, default=5000)
    p.add_argument("--bdmc-n", type=int, default=100)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--chains", type=int, default=None)
    p.add_argument("--leapfrog", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default torch's)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    schedule = {
        key: v
        for key, v in (("num_steps", a.steps), ("num_chains", a.chains), ("num_leapfrog", a.leapfrog))
        if v is not None
    }
    cfg, splits, vae = load_run(a.run_dir, "cpu")
    vae.eval()
    x = splits.test.batch(torch.arange(min(a.n, len(splits.test))))
    n = len(x)
    pyro.set_rng_seed(a.seed)
    t0 = time.perf_counter()
    lp_is, log_w = log_likelihood(vae.model, vae.guide, x, num_samples=a.k, return_log_weights=True)
    t_is = time.perf_counter() - t0
    khat = pareto_khat(log_w)
    del log_w
    rate0 = gemm_flops_per_second(torch.device("cpu"))
    pyro.set_rng_seed(a.seed)
    t0 = time.perf_counter()
    r = annealed_log_likelihood(vae.model, vae.guide, x, **schedule)
    t_ais = time.perf_counter() - t0
    rate = (rate0 + gemm_flops_per_second(torch.device("cpu"))) / 2
    floor = flops_per_evaluation(vae, x, r.chains) * r.evaluations * r.chains * n / rate
    diff = (r.log_likelihood - lp_is).double()
    differ = (diff.abs() > 1.0).numpy()
    bad = np.nan_to_num(khat, nan=0.0) > KHAT_BAD
    pyro.set_rng_seed(a.seed + 1)
    m = min(a.bdmc_n, n)
    sim = simulate(vae.model, x[:m])
    t0 = time.perf_counter()
    s = bdmc(vae.model, vae.guide, sim["x"], latents={"z": sim["z"]}, **schedule)
    t_bdmc = time.perf_counter() - t0
    gap = s.gap.double()
    sched = f"{r.steps} x {r.chains} x {r.leapfrog}"
    rows = [
        [
            Path(a.run_dir).name,
            n,
            f"{float(lp_is.double().mean()):.2f}",
            f"{float(np.mean(bad)):.1%}",
            sched,
            f"{float(r.log_likelihood.double().mean()):.2f}",
            f"**{float(diff.mean()):.3f} ± {float(diff.std() / math.sqrt(n)):.3f}**",
            f"{float(r.stderr.double().nan_to_num(0).pow(2).sum().sqrt() / n):.3f}",
            f"{float(r.acceptance.mean()):.2f}",
            f"{float(np.mean(differ)):.1%} ({float(bad[differ].mean()) if differ.any() else float('nan'):.0%})",
            f"{float(diff[torch.from_numpy(bad)].mean()) if bad.any() else float('nan'):.3f}",
            f"**{float(gap.mean()):.3f} ± {float(gap.std() / math.sqrt(m)):.3f}** (max {float(gap.max()):.2f}, n={m})",
            f"{t_is:.0f}",
            f"{t_ais:.0f}",
            f"{t_bdmc:.0f}",
            f"{r.evaluations:.0f}",
            f"{rate / 1e9:.0f}",
            f"{t_ais / floor:.1f}",
        ]
    ]
    header = [
        "run",
        "images",
        f"IS K={a.k}",
        "k̂ > 0.7",
        "AIS steps x chains x leapfrog",
        "AIS",
        "AIS − IS ± s.e.m.",
        "AIS MC s.e. of the mean",
        "acceptance",
        "|AIS − IS| > 1 nat (of those, k̂ > 0.7)",
        "AIS − IS where k̂ > 0.7",
        "BDMC gap ± s.e.m.",
        "IS s",
        "AIS s",
        "BDMC s",
        "gradient evals per chain",
        "GEMM GFLOP/s",
        "AIS measured/floor",
    ]
    cmd = "python bench/ais_quality.py " + " ".join(sys.argv[1:])
    notes = (
        f"Run trained {len(cfg_epochs(a.run_dir))} epochs. nats per image. Floor: matmul FLOPs of one gradient "
        "evaluation (3 x the program's forward, counted by torch.utils.flop_counter) x the evaluations AIS made "
        "(warm-up included), at the mean of the 2048x2048 float32 GEMM rates measured before and after the AIS run. "
        "No GPU was lent to this session: CPU only. The machine was shared with other jobs during the run."
    )
    append_results("AIS and BDMC against IS on a trained run", markdown_table(header, rows), cmd, notes)


def cfg_epochs(run_dir: str) -> list[str]:
    path = Path(run_dir) / "metrics.csv"
    return path.read_text().splitlines()[1:] if path.is_file() else []


if __name__ == "__main__":
    main()
