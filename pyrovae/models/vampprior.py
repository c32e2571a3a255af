"""VampPrior VAE (Tomczak & Welling 2018): the prior is the mixture of the encoder's posteriors at learned
pseudo-inputs u_1..u_K,

    p(z) = (1/K) Σ_k q(z | u_k),   x_i ~ p(x | decoder(z_i));   guide: z_i ~ q(z | x_i) = N(loc(x_i), scale(x_i))

written as a ``MixtureSameFamily`` over the encodings of the pseudo-inputs, which are parameters of the model
(started at K training images). The KL term has no closed form: train with a sampling ELBO (``trace``, ``iwae``).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from .vae import VAE, data_plate, register


class DiagonalMixture(dist.MixtureSameFamily):
    """A ``MixtureSameFamily`` of diagonal Normals whose log density is two matrix products: the same value as
    the generic one, without its (..., K, Z) broadcast (which made 1000 importance draws cost minutes)."""

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        normal = self.component_distribution.base_dist
        prec = normal.scale.pow(-2)  # (..., K, Z)
        quad = torch.einsum("...d,...kd->...k", z * z, prec) - 2 * torch.einsum("...d,...kd->...k", z, normal.loc * prec)
        log_n = -0.5 * (quad + (normal.loc.pow(2) * prec).sum(-1)) - normal.scale.log().sum(-1)
        log_n = log_n - 0.5 * z.shape[-1] * math.log(2 * math.pi)
        return torch.logsumexp(log_n + self.mixture_distribution.logits, -1)


class VampPriorVAE(VAE):
    """A :class:`~pyrovae.models.vae.VAE` whose prior is the VampPrior over ``pseudo_inputs`` (K, *image shape)."""

    def __init__(self, *parts, pseudo_inputs: torch.Tensor, name: str = "vampprior") -> None:
        super().__init__(*parts, name=name)
        self.pseudo_inputs = nn.Parameter(pseudo_inputs.detach().clone())

    def prior(self, like: torch.Tensor | None = None) -> dist.Distribution:
        """p(z) = (1/K) Σ_k N(z; loc(u_k), scale(u_k)): a mixture of K diagonal Gaussians."""
        loc, scale = self.encode(self.pseudo_inputs)
        components = dist.Normal(loc, scale).to_event(1)
        return DiagonalMixture(dist.Categorical(logits=loc.new_zeros(len(loc))), components)

    def model(self, x: torch.Tensor, num_data: int | None = None) -> None:
        register(self.name, self)  # one name for every parameter: the encoder sits in the model and the guide
        prior = self.prior()
        with data_plate(x, num_data):
            z = pyro.sample("z", prior)
            pyro.sample("x", self.observation(self.decode(z)), obs=x)

    def guide(self, x: torch.Tensor, num_data: int | None = None) -> None:
        register(self.name, self)
        with data_plate(x, num_data):
            loc, scale = self.encode(x)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    @torch.no_grad()
    def sample(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """Mean images decoded from ``n`` draws of the VampPrior."""
        return self.likelihood.mean(self.decoder(self.prior().sample((n,))))
