"""A sequential latent, as Pyro's deep Markov model writes it: ``pyro.markov`` over time inside a plate of sequences,
trained by ``fit`` and scored per sequence by ``log_likelihood``.

    z_1 ~ N(0, I),  z_t | z_{t-1} ~ N(transition(z_{t-1}), σ_z),  x_t | z_t ~ N(emission(z_t), σ_x)
    q(z_t | z_{t-1}, x_t) = N(combiner(z_{t-1}, x_t))     (a filtering guide)

Every latent sits in the plate of sequences, so log p(x_{1:T}) splits into one term per sequence and
``log_likelihood`` estimates each. With linear transition and emission (``--linear``) the model is a linear-Gaussian
state-space model whose exact log p(x_{1:T}) the Kalman filter gives: the example prints both.

    python examples/markov_model.py --sequences 200 --steps 2000 --linear
"""

from __future__ import annotations

import argparse
import math

import pyro
import pyro.distributions as dist
import torch
from torch import nn

import pyrovae

Z, D = 2, 3


class MarkovModel(nn.Module):
    def __init__(self, linear: bool = True, hidden: int = 16, sigma_z: float = 0.5, sigma_x: float = 0.3) -> None:
        super().__init__()
        self.sigma_z, self.sigma_x = sigma_z, sigma_x
        if linear:
            self.transition, self.emission = nn.Linear(Z, Z, bias=False), nn.Linear(Z, D)
        else:
            self.transition = nn.Sequential(nn.Linear(Z, hidden), nn.Tanh(), nn.Linear(hidden, Z))
            self.emission = nn.Sequential(nn.Linear(Z, hidden), nn.Tanh(), nn.Linear(hidden, D))
        self.combiner = nn.Sequential(nn.Linear(Z + D, hidden), nn.Tanh(), nn.Linear(hidden, 2 * Z))

    def model(self, xs: torch.Tensor) -> None:
        """xs: (sequences, T, D)."""
        pyro.module("transition", self.transition)
        pyro.module("emission", self.emission)
        z = xs.new_zeros(len(xs), Z)
        with pyro.plate("sequences", len(xs)):
            for t in pyro.markov(range(xs.shape[1])):
                loc = self.transition(z) if t > 0 else torch.zeros_like(z)
                z = pyro.sample(f"z_{t}", dist.Normal(loc, self.sigma_z if t > 0 else 1.0).to_event(1))
                pyro.sample(f"x_{t}", dist.Normal(self.emission(z), self.sigma_x).to_event(1), obs=xs[:, t])

    def guide(self, xs: torch.Tensor) -> None:
        pyro.module("combiner", self.combiner)
        z = xs.new_zeros(len(xs), Z)
        with pyro.plate("sequences", len(xs)):
            for t in pyro.markov(range(xs.shape[1])):
                x_t = xs[:, t].expand(*z.shape[:-1], D)
                loc, log_scale = self.combiner(torch.cat([z, x_t], dim=-1)).chunk(2, dim=-1)
                z = pyro.sample(f"z_{t}", dist.Normal(loc, log_scale.exp()).to_event(1))

    @torch.no_grad()
    def simulate(self, n: int, steps: int, generator: torch.Generator) -> torch.Tensor:
        z = torch.randn(n, Z, generator=generator)
        xs = []
        for t in range(steps):
            if t > 0:
                z = self.transition(z) + self.sigma_z * torch.randn(n, Z, generator=generator)
            xs.append(self.emission(z) + self.sigma_x * torch.randn(n, D, generator=generator))
        return torch.stack(xs, dim=1)

    @torch.no_grad()
    def kalman_log_p(self, xs: torch.Tensor) -> torch.Tensor:
        """Exact log p(x_{1:T}) per sequence of the linear model, by the Kalman filter's predictive densities."""
        a, c, b = self.transition.weight, self.emission.weight, self.emission.bias
        q, r = self.sigma_z**2 * torch.eye(Z), self.sigma_x**2 * torch.eye(D)
        mean, cov = torch.zeros(len(xs), Z), torch.eye(Z).expand(len(xs), Z, Z)
        total = torch.zeros(len(xs))
        for t in range(xs.shape[1]):
            if t > 0:
                mean, cov = mean @ a.T, a @ cov @ a.T + q
            s = c @ cov @ c.T + r
            total += torch.distributions.MultivariateNormal(mean @ c.T + b, s).log_prob(xs[:, t])
            gain = cov @ c.T @ torch.linalg.inv(s)
            mean = mean + ((xs[:, t] - (mean @ c.T + b))[:, None, :] @ gain.transpose(-1, -2)).squeeze(-2)
            cov = cov - gain @ c @ cov
        return total


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sequences", type=int, default=200)
    p.add_argument("--length", type=int, default=5, help="time steps per sequence")
    p.add_argument("--epochs", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--k", type=int, default=2000, help="importance samples per test sequence")
    p.add_argument("--linear", action="store_true", help="linear transition and emission: exact log p to compare")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    truth = MarkovModel(args.linear)
    xs = truth.simulate(args.sequences, args.length, g)
    test = truth.simulate(50, args.length, g)
    result = pyrovae.fit(truth.model, truth.guide, xs, elbo="meanfield", epochs=args.epochs,
                         batch_size=args.batch_size, lr=1e-2, seed=args.seed, quiet=True)  # fmt: skip
    pyro.set_rng_seed(args.seed)
    log_p, log_w = pyrovae.log_likelihood(truth.model, truth.guide, test, num_samples=args.k, return_log_weights=True)
    w = (log_w.double() - log_w.double().amax(1, keepdim=True)).exp()
    se = (w.std(1) / (w.mean(1) * math.sqrt(args.k))).mean()  # delta-method standard error of each estimate
    out = {
        "train_elbo": result.history[-1]["train_elbo"] / args.length,
        "log_p": float(log_p.mean()),
        "log_p_se": float(se),
    }
    print(f"train ELBO {out['train_elbo']:.3f} nats per time step; test log p̂ {out['log_p']:.3f} nats per sequence "
          f"(IS, K={args.k}, s.e. {out['log_p_se']:.3f})")  # fmt: skip
    if args.linear:
        out["exact_log_p"] = float(truth.kalman_log_p(test).mean())
        print(f"exact (Kalman filter): {out['exact_log_p']:.3f} nats per sequence")
    return out


if __name__ == "__main__":
    main()
