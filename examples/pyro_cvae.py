"""Pyro's conditional VAE example, written as that example writes it, trained by ``fit`` and scored by
``log_likelihood``: complete an image from one of its quadrants.

The program is the example's idiom, unchanged in form: ``model(xs, ys=None)`` and ``guide(xs, ys=None)``,
``pyro.plate("data")`` without a size, ``pyro.module`` called in the model only, a frozen pre-trained baseline net
inside the prior p(z | x) (under ``torch.no_grad``), and the decoder's output indexed with the boolean mask of the
hidden pixels. xs is the image with three quadrants hidden (-1), ys the image with the shown quadrant hidden.

    z ~ p(z | x) = N(prior_net(x, baseline(x))),   y | z ~ Bernoulli(generation_net(z)) on the hidden pixels
    q(z | x, y) = N(recognition_net(x, y))

``log_likelihood(model, guide, xs, ys)`` estimates log p(y | x) per image, the number to put beside the baseline's
own log-likelihood of the hidden pixels. ``--svi`` also trains an identical copy by ``pyro.infer.SVI`` with
``pyro.optim.Adam`` for the same steps, to show the two train alike.

    python examples/pyro_cvae.py --train-size 3000 --epochs 3 --svi
"""

from __future__ import annotations

import argparse
import copy
import time

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from torch import nn

import pyrovae


