"""Where a pyrovae training step spends the time a hand-written PyTorch step does not: a per-part table.

The same Bernoulli VAE (``--arch``) is timed part by part, pyrovae's Pyro programs (meanfield ELBO,
as ``fit`` runs them: validation off, parameters collected) against the hand-written loss of
``plain_vae.py``: the guide (encoder and z draw; Pyro: traced), the model (decoder; Pyro: replayed
against the guide trace), the loss terms, backward, and the Adam step. At batch 1 the networks cost
almost nothing, so the differences are the framework's fixed cost per step; at the training batch
they show what share of a step that fixed cost is. Best of ``--repeats`` timings of ``--steps``
calls each. A cProfile of the Pyro forward at batch 1 lists the functions that remain.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import math
import pstats
import sys
import time
from pathlib import Path

import pyro
import pyro.poutine as poutine
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results, markdown_table  # noqa: E402
from plain_vae import plain_loss  # noqa: E402

from pyrovae import build_vae  # noqa: E402
from pyrovae.infer import MeanField  # noqa: E402
from pyrovae.models import parameters_collected  # noqa: E402

N_DATA = 60000


def best_us(fn, steps: int, repeats: int) -> float:
    """Microseconds per call: the best of ``repeats`` timings of ``steps`` calls (noise only adds time)."""
    for _ in range(max(3, steps // 20)):
        fn()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        best = min(best, (time.perf_counter() - t0) / steps)
    return best * 1e6


def parts(vae, x: torch.Tensor, steps: int, repeats: int) -> dict[str, tuple[float, float]]:
    """{part: (plain µs, pyrovae µs)} for one batch ``x``."""
    elbo = MeanField()
    opt = torch.optim.Adam(vae.parameters(), lr=1e-6, foreach=True)

    def plain_guide():
        loc, scale = vae.encoder(x)
        return loc, scale, loc + scale * torch.randn_like(loc)

    def plain_model():
        return vae.decoder(z_plain)

    def plain_terms():
        log_px = (x * logits).flatten(-3).sum(-1) - F.softplus(logits).flatten(-3).sum(-1)
        kl = 0.5 * (loc.pow(2) + scale.pow(2) - 1).sum(-1) - scale.log().sum(-1)
        return -(N_DATA / len(x)) * (log_px - kl).sum()

    def pyro_guide():
        return poutine.trace(vae.guide).get_trace(x, num_data=N_DATA)

    def pyro_model():
        return poutine.trace(poutine.replay(vae.model, trace=guide_tr)).get_trace(x, num_data=N_DATA)

    def pyro_forward():
        return elbo.differentiable_loss(vae.model, vae.guide, x, num_data=N_DATA)

    def plain_forward():
        return plain_loss(vae, x, N_DATA)

    def step(forward):
        def run():
            opt.zero_grad(set_to_none=True)
            forward().backward()
            opt.step()

        return run

    def backward_only(forward):
        def run():
            opt.zero_grad(set_to_none=True)
            forward().backward()

        return run

    with pyro.validation_enabled(False), parameters_collected():
        loc, scale, z_plain = plain_guide()
        logits = plain_model()
        guide_tr = pyro_guide()
        t = {
            "guide": (best_us(plain_guide, steps, repeats), best_us(pyro_guide, steps, repeats)),
            "model": (best_us(plain_model, steps, repeats), best_us(pyro_model, steps, repeats)),
            "forward": (best_us(plain_forward, steps, repeats), best_us(pyro_forward, steps, repeats)),
            "fwd+bwd": (
                best_us(backward_only(plain_forward), steps, repeats),
                best_us(backward_only(pyro_forward), steps, repeats),
            ),
            "step": (best_us(step(plain_forward), steps, repeats), best_us(step(pyro_forward), steps, repeats)),
        }
        terms_plain = best_us(plain_terms, steps, repeats)
    # loss terms: what the forward adds to guide + model (Pyro: KL dispatch, log-prob, scaling, sums)
    terms = (terms_plain, t["forward"][1] - t["guide"][1] - t["model"][1])
    return {
        "guide (encoder, z draw)": t["guide"],
        "model (decoder)": t["model"],
        "loss terms": terms,
        "forward, total": t["forward"],
        "backward": (t["fwd+bwd"][0] - t["forward"][0], t["fwd+bwd"][1] - t["forward"][1]),
        "Adam step": (t["step"][0] - t["fwd+bwd"][0], t["step"][1] - t["fwd+bwd"][1]),
        "whole step": t["step"],
    }


def pyro_profile(vae, x: torch.Tensor, calls: int = 2000, top: int = 14) -> str:
    elbo = MeanField()
    prof = cProfile.Profile()
    with pyro.validation_enabled(False), parameters_collected():
        prof.enable()
        for _ in range(calls):
            elbo.differentiable_loss(vae.model, vae.guide, x, num_data=N_DATA)
        prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
    start = next(i for i, ln in enumerate(lines) if ln.strip().startswith("ncalls"))
    rows = []
    for ln in lines[start + 1 :]:
        f = ln.split(None, 5)
        if len(f) == 6:
            where = f[5].split("site-packages/")[-1].split("/work/")[-1]
            rows.append([f"{float(f[1]) / calls * 1e6:.1f}", f"{float(f[3]) / calls * 1e6:.1f}", f"`{where}`"])
    return markdown_table(["tottime µs/step", "cumtime µs/step", "function"], rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="iwae")
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 100])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.manual_seed(0)
    vae = build_vae((1, 28, 28), "bernoulli", args.arch)
    rows = []
    for bs in args.batch_size:
        x = (torch.rand(bs, 1, 28, 28) < 0.3).float()
        for part, (a, b) in parts(vae, x, args.steps, args.repeats).items():
            rows.append([bs, part, f"{a:.0f}", f"{b:.0f}", f"{b - a:+.0f}", f"{b / a:.2f}" if a > 0 else "–"])
            print(rows[-1], flush=True)
    table = markdown_table(["batch", "part", "plain µs", "pyrovae µs", "difference µs", "ratio"], rows)
    prof = pyro_profile(vae, (torch.rand(1, 1, 28, 28) < 0.3).float())
    append_results(
        f"Train step, part by part: pyrovae (meanfield) vs hand-written PyTorch (arch {args.arch}, cpu)",
        table + "\n\ncProfile of the pyrovae forward at batch 1 (the framework's own cost):\n\n" + prof,
        "python bench/step_profile.py " + " ".join(sys.argv[1:]),
        "Best of repeats. guide/model: Pyro traces vs direct calls; loss terms: forward minus guide and "
        "model (Pyro: analytic KL dispatch, log-prob, N/B scaling, sums); backward: fwd+bwd minus forward.",
    )


if __name__ == "__main__":
    main()
