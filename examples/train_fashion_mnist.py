"""Train the built-in VAE on Fashion-MNIST with the Python API (the CLI's `pyrovae train` does the same).

python examples/train_fashion_mnist.py --data-dir ../shared/data/FashionMNIST/raw --epochs 10
"""

from __future__ import annotations

import argparse

import pyro
import torch

import pyrovae


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist, mnist, or synthetic")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--out", default=None, help="run folder for metrics and checkpoints (optional)")
    args = p.parse_args(argv)

    pyro.set_rng_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    raw = pyrovae.synthetic() if args.dataset == "synthetic" else pyrovae.load_dataset(args.dataset, args.data_dir)
    splits = pyrovae.make_splits(
        raw, pyrovae.Pixels("dynamic"), device, val_size=min(5000, len(raw.train_x) // 5), train_size=args.train_size
    )
    vae = pyrovae.build_vae(splits.train.shape, "bernoulli", "iwae", pixel_mean=splits.train_pixel_mean.cpu()).to(
        device
    )
    result = pyrovae.fit(
        vae.model, vae.guide, splits.train, elbo="meanfield", epochs=args.epochs, val_data=splits.val, out=args.out
    )
    test_elbo = pyrovae.evaluate_elbo(vae.model, vae.guide, splits.test)
    print(f"validation ELBO {result.val_elbo:.2f}, test ELBO {test_elbo:.2f} nats/image")
    return test_elbo


if __name__ == "__main__":
    main()