class Encoder(nn.Module):
    def __init__(self, pixels: int, z_dim: int, hidden: int) -> None:
        super().__init__()
        self.pixels = pixels
        self.body = nn.Sequential(nn.Linear(pixels, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.loc, self.log_scale = nn.Linear(hidden, z_dim), nn.Linear(hidden, z_dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        xc = x.clone()  # the shown quadrant and the (given or guessed) hidden ones in one image
        xc[x == -1] = y[x == -1]
        hidden = self.body(xc.view(-1, self.pixels))
        return self.loc(hidden), torch.exp(self.log_scale(hidden))


class Decoder(nn.Module):
    def __init__(self, pixels: int, z_dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(z_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, pixels))  # fmt: skip

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(z))


class BaselineNet(nn.Module):
    """A deterministic net from the shown quadrant to every pixel's probability (the example's baseline)."""

    def __init__(self, pixels: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(pixels, hidden), nn.ReLU(), nn.Linear(hidden, pixels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(x.view(len(x), -1)))


class CVAE(nn.Module):
    def __init__(self, pixels: int, z_dim: int, hidden: int, baseline: BaselineNet) -> None:
        super().__init__()
        self.pixels = pixels
        self.baseline_net = baseline
        self.prior_net = Encoder(pixels, z_dim, hidden)
        self.generation_net = Decoder(pixels, z_dim, hidden)
        self.recognition_net = Encoder(pixels, z_dim, hidden)

    def model(self, xs, ys=None):
        pyro.module("generation_net", self)
        batch_size = xs.shape[0]
        with pyro.plate("data"):
            with torch.no_grad():  # the baseline is frozen
                y_hat = self.baseline_net(xs).view(xs.shape)
            prior_loc, prior_scale = self.prior_net(xs, y_hat)
            zs = pyro.sample("z", dist.Normal(prior_loc, prior_scale).to_event(1))
            loc = self.generation_net(zs)
            if ys is not None:
                mask_loc = loc[(xs == -1).view(-1, self.pixels)].view(batch_size, -1)
                mask_ys = ys[xs == -1].view(batch_size, -1)
                pyro.sample("y", dist.Bernoulli(mask_loc).to_event(1), obs=mask_ys)
            else:
                pyro.deterministic("y", loc.detach())
            return loc

    def guide(self, xs, ys=None):
        with pyro.plate("data"):
            if ys is None:
                y_hat = self.baseline_net(xs).view(xs.shape)
                loc, scale = self.prior_net(xs, y_hat)
            else:
                loc, scale = self.recognition_net(xs, ys)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))


def quadrants(images: torch.Tensor, shown: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(xs, ys) from binary images (N, H, W): xs shows one quadrant (the rest -1), ys hides that quadrant (-1)."""
    n, h, w = images.shape
    shown_mask = torch.zeros(h, w, dtype=torch.bool)
    r, c = divmod(shown, 2)
    shown_mask[r * h // 2 : (r + 1) * h // 2, c * w // 2 : (c + 1) * w // 2] = True
    xs = torch.where(shown_mask, images, torch.full_like(images, -1.0))
    ys = torch.where(shown_mask, torch.full_like(images, -1.0), images)
    return xs, ys


def train_baseline(xs: torch.Tensor, ys: torch.Tensor, epochs: int, hidden: int, seed: int) -> BaselineNet:
    """The baseline, trained by plain PyTorch on the hidden pixels' binary cross-entropy, then frozen."""
    torch.manual_seed(seed)
    net = BaselineNet(xs[0].numel(), hidden)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(xs)).split(100):
            hidden_px = xs[idx].view(len(idx), -1) == -1
            p = net(xs[idx])
            loss = nn.functional.binary_cross_entropy(p[hidden_px], ys[idx].view(len(idx), -1)[hidden_px])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.requires_grad_(False).eval()


@torch.no_grad()
def baseline_log_p(net: BaselineNet, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """The baseline's log-likelihood of each image's hidden pixels (independent Bernoullis)."""
    p = net(xs).clamp(1e-6, 1 - 1e-6)
    hidden_px = xs.view(len(xs), -1) == -1
    ll = torch.distributions.Bernoulli(probs=p).log_prob(ys.view(len(ys), -1).clamp(0, 1))
    return (ll * hidden_px).sum(-1)


def load_images(dataset: str, train_size: int, test_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary images (N, H, W) for training and testing: Fashion-MNIST, MNIST, or synthetic (16 × 16)."""
    if dataset == "synthetic":
        raw = pyrovae.synthetic(train_size, test_size, shape=(1, 16, 16), seed=seed)
    else:
        raw = pyrovae.load_dataset(dataset)
    train = (raw.train_x[:train_size, 0].float() / 255 > 0.5).float()
    test = (raw.test_x[:test_size, 0].float() / 255 > 0.5).float()
    return train, test


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist, mnist, or synthetic")
    p.add_argument("--train-size", type=int, default=3000)
    p.add_argument("--test-size", type=int, default=200)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--z-dim", type=int, default=20)
    p.add_argument("--hidden", type=int, default=200)
    p.add_argument("--k", type=int, default=100, help="importance samples per test image")
    p.add_argument("--svi", action="store_true", help="also train a copy by pyro.infer.SVI for the same steps")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    train, test = load_images(args.dataset, args.train_size, args.test_size, args.seed)
    xs, ys = quadrants(train)
    xs_test, ys_test = quadrants(test)
    baseline = train_baseline(xs, ys, 3, args.hidden, args.seed)
    torch.manual_seed(args.seed)
    cvae = CVAE(xs[0].numel(), args.z_dim, args.hidden, baseline)
    twin = copy.deepcopy(cvae)

    t0 = time.perf_counter()
    result = pyrovae.fit(cvae.model, cvae.guide, pyrovae.TensorData(xs, ys), elbo=Trace_ELBO(), epochs=args.epochs,
                         batch_size=args.batch_size, lr=1e-3, seed=args.seed, quiet=True)  # fmt: skip
    out: dict = {"fit_elbo": [row["train_elbo"] for row in result.history], "fit_seconds": time.perf_counter() - t0}
    if args.svi:  # the same steps as Pyro's example takes them: one svi.step per minibatch, loss per image
        pyro.clear_param_store()
        pyro.set_rng_seed(args.seed)
        svi = SVI(twin.model, twin.guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
        out["svi_elbo"] = []
        for _ in range(args.epochs):
            perm = torch.randperm(len(xs))
            total = sum(svi.step(xs[idx], ys[idx]) for idx in perm.split(args.batch_size))
            out["svi_elbo"].append(-total / len(xs))
    pyro.set_rng_seed(args.seed)
    log_p = pyrovae.log_likelihood(cvae.model, cvae.guide, xs_test, ys_test, num_samples=args.k)
    out["log_p_y_given_x"] = float(log_p.mean())
    out["baseline_log_p"] = float(baseline_log_p(baseline, xs_test, ys_test).mean())
    print("per-image ELBO by epoch, fit: " + ", ".join(f"{v:.1f}" for v in out["fit_elbo"]))
    if args.svi:
        print("per-image ELBO by epoch, SVI: " + ", ".join(f"{v:.1f}" for v in out["svi_elbo"]))
    print(f"log p(y | x) of the hidden quadrants: CVAE {out['log_p_y_given_x']:.1f} (IS, K={args.k}), "
          f"baseline net {out['baseline_log_p']:.1f} nats per image, over {len(xs_test)} test images")  # fmt: skip
    return out


if __name__ == "__main__":
    main()
