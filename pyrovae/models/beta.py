"""β-VAE (Higgins et al. 2017): the plain VAE with its KL term weighted by β, β an argument of the program.

    model:  z_i ~ N(0, I) (scaled by β),   x_i ~ p(x | decoder(z_i))
    guide:  z_i ~ N(loc(x_i), scale(x_i))  (scaled by β)

``poutine.scale`` on both z sites turns any ELBO into E_q log p(x|z) − β KL(q || p): β lives in the program,
not in the trainer. ``beta=1`` is the generative model itself (the plain VAE), and is what log p(x) scores.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch

from .vae import VAE, data_plate, register


class BetaVAE(VAE):
    """A :class:`~pyrovae.models.vae.VAE` whose programs take ``beta``; :meth:`training_pair` fixes it at ``self.beta``."""

    def __init__(self, *parts, beta: float = 4.0, name: str = "beta_vae") -> None:
        super().__init__(*parts, name=name)
        self.beta = beta

    def model(self, x: torch.Tensor, num_data: int | None = None, *, beta: float = 1.0) -> None:
        register(self.name, self)
        with data_plate(x, num_data):
            with poutine.scale(scale=beta):
                z = pyro.sample("z", self.prior(x))
            pyro.sample("x", self.observation(self.decode(z)), obs=x)

    def guide(self, x: torch.Tensor, num_data: int | None = None, *, beta: float = 1.0) -> None:
        register(self.name, self)
        with data_plate(x, num_data), poutine.scale(scale=beta):
            loc, scale = self.encode(x)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    def training_pair(self) -> tuple[Callable, Callable]:
        """(model, guide) with ``beta=self.beta``: what ``fit`` trains."""
        return functools.partial(self.model, beta=self.beta), functools.partial(self.guide, beta=self.beta)
