"""A conditional VAE, p(x | y) with the label y given, trained by ``fit`` and put beside the GMM by ``compare``.

    z ~ N(0, I),  x | z, y ~ Bernoulli(decoder(z, y));   q(z | x, y) = N(encoder(x, y))

The program takes ``(x, y)``: ``fit`` trains on a dataset of (images, one-hot labels), ``log_likelihood``
scores log p(x | y) per image, and ``compare`` passes the labels along (``Fitted.args``). A conditional
likelihood is not p(x): the report says so beside the mixture's unconditional log p(x).

    python examples/conditional_vae.py --dataset fashion-mnist --epochs 10 --out runs/cvae
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


def joined(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a`` and ``b`` side by side in the last dim, their leading dims (particles, batch) broadcast."""
    shape = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    return torch.cat([a.expand(*shape, -1), b.expand(*shape, -1)], dim=-1)


class ConditionalVAE(nn.Module):
    def __init__(self, d_x: int, n_classes: int, d_z: int = 10, hidden: int = 200) -> None:
        super().__init__()
        self.d_z = d_z
        self.encoder = nn.Sequential(nn.Linear(d_x + n_classes, hidden), nn.Softplus(), nn.Linear(hidden, 2 * d_z))
        self.decoder = nn.Sequential(nn.Linear(d_z + n_classes, hidden), nn.Softplus(), nn.Linear(hidden, d_x))

    def model(self, x: torch.Tensor, y: torch.Tensor) -> None:
        pyro.module("cvae", self)
        x = x.flatten(1)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], self.d_z), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(joined(z, y))).to_event(1), obs=x)

    def guide(self, x: torch.Tensor, y: torch.Tensor) -> None:
        pyro.module("cvae", self)
        x = x.flatten(1)
        with pyro.plate("data", x.shape[0]):
            loc, log_scale = self.encoder(joined(x, y)).chunk(2, dim=-1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Train a conditional VAE and put it beside a mixture")
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
    classes = int(raw.train_y.max()) + 1

    def labelled(split, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.arange(count, device=split.device)
        return split.batch(idx), nn.functional.one_hot(split.labels[:count].long(), classes).float().to(device)

    x_train, y_train = labelled(splits.train, len(splits.train))  # binarised once
    n = min(args.n, len(splits.test))
    x_test, y_test = labelled(splits.test, n)

    cvae = ConditionalVAE(x_train[0].numel(), classes).to(device)
    t0 = time.perf_counter()
    pyrovae.fit(cvae.model, cvae.guide, pyrovae.TensorData(x_train, y_train), epochs=args.epochs, quiet=True)
    seconds = time.perf_counter() - t0
    log_p = pyrovae.log_likelihood(cvae.model, cvae.guide, x_test, y_test, num_samples=args.k)
    print(f"conditional VAE: log p(x | y) {log_p.mean():.2f} nats/image on {n} test images (K={args.k})")

    gmm, gmm_seconds = fit_mixture(splits.train, args.gmm_k, "bernoulli", "diag", args.epochs, None, 0, True)
    return pyrovae.compare(
        {
            "cvae": pyrovae.Fitted(
                cvae.model,
                cvae.guide,
                "conditional VAE, log p of x given its label",
                n_params(cvae),
                seconds,
                args=(y_test,),
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
        notes=["The conditional VAE's column is log p(x | y), given the label; the mixture's is log p(x)."],
    )


if __name__ == "__main__":
    main()
