"""Train a VAE on images with missing pixels, then complete held-out images and score the completions.

python examples/missing_pixels.py --dataset synthetic --epochs 5
python examples/missing_pixels.py --data-dir ../shared/data/FashionMNIST/raw --epochs 10 --n 500
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pyro
import torch

import pyrovae
from pyrovae.models.masked import MaskedImageData, build_masked_vae
from pyrovae.tasks.complete import (
    baseline_log_likelihood,
    completion_grid,
    completion_log_likelihood,
    sample_completions,
)


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist, mnist, or synthetic")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--train-mask", default="mix", help="random, top-half or mix (default mix)")
    p.add_argument("--mask", default="top-half", help="mask of the test images (default top-half)")
    p.add_argument("--rate", type=float, default=0.5, help="missing rate of random masks")
    p.add_argument("--k", type=int, default=1000, help="importance samples per image")
    p.add_argument("--n", type=int, default=500, help="test images to complete")
    p.add_argument("--out", default="runs/example-missing", help="folder for completions.png")
    args = p.parse_args(argv)

    pyro.set_rng_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    raw = pyrovae.synthetic() if args.dataset == "synthetic" else pyrovae.load_dataset(args.dataset, args.data_dir)
    splits = pyrovae.make_splits(raw, pyrovae.Pixels("dynamic"), device, val_size=min(5000, len(raw.train_x) // 5))
    vae = build_masked_vae(splits.train.shape, "bernoulli", "iwae", pixel_mean=splits.train_pixel_mean.cpu()).to(device)
    # batches are (x, mask): fresh masks per training batch, seeded fixed masks for validation
    pyrovae.fit(
        vae.model,
        vae.guide,
        MaskedImageData(splits.train, args.train_mask, args.rate),
        epochs=args.epochs,
        val_data=MaskedImageData(splits.val, args.train_mask, args.rate, fixed_seed=1),
    )

    test = MaskedImageData(splits.test, args.mask, args.rate, fixed_seed=2)
    n = min(args.n, len(test))
    x, m = test.batch(torch.arange(n, device=test.device))
    res = completion_log_likelihood(vae, x, m, args.k)
    train_x = splits.train.batch(torch.arange(min(10000, len(splits.train)), device=test.device))
    base = baseline_log_likelihood(train_x, x, m, binary=True)
    missing = float(res.n_missing.sum())
    diff = (res.log_p_missing - base).double()
    out = {
        "log_p_missing": float(res.log_p_missing.mean()),
        "log_p_missing_per_pixel": float(res.log_p_missing.sum()) / missing,
        "baseline": float(base.mean()),
        "baseline_per_pixel": float(base.sum()) / missing,
        "improvement": float(diff.mean()),
        "improvement_sem": float(diff.std() / math.sqrt(n)),
        "snis_bias_estimate": float(res.bias.mean()),
    }
    print(
        f"{args.mask} mask, {n} test images, K={args.k}: log p(x_miss|x_obs) {out['log_p_missing']:.2f} nats/image "
        f"({out['log_p_missing_per_pixel']:.4f}/pixel) vs per-pixel baseline {out['baseline']:.2f} "
        f"({out['baseline_per_pixel']:.4f}/pixel); improvement {out['improvement']:.2f} ± {out['improvement_sem']:.2f}"
    )
    Path(args.out).mkdir(parents=True, exist_ok=True)
    grid = completion_grid(
        x[:8], m[:8], sample_completions(vae, x[:8], m[:8], 5, args.k), Path(args.out) / "completions.png"
    )
    print(f"completions: {grid}")
    return out


if __name__ == "__main__":
    main()
