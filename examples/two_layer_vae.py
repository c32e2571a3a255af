"""Write your own generative model as a Pyro program and train it with the same `fit`.

A VAE with two stochastic layers (Burda et al.'s 2-layer architecture, smaller):

    z2 ~ N(0, I),   z1 | z2 ~ N(mu(z2), sigma(z2)),   x | z1 ~ Bernoulli(f(z1))
    q(z1 | x) q(z2 | z1)

    python examples/two_layer_vae.py --data-dir ../shared/data/FashionMNIST/raw --epochs 5
"""

from __future__ import annotations

import argparse

import pyro
import pyro.distributions as dist
import torch
from torch import nn

import pyrovae
from pyrovae.models.vae import data_plate


def gaussian_layer(d_in: int, d_hidden: int, d_out: int) -> nn.Module:
    """An MLP that outputs the loc and log-scale of a diagonal Gaussian."""
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.Tanh(), nn.Linear(d_hidden, 2 * d_out))


class TwoLayerVAE(nn.Module):
    def __init__(self, d_x: int = 784, z1: int = 32, z2: int = 16, hidden: int = 200) -> None:
        super().__init__()
        self.z1, self.z2 = z1, z2
        self.p_z1 = gaussian_layer(z2, hidden, z1)
        self.p_x = nn.Sequential(nn.Linear(z1, hidden), nn.Tanh(), nn.Linear(hidden, d_x))
        self.q_z1 = gaussian_layer(d_x, hidden, z1)
        self.q_z2 = gaussian_layer(z1, hidden, z2)

    @staticmethod
    def normal(params: torch.Tensor) -> dist.Distribution:
        loc, log_scale = params.chunk(2, -1)
        return dist.Normal(loc, log_scale.exp()).to_event(1)

    def model(self, x: torch.Tensor, num_data: int | None = None) -> None:
        pyro.module("two_layer", self)
        x = x.flatten(1)
        with data_plate(x, num_data):
            z2 = pyro.sample("z2", dist.Normal(x.new_zeros(self.z2), 1.0).to_event(1))
            z1 = pyro.sample("z1", self.normal(self.p_z1(z2)))
            pyro.sample("x", dist.Bernoulli(logits=self.p_x(z1)).to_event(1), obs=x)

    def guide(self, x: torch.Tensor, num_data: int | None = None) -> None:
        pyro.module("two_layer", self)
        x = x.flatten(1)
        with data_plate(x, num_data):
            z1 = pyro.sample("z1", self.normal(self.q_z1(x)))
            pyro.sample("z2", self.normal(self.q_z2(z1)))


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description="Train a two-stochastic-layer VAE with pyrovae.fit")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--elbo", default="trace", help="trace or iwae (the KL between layers has no closed form)")
    args = p.parse_args(argv)

    pyro.set_rng_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    raw = pyrovae.synthetic() if args.dataset == "synthetic" else pyrovae.load_dataset(args.dataset, args.data_dir)
    splits = pyrovae.make_splits(
        raw, pyrovae.Pixels("dynamic"), device, val_size=min(5000, len(raw.train_x) // 5), train_size=args.train_size
    )
    vae = TwoLayerVAE(d_x=int(torch.Size(splits.train.shape).numel())).to(device)
    result = pyrovae.fit(vae.model, vae.guide, splits.train, elbo=args.elbo, epochs=args.epochs, val_data=splits.val)
    print(f"two-layer VAE: validation ELBO {result.val_elbo:.2f} nats/image after {args.epochs} epochs")
    return result.val_elbo


if __name__ == "__main__":
    main()
