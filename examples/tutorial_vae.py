"""A VAE written as Pyro's tutorials write one, trained, scored and put beside the GMM baseline unchanged.

The program knows nothing of pyrovae: ``model(x)`` and ``guide(x)``, a plain ``pyro.plate("data", N)``,
``pyro.module`` for the networks, Bernoulli pixels with sigmoid probabilities. ``pyrovae.fit`` scales the
data plate for minibatches itself, ``pyrovae.log_likelihood`` estimates log p(x) per image, and
``pyrovae.compare`` writes the same report as ``pyrovae compare`` for it, the built-in VAE and a mixture.

    python examples/tutorial_vae.py --dataset fashion-mnist --epochs 10 --out runs/tutorial
"""

from __future__ import annotations

import argparse
import time

import pyro
import pyro.distributions as dist
import torch
from torch import nn

import pyrovae
from pyrovae.tasks.compare import fit_mixture, n_params


class Encoder(nn.Module):
    def __init__(self, d_x: int, d_z: int, hidden: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_x, hidden), nn.Softplus())
        self.loc, self.log_scale = nn.Linear(hidden, d_z), nn.Linear(hidden, d_z)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x.flatten(1))
        return self.loc(h), self.log_scale(h).exp()


class Decoder(nn.Module):
    def __init__(self, d_z: int, d_x: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_z, hidden), nn.Softplus(), nn.Linear(hidden, d_x), nn.Sigmoid())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)  # pixel probabilities; leading dims (particles, batch) pass through


class TutorialVAE(nn.Module):
    """p(z) = N(0, I), p(x | z) = Bernoulli(decoder(z)); q(z | x) = N(encoder(x))."""

    def __init__(self, d_x: int, d_z: int = 10, hidden: int = 200) -> None:
        super().__init__()
        self.d_z = d_z
        self.encoder, self.decoder = Encoder(d_x, d_z, hidden), Decoder(d_z, d_x, hidden)

    def model(self, x: torch.Tensor) -> None:
        pyro.module("decoder", self.decoder)
        x = x.flatten(1)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], self.d_z), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(self.decoder(z)).to_event(1), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            loc, scale = self.encoder(x)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Train a tutorial-style VAE and compare it with the built-in VAE and a GMM")
    p.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist, mnist, or synthetic")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--k", type=int, default=1000, help="importance samples per test image")
    p.add_argument("--n", type=int, default=1000, help="test images to score")
    p.add_argument("--gmm-k", type=int, default=10)
    p.add_argument("--out", default=None, help="folder for compare.json and compare.md (optional)")
    args = p.parse_args(argv)

    pyro.set_rng_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    raw = pyrovae.synthetic() if args.dataset == "synthetic" else pyrovae.load_dataset(args.dataset, args.data_dir)
    splits = pyrovae.make_splits(raw, pyrovae.Pixels("dynamic"), device, train_size=args.train_size)
    d_x = int(torch.Size(splits.train.shape).numel())
    n = min(args.n, len(splits.test))
    x_test = splits.test.batch(torch.arange(n, device=splits.test.device))

    mine = TutorialVAE(d_x).to(device)
    t0 = time.perf_counter()
    pyrovae.fit(mine.model, mine.guide, splits.train, epochs=args.epochs, val_data=splits.val, quiet=True)
    mine_seconds = time.perf_counter() - t0
    log_p = pyrovae.log_likelihood(mine.model, mine.guide, x_test, num_samples=args.k)
    print(f"tutorial VAE: log p(x) {log_p.mean():.2f} nats/image on {n} test images (K={args.k})")

    builtin = pyrovae.build_vae(splits.train.shape, "bernoulli", "iwae", pixel_mean=splits.train_pixel_mean.cpu())
    builtin = builtin.to(device)
    t0 = time.perf_counter()
    pyrovae.fit(builtin.model, builtin.guide, splits.train, epochs=args.epochs, quiet=True)
    builtin_seconds = time.perf_counter() - t0
    gmm, gmm_seconds = fit_mixture(splits.train, args.gmm_k, "bernoulli", "diag", args.epochs, None, 0, True)

    summary = pyrovae.compare(
        {
            "tutorial": pyrovae.Fitted(
                mine.model, mine.guide, "tutorial-style VAE (yours)", n_params(mine), mine_seconds
            ),
            "vae": pyrovae.Fitted(
                builtin.model,
                builtin.guide,
                "built-in VAE (iwae arch)",
                n_params(builtin),
                builtin_seconds,
            ),
            "gmm": pyrovae.Fitted(
                gmm.model, gmm.guide, f"Bernoulli mixture, K={args.gmm_k}", n_params(gmm), gmm_seconds, owner=gmm
            ),
        },
        x_test,
        labels=splits.test.labels[:n],
        k=args.k,
        out=args.out,
        bits_per_dim_kind="binary",
        dataset=args.dataset,
        representation="binary",
        n_train=len(splits.train),
    )
    for name, row in summary["models"].items():
        print(f"{name}: log p(x) {row['log_likelihood']:.2f} nats/image ({row['likelihood_kind']})")
    return summary


if __name__ == "__main__":
    main()
