"""A VAE whose guide is a normalising flow (Kingma et al. 2016; Rezende & Mohamed 2015): the encoder's
diagonal Gaussian pushed through a stack of Pyro's inverse autoregressive transforms,

    model:  z_i ~ N(0, I),  x_i ~ p(x | decoder(z_i))
    guide:  u_i ~ N(loc(x_i), scale(x_i)),  z_i = T_L ∘ … ∘ T_1(u_i)   (``affine_autoregressive``)

so that log q(z_i | x_i) = log N(u_i) − Σ_l log |det ∂T_l|. The transforms are modules of this one, so
``register`` puts them in Pyro's param store with the networks. Sampling is one pass per transform, and the
density of a draw comes from each transform's cache (the inverse is never run). No closed-form KL: train with
a sampling ELBO (``trace``, ``iwae``).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from torch import nn

from .vae import VAE, data_plate, register


class FlowGuideVAE(VAE):
    """A :class:`~pyrovae.models.vae.VAE` with ``flows`` affine autoregressive transforms on the guide."""

    def __init__(self, *parts, flows: int = 2, hidden: int = 100, name: str = "flow_vae") -> None:
        super().__init__(*parts, name=name)
        self.flows = nn.ModuleList(T.affine_autoregressive(self.z_dim, hidden_dims=[hidden]) for _ in range(flows))

    def posterior(self, x: torch.Tensor) -> dist.TransformedDistribution:
        """q(z | x): the encoder's Gaussian through the flows."""
        loc, scale = self.encode(x)
        return dist.TransformedDistribution(dist.Normal(loc, scale).to_event(1), list(self.flows))

    def model(self, x: torch.Tensor, num_data: int | None = None) -> None:
        register(self.name, self)
        with data_plate(x, num_data):
            z = pyro.sample("z", self.prior(x))
            pyro.sample("x", self.observation(self.decode(z)), obs=x)

    def guide(self, x: torch.Tensor, num_data: int | None = None) -> None:
        register(self.name, self)
        with data_plate(x, num_data):
            pyro.sample("z", self.posterior(x))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The likelihood's mean at the flow's image of the encoder's mean."""
        u = self.encode(x)[0]
        for t in self.flows:
            u = t(u)
        return self.likelihood.mean(self.decoder(u))
