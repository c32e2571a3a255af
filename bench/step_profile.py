"""Where a pyrovae training step spends the time a hand-written PyTorch step does not: a per-part table.

The same Bernoulli VAE (``--arch``) is timed part by part, pyrovae's Pyro programs (meanfield ELBO,
as ``fit`` runs them: validation off, parameters collected) against the meanfield loss of
``plain_vae.py``, written out here part by part: the guide (encoder and z draw; Pyro: traced), the model (decoder; Pyro: replayed
against the guide trace), the loss terms, backward, and the Adam step. At batch 1 the networks cost
almost nothing, so the differences are the framework's fixed cost per step; at the training batch
they show what share of a step that fixed cost is. Every step is timed part by part, the two sides
alternating step by step; the table gives medians over ``--steps`` steps. A cProfile of the Pyro
forward at batch 1 lists the functions that remain.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

import pyro
import pyro.poutine as poutine
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results, markdown_table  # noqa: E402
from plain_vae import bernoulli_log_px, normal_kl  # noqa: E402

from pyrovae import build_vae  # noqa: E402
from pyrovae.infer import MeanField  # noqa: E402
from pyrovae.models.vae import parameters_collected  # noqa: E402

N_DATA = 60000
REPO = str(Path(__file__).resolve().parents[1])  # shown relative to the checkout


def parts(vae, x: torch.Tensor, steps: int) -> dict[str, tuple[float, float]]:
    """{part: (plain µs, pyrovae µs)}: medians over ``steps`` training steps per side on batch ``x``.

    Every step is timed part by part (guide, model, loss terms, backward, Adam step); the sides alternate
    step by step (order alternating too), so both see the same state of a shared machine. pyrovae's parts
    are exactly what ``MeanField.differentiable_loss`` runs in ``fit``'s hot loop, called one by one.
    """
    elbo = MeanField()
    opt = torch.optim.Adam(vae.parameters(), lr=1e-6, foreach=True)

    def plain_step() -> list[float]:
        t = [time.perf_counter()]
        loc, scale = vae.encoder(x)
        z = loc + scale * torch.randn_like(loc)
        t.append(time.perf_counter())
        logits = vae.decoder(z)
        t.append(time.perf_counter())
        loss = -(N_DATA / len(x)) * (bernoulli_log_px(x, logits) - normal_kl(loc, scale)).sum()
        t.append(time.perf_counter())
        return t + finish(loss)

    def pyro_step() -> list[float]:
        t = [time.perf_counter()]
        guide_tr = poutine.trace(vae.guide).get_trace(x, num_data=N_DATA)
        t.append(time.perf_counter())
        model_tr = poutine.trace(poutine.replay(vae.model, trace=guide_tr)).get_trace(x, num_data=N_DATA)
        t.append(time.perf_counter())
        loss = elbo._differentiable_loss_particle(model_tr, guide_tr)[1]
        t.append(time.perf_counter())
        return t + finish(loss)

    def finish(loss: torch.Tensor) -> list[float]:
        loss.backward()
        t = [time.perf_counter()]
        opt.step()
        opt.zero_grad(set_to_none=True)
        return t + [time.perf_counter()]

    names = ["guide (encoder, z draw)", "model (decoder)", "loss terms", "backward", "Adam step"]
    runs: dict[str, list[list[float]]] = {"plain": [], "pyrovae": []}
    sides = {"plain": plain_step, "pyrovae": pyro_step}
    with pyro.validation_enabled(False), parameters_collected():
        for i in range(steps + 20):  # the first 20 pairs are warm-up
            for side in sorted(sides, reverse=i % 2 == 1):
                t = sides[side]()
                if i >= 20:
                    runs[side].append([b - a for a, b in zip(t, t[1:])])
    med = {side: [statistics.median(r[j] for r in rs) * 1e6 for j in range(len(names))] for side, rs in runs.items()}
    out = {name: (med["plain"][j], med["pyrovae"][j]) for j, name in enumerate(names)}
    out["forward, total"] = tuple(
        statistics.median(sum(r[:3]) for r in runs[side]) * 1e6 for side in ("plain", "pyrovae")
    )
    out["whole step"] = tuple(statistics.median(sum(r) for r in runs[side]) * 1e6 for side in ("plain", "pyrovae"))
    return out


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
            where = f[5].split("site-packages/")[-1].replace(f"{REPO}/", "")
            rows.append([f"{float(f[1]) / calls * 1e6:.1f}", f"{float(f[3]) / calls * 1e6:.1f}", f"`{where}`"])
    return markdown_table(["tottime µs/step", "cumtime µs/step", "function"], rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="iwae")
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 100])
    p.add_argument("--steps", type=int, default=1000, help="timed steps per side and batch size")
    args = p.parse_args()
    torch.manual_seed(0)
    vae = build_vae((1, 28, 28), "bernoulli", args.arch)
    rows = []
    for bs in args.batch_size:
        x = (torch.rand(bs, 1, 28, 28) < 0.3).float()
        for part, (a, b) in parts(vae, x, args.steps).items():
            rows.append([bs, part, f"{a:.0f}", f"{b:.0f}", f"{b - a:+.0f}", f"{b / a:.2f}" if a > 0 else "–"])
            print(rows[-1], flush=True)
    table = markdown_table(["batch", "part", "plain µs", "pyrovae µs", "difference µs", "ratio"], rows)
    prof = pyro_profile(vae, (torch.rand(1, 1, 28, 28) < 0.3).float())
    append_results(
        f"Train step, part by part: pyrovae (meanfield) vs hand-written PyTorch (arch {args.arch}, cpu)",
        table + "\n\ncProfile of the pyrovae forward at batch 1 (the framework's own cost):\n\n" + prof,
        "python bench/step_profile.py " + " ".join(sys.argv[1:]),
        "Medians over the timed steps, the sides alternating step by step. guide/model: Pyro's guide trace and "
        "replayed model vs direct calls; loss terms: Pyro: analytic KL dispatch, log-prob, N/B scaling, sums.",
    )


if __name__ == "__main__":
    main()
