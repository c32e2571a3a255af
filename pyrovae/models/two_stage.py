"""The stage-2 VAE of a two-stage sampler (Dai & Wipf 2019): the built-in VAE on a first stage's codes, with a
learned observation noise γ₂. The sampling task that fits and uses it is :mod:`pyrovae.tasks.samples`."""

from __future__ import annotations

import torch

from ..nn.likelihoods import LearnedNoise
from ..nn.nets import Arch, make_networks
from .vae import VAE


class LatentVAE(VAE):
    """The second stage, the built-in :class:`~pyrovae.models.vae.VAE` on codes: u ~ N(0, I), z ~ N(decoder(u), γ₂ I)
    with a learned γ₂ (:class:`~pyrovae.nn.likelihoods.LearnedNoise`), guide u ~ N(encoder(z)), MLP networks.

    Dai & Wipf use three 1024-unit layers; the default here is two of 512 (the codes are 2-64 dims).
    In the program's site names the codes are ``x`` and u is ``z``.
    """

    GAMMA_GAIN = 10.0

    def __init__(
        self, z_dim: int, u_dim: int | None = None, hidden: tuple[int, ...] = (512, 512), activation: str = "relu"
    ) -> None:
        u_dim = u_dim or z_dim
        encoder, decoder = make_networks(Arch("mlp", tuple(hidden), activation, u_dim), (z_dim,))
        super().__init__(encoder, decoder, LearnedNoise(self.GAMMA_GAIN), u_dim, "stage2", event_dims=1)
        self.code_dim, self.u_dim = z_dim, u_dim

    @property
    def gamma(self) -> float:
        return float(self.likelihood.log_gamma.detach().exp())

    @torch.no_grad()
    def sample(self, n: int, like: torch.Tensor, noise: bool = True) -> torch.Tensor:
        """``n`` codes: the decoder's mean at u ~ N(0, I), plus N(0, γ₂) noise if ``noise``."""
        u = torch.randn(n, self.u_dim, device=like.device, dtype=like.dtype)
        z = self.decoder(u)
        return z + self.gamma**0.5 * torch.randn_like(z) if noise else z
