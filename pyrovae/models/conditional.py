"""The conditional VAE (Sohn, Lee & Yan 2015): a VAE of images given their label y, which both networks read,

    model:  z_i ~ N(0, I),  x_i ~ Bernoulli(decoder(z_i, y_i))
    guide:  z_i ~ N(encoder(x_i, y_i))

Its log p(x | y) is a conditional likelihood, not p(x): a leaderboard says so beside its number.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn.functional import one_hot

from ..nn.nets import logit, mlp, normal_head
from .vae import data_plate, register, standard_normal


def joined(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a`` and ``b`` side by side in the last dim, their leading dims (particles, batch) broadcast."""
    lead = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    return torch.cat([a.expand(*lead, -1), b.expand(*lead, -1)], dim=-1)


class ConditionalVAE(nn.Module):
    """p(x | y) for Bernoulli images of ``shape`` and integer labels in 0..``classes``-1."""

    def __init__(self, shape: tuple[int, ...], classes: int = 10, z_dim: int = 50, hidden: int = 200,
                 pixel_mean: torch.Tensor | None = None) -> None:  # fmt: skip
        super().__init__()
        self.shape, self.classes, self.z_dim, self.name = tuple(shape), classes, z_dim, "conditional_vae"
        d = math.prod(shape)
        self.encoder = mlp([d + classes, hidden, hidden, 2 * z_dim])
        self.decoder = mlp([z_dim + classes, hidden, hidden, d])
        if pixel_mean is not None:
            with torch.no_grad():
                self.decoder[-1].bias.copy_(logit(pixel_mean.reshape(-1)))

    def observation(self, z: torch.Tensor, y: torch.Tensor) -> dist.Distribution:
        logits = self.decoder(joined(z, one_hot(y, self.classes).to(z))).unflatten(-1, self.shape)
        return dist.Bernoulli(logits=logits).to_event(len(self.shape))

    def model(self, x: torch.Tensor, y: torch.Tensor, num_data: int | None = None) -> None:
        register(self.name, self)
        with data_plate(x, num_data):
            z = pyro.sample("z", standard_normal(self.z_dim, x))
            pyro.sample("x", self.observation(z, y), obs=x)

    def guide(self, x: torch.Tensor, y: torch.Tensor, num_data: int | None = None) -> None:
        register(self.name, self)
        with data_plate(x, num_data):
            h = joined(x.flatten(-len(self.shape)), one_hot(y, self.classes).to(x))
            pyro.sample("z", dist.Normal(*normal_head(self.encoder(h))).to_event(1))

    @torch.no_grad()
    def sample(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """Mean images of ``n`` prior draws, labels 0, 1, …, cycling."""
        y = torch.arange(n, device=like.device) % self.classes
        return self.observation(standard_normal(self.z_dim, like).sample((n,)), y).mean
