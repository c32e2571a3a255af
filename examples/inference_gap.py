"""Train a VAE, then split its inference gap into approximation and amortisation parts (Cremer et al. 2018)
and compare q and the per-datapoint q* with the true posterior sampled by NUTS.

    python examples/inference_gap.py --dataset synthetic --epochs 3 --n 20 --steps 200 --k 1000 \\
        --nuts-points 1 --warmup 100 --samples 100
    python examples/inference_gap.py --data-dir ../shared/data/FashionMNIST/raw --epochs 10 --n 100
"""

from __future__ import annotations

import argparse

import pyro
import torch

import pyrovae
from pyrovae.tasks.gap import inference_gaps, nuts_posterior, posterior_check


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist, mnist, or synthetic")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--n", type=int, default=100, help="test images")
    p.add_argument("--steps", type=int, default=500, help="SVI steps of the local fit")
    p.add_argument("--k", type=int, default=5000, help="importance samples per proposal")
    p.add_argument("--nuts-points", type=int, default=3)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--samples", type=int, default=300)
    p.add_argument("--jit", action="store_true", help="JIT-trace the NUTS potential (about 2x faster)")
    args = p.parse_args(argv)

    pyro.set_rng_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    raw = pyrovae.synthetic() if args.dataset == "synthetic" else pyrovae.load_dataset(args.dataset, args.data_dir)
    splits = pyrovae.make_splits(raw, pyrovae.Pixels("dynamic"), device, val_size=min(5000, len(raw.train_x) // 5))
    vae = pyrovae.build_vae(splits.train.shape, "bernoulli", "iwae", pixel_mean=splits.train_pixel_mean.cpu()).to(
        device
    )
    pyrovae.fit(vae.model, vae.guide, splits.train, epochs=args.epochs, val_data=splits.val)

    x = splits.test.batch(torch.arange(min(args.n, len(splits.test)), device=device))
    res = inference_gaps(vae, x, args.steps, args.k)
    out = {
        "log_likelihood": float(res.log_p.mean()),
        "elbo_qstar": float(res.elbo_qstar.mean()),
        "elbo_q": float(res.elbo_q.mean()),
        "approximation_gap": float(res.approximation_gap.mean()),
        "amortization_gap": float(res.amortization_gap.mean()),
    }
    mc = float(res.elbo_q_se.pow(2).sum().sqrt() / len(x))
    print(
        f"{len(x)} test images: log p̂(x) {out['log_likelihood']:.2f}, L[q*] {out['elbo_qstar']:.2f}, "
        f"L[q] {out['elbo_q']:.2f} (MC error {mc:.3f}) nats/image"
    )
    print(
        f"approximation gap {out['approximation_gap']:.2f}, amortisation gap {out['amortization_gap']:.2f} nats/image"
    )
    if args.nuts_points > 0:
        pts = min(args.nuts_points, len(x))
        idata = nuts_posterior(
            vae,
            x[:pts],
            warmup=args.warmup,
            samples=args.samples,
            init_loc=res.qstar_loc[:pts].to(device),
            init_scale=res.qstar_scale[:pts].to(device),
            jit=args.jit,
        )
        for r in posterior_check(idata, (res.q_loc, res.q_scale), (res.qstar_loc, res.qstar_scale)):
            print(
                f"image {r['point']}: R̂ max {r['r_hat_max']:.3f}, ESS bulk min {r['ess_bulk_min']:.0f}; "
                f"mean error q {r['q_mean_error']:.2f} / q* {r['qstar_mean_error']:.2f} posterior sds; "
                f"sd ratio q {r['q_sd_ratio']:.2f} / q* {r['qstar_sd_ratio']:.2f}"
            )
    return out


if __name__ == "__main__":
    main()
