"""The VAE with two stochastic layers of Burda, Grosse & Salakhutdinov (2016), IWAE paper, section 5:

    model:  z2 ~ N(0, I_50),  z1 | z2 ~ N(μ(z2), σ(z2)) (100 dims),  x | z1 ~ Bernoulli(f(z1))
    guide:  z1 | x ~ N(μ(x), σ(x)),  z2 | z1 ~ N(μ(z1), σ(z1))

with deterministic layers of 100 (between z1 and z2) and 200 units (between x and z1), tanh, as in the paper.
Trained by the ELBO ("VAE") or by the IWAE bound (``elbo="iwae", particles=k``), the same program.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ..nn.nets import logit, mlp, normal_head
from .vae import data_plate, register, standard_normal


def gaussian(net: nn.Module, h: torch.Tensor) -> dist.Distribution:
    """A diagonal Normal whose loc and log-scale are the two halves of ``net(h)``."""
    return dist.Normal(*normal_head(net(h))).to_event(1)


class TwoLayerVAE(nn.Module):
    """Two stochastic layers (``z1``, ``z2`` dims) over Bernoulli images of ``shape``."""

    def __init__(self, shape: tuple[int, ...], z1: int = 100, z2: int = 50, pixel_mean: torch.Tensor | None = None):
        super().__init__()
        self.shape, self.z1, self.z2, self.name = tuple(shape), z1, z2, "two_layer_vae"
        d = math.prod(shape)
        self.p_z1, self.p_x = mlp([z2, 100, 100, 2 * z1]), mlp([z1, 200, 200, d])
        self.q_z1, self.q_z2 = mlp([d, 200, 200, 2 * z1]), mlp([z1, 100, 100, 2 * z2])
        if pixel_mean is not None:  # output bias at the logit of the training pixel means, as in the paper
            with torch.no_grad():
                self.p_x[-1].bias.copy_(logit(pixel_mean.reshape(-1)))

    def observation(self, z1: torch.Tensor) -> dist.Distribution:
        return dist.Bernoulli(logits=self.p_x(z1).unflatten(-1, self.shape)).to_event(len(self.shape))

    def model(self, x: torch.Tensor, num_data: int | None = None) -> None:
        register(self.name, self)
        with data_plate(x, num_data):
            z2 = pyro.sample("z2", standard_normal(self.z2, x))
            z1 = pyro.sample("z1", gaussian(self.p_z1, z2))
            pyro.sample("x", self.observation(z1), obs=x)

    def guide(self, x: torch.Tensor, num_data: int | None = None) -> None:
        register(self.name, self)
        with data_plate(x, num_data):
            z1 = pyro.sample("z1", gaussian(self.q_z1, x.flatten(-len(self.shape))))
            pyro.sample("z2", gaussian(self.q_z2, z1))

    @torch.no_grad()
    def sample(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """Mean images decoded from ``n`` ancestral draws of z2 then z1."""
        z1 = gaussian(self.p_z1, standard_normal(self.z2, like).sample((n,))).sample()
        return self.observation(z1).mean
