"""Pyro's semi-supervised VAE example (M2), written as that example writes it, trained by one ``fit`` with its
auxiliary classification loss added as the example adds it.

The programs are the example's: ``model(xs, ys=None)`` / ``guide(xs, ys=None)`` with ``pyro.plate("data")`` without
a size, y observed when given and otherwise drawn from q(y | x) in the guide, which ``config_enumerate`` marks for
exact summation by ``TraceEnum_ELBO(max_plate_nesting=1)``; and ``model_classify`` / ``guide_classify``, the
auxiliary loss α · log q(y | x) on labelled data. Pyro's example alternates labelled and unlabelled minibatches of
two SVI objects; here each minibatch holds both, and ``fit(..., extra=[...])`` adds the labelled terms to the
unlabelled ELBO on every step:

    loss = -ELBO(x_u) - (N_l / N_u) · [ELBO(x_l, y_l) + α · log q(y_l | x_l)]      (all scaled to the data by fit)

    python examples/pyro_ssvae.py --labels 100 --epochs 10
"""

from __future__ import annotations

import argparse

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.infer import TraceEnum_ELBO, config_enumerate
from torch import nn

import pyrovae
from pyrovae.data import Call


class SSVAE(nn.Module):
    def __init__(self, pixels: int, classes: int, z_dim: int = 20, hidden: int = 300, aux: float = 50.0) -> None:
        super().__init__()
        self.output_size, self.z_dim, self.aux_loss_multiplier = classes, z_dim, aux
        self.encoder_y = nn.Sequential(nn.Linear(pixels, hidden), nn.Softplus(), nn.Linear(hidden, classes),
                                       nn.Softmax(dim=-1))  # fmt: skip
        self.encoder_z = nn.Sequential(nn.Linear(pixels + classes, hidden), nn.Softplus(),
                                       nn.Linear(hidden, 2 * z_dim))  # fmt: skip
        self.decoder = nn.Sequential(nn.Linear(z_dim + classes, hidden), nn.Softplus(), nn.Linear(hidden, pixels),
                                     nn.Sigmoid())  # fmt: skip

    @staticmethod
    def joined(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        shape = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
        return torch.cat([a.expand(*shape, -1), b.expand(*shape, -1)], dim=-1)

    def model(self, xs, ys=None):
        pyro.module("ss_vae", self)
        batch_size = xs.size(0)
        with pyro.plate("data"):
            prior_loc = xs.new_zeros(batch_size, self.z_dim)
            zs = pyro.sample("z", dist.Normal(prior_loc, torch.ones_like(prior_loc)).to_event(1))
            alpha_prior = xs.new_ones(batch_size, self.output_size) / self.output_size
            ys = pyro.sample("y", dist.OneHotCategorical(alpha_prior), obs=ys)
            loc = self.decoder(self.joined(zs, ys))
            pyro.sample("x", dist.Bernoulli(loc).to_event(1), obs=xs)
            return loc

    def guide(self, xs, ys=None):
        with pyro.plate("data"):
            if ys is None:
                alpha = self.encoder_y(xs)
                ys = pyro.sample("y", dist.OneHotCategorical(alpha))
            loc, log_scale = self.encoder_z(self.joined(xs, ys)).chunk(2, dim=-1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))

    def model_classify(self, xs, ys=None):
        pyro.module("ss_vae", self)
        with pyro.plate("data"):
            if ys is not None:
                alpha = self.encoder_y(xs)
                with poutine.scale(scale=self.aux_loss_multiplier):
                    pyro.sample("y_aux", dist.OneHotCategorical(alpha), obs=ys)

    def guide_classify(self, xs, ys=None):
        """Nothing to infer: the classification loss has no latent."""


class WithLabels:
    """Minibatches of unlabelled images, each with as many labelled (image, one-hot label) pairs drawn beside it."""

    def __init__(self, xs: torch.Tensor, xs_l: torch.Tensor, ys_l: torch.Tensor, seed: int = 0) -> None:
        self.xs, self.xs_l, self.ys_l = xs, xs_l, ys_l
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.xs)

    def batch(self, idx: torch.Tensor) -> Call:
        j = torch.randint(len(self.xs_l), (len(idx),), generator=self.generator)
        return Call((self.xs[idx], self.xs_l[j], self.ys_l[j]), {})


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist, mnist, or synthetic")
    p.add_argument("--labels", type=int, default=100, help="labelled training images (the rest unlabelled)")
    p.add_argument("--train-size", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    raw = pyrovae.synthetic(args.train_size, 500, seed=args.seed) if args.dataset == "synthetic" else (
        pyrovae.load_dataset(args.dataset))  # fmt: skip
    images = (raw.train_x[: args.train_size].flatten(1).float() / 255 > 0.5).float()
    labels = raw.train_y[: args.train_size].long()
    classes = int(raw.train_y.max()) + 1
    g = torch.Generator().manual_seed(args.seed)
    labelled = torch.randperm(len(images), generator=g)[: args.labels]
    xs_l, ys_l = images[labelled], nn.functional.one_hot(labels[labelled], classes).float()
    test_x = (raw.test_x.flatten(1).float() / 255 > 0.5).float()

    torch.manual_seed(args.seed)
    ss = SSVAE(images.shape[1], classes)
    share = args.labels / len(images)  # the labelled terms count N_l labelled images, scaled to the unlabelled N
    enumerated_guide = config_enumerate(ss.guide, "parallel", expand=True)

    def unsupervised_model(xs, xs_l, ys_l):
        ss.model(xs)

    def unsupervised_guide(xs, xs_l, ys_l):
        enumerated_guide(xs)

    def supervised_model(xs, xs_l, ys_l):
        with poutine.scale(scale=share):
            ss.model(xs_l, ys_l)
            ss.model_classify(xs_l, ys_l)

    def supervised_guide(xs, xs_l, ys_l):
        with poutine.scale(scale=share):
            ss.guide(xs_l, ys_l)
            ss.guide_classify(xs_l, ys_l)

    accuracies = []

    def accuracy(row: dict) -> None:
        with torch.no_grad():
            predicted = ss.encoder_y(test_x).argmax(-1)
        accuracies.append(float((predicted == raw.test_y.long()).float().mean()))
        print(f"epoch {row['epoch']}: ELBO {row['train_elbo']:.1f} nats/image, test accuracy of q(y|x) "
              f"{accuracies[-1]:.3f}")  # fmt: skip

    pyrovae.fit(unsupervised_model, unsupervised_guide, WithLabels(images, xs_l, ys_l, args.seed),
                elbo=TraceEnum_ELBO(max_plate_nesting=1, strict_enumeration_warning=False),
                extra=[(supervised_model, supervised_guide)],
                epochs=args.epochs, batch_size=args.batch_size, lr=1e-3, seed=args.seed, quiet=True,
                callback=accuracy)  # fmt: skip
    return {"accuracy": accuracies[-1], "first_accuracy": accuracies[0]}


if __name__ == "__main__":
    main()
