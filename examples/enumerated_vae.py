"""A VAE with a discrete latent summed out by enumeration, trained by ``fit`` and put beside the GMM by ``compare``.

    c ~ Cat(1/C),  z ~ N(0, I),  x | z, c ~ Bernoulli(decoder(z, c));   q(z | x) = N(encoder(x))

The class c is never sampled: ``config_enumerate`` marks it and ``TraceEnum_ELBO`` sums the ELBO over its
C values. ``log_likelihood`` sums it exactly too: each importance weight is Σ_c p(x, c, z) / q(z | x),
with the enumerated values in a dim left of the particles' (Pyro's ``enum`` handler); only z is sampled.

    python examples/enumerated_vae.py --dataset fashion-mnist --epochs 10 --out runs/enum
"""

from __future__ import annotations

import argparse
import time

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import TraceEnum_ELBO, config_enumerate
from torch import nn

import pyrovae
from pyrovae.tasks.compare import fit_mixture, n_params


class EnumeratedVAE(nn.Module):
    def __init__(self, d_x: int, n_classes: int = 10, d_z: int = 10, hidden: int = 200) -> None:
        super().__init__()
        self.d_z, self.n_classes = d_z, n_classes
        self.encoder = nn.Sequential(nn.Linear(d_x, hidden), nn.Softplus(), nn.Linear(hidden, 2 * d_z))
        self.decoder = nn.Sequential(nn.Linear(d_z + n_classes, hidden), nn.Softplus(), nn.Linear(hidden, d_x))

    def decode(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Pixel logits for every (enumerated class, particle, image): the leading dims broadcast."""
        one_hot = nn.functional.one_hot(c, self.n_classes).to(z)
        shape = torch.broadcast_shapes(z.shape[:-1], one_hot.shape[:-1])
        return self.decoder(torch.cat([z.expand(*shape, -1), one_hot.expand(*shape, -1)], dim=-1))

    @config_enumerate
    def model(self, x: torch.Tensor) -> None:
        pyro.module("enum_vae", self)
        x = x.flatten(1)
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Categorical(logits=x.new_zeros(self.n_classes)))
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], self.d_z), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decode(z, c)).to_event(1), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        pyro.module("enum_vae", self)
        x = x.flatten(1)
        with pyro.plate("data", x.shape[0]):
            loc, log_scale = self.encoder(x).chunk(2, dim=-1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Train a VAE with an enumerated class and put it beside a mixture")
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
    n = min(args.n, len(splits.test))
    x_test = splits.test.batch(torch.arange(n, device=splits.test.device))

    vae = EnumeratedVAE(int(torch.Size(splits.train.shape).numel())).to(device)
    t0 = time.perf_counter()
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    pyrovae.fit(vae.model, vae.guide, splits.train, elbo=elbo, epochs=args.epochs, val_data=splits.val, quiet=True)
    seconds = time.perf_counter() - t0
    log_p = pyrovae.log_likelihood(vae.model, vae.guide, x_test, num_samples=args.k)
    print(f"enumerated VAE: log p(x) {log_p.mean():.2f} nats/image on {n} test images (K={args.k})")

    gmm, gmm_seconds = fit_mixture(splits.train, args.gmm_k, "bernoulli", "diag", args.epochs, None, 0, True)
    return pyrovae.compare(
        {
            "enumerated": pyrovae.Fitted(
                vae.model, vae.guide, f"VAE with a {vae.n_classes}-way class summed out", n_params(vae), seconds
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
        notes=["The enumerated VAE's ELBO and log p̂ sum its class exactly; its reconstruction/KL split is undefined."],
    )


if __name__ == "__main__":
    main()
