"""The masked VAE for partly observed images: masks (True = observed), datasets whose batches are ``(x, mask)``,
and the built-in VAE run with its ``mask`` option. Training and completion are in :mod:`pyrovae.tasks.complete`."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn

from ..data import ImageData
from ..errors import PyrovaeError
from ..nn.likelihoods import Likelihood
from ..nn.nets import Arch
from .vae import VAE, vae_parts

MASK_KINDS = ("random", "top-half", "mix")


# ---------------------------------------------------------------------------------------------- masks
def make_masks(
    n: int,
    shape: tuple[int, ...],
    kind: str = "random",
    rate: float = 0.5,
    *,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``n`` boolean masks of image ``shape`` (True = observed): ``random`` pixels missing with
    probability ``rate``, the ``top-half`` rows missing, or a ``mix`` (each image one or the other)."""
    if kind not in MASK_KINDS:
        raise PyrovaeError(f"unknown mask {kind!r}; choose one of {', '.join(MASK_KINDS)}")
    if not 0.0 <= rate < 1.0:
        raise PyrovaeError(f"the missing rate must be in [0, 1), got {rate}")
    c, h, w = shape
    rows = torch.arange(h, device=device).view(1, 1, h, 1)
    top = (rows >= h // 2).expand(n, 1, h, w)
    rand = torch.rand(n, 1, h, w, device=device, generator=generator) >= rate
    if kind == "random":
        m = rand
    elif kind == "top-half":
        m = top
    else:
        pick = torch.rand(n, 1, 1, 1, device=device, generator=generator) < 0.5
        m = torch.where(pick, top, rand)
    return m.expand(n, c, h, w).contiguous()


class MaskedImageData:
    """An :class:`ImageData` split whose batches are ``(x, mask)``: fresh masks per batch on the device
    for training, or masks drawn once from ``fixed_seed`` (for evaluation)."""

    def __init__(self, data: ImageData, kind: str = "random", rate: float = 0.5, fixed_seed: int | None = None):
        make_masks(1, data.shape, kind, rate, device=data.device)  # check kind and rate
        self.data, self.kind, self.rate = data, kind, rate
        self._masks: torch.Tensor | None = None
        if fixed_seed is not None:
            g = torch.Generator(device=data.device).manual_seed(fixed_seed)
            self._masks = make_masks(len(data), data.shape, kind, rate, device=data.device, generator=g)

    def __len__(self) -> int:
        return len(self.data)

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    def masks(self, idx: torch.Tensor) -> torch.Tensor:
        if self._masks is not None:
            return self._masks[idx]
        return make_masks(len(idx), self.data.shape, self.kind, self.rate, device=self.data.device)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data.batch(idx), self.masks(idx)


# ---------------------------------------------------------------------------------------------- model
class MaskedVAE(VAE):
    """The built-in :class:`~pyrovae.models.vae.VAE` run with its ``mask`` option: a program of ``(x, mask)`` whose
    likelihood counts observed pixels only (conditioning on x_obs), with an encoder of [x ⊙ m, m] (2C channels)."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, likelihood: Likelihood, z_dim: int, name: str = "mvae"):
        super().__init__(encoder, decoder, likelihood, z_dim, name)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The likelihood's mean at the posterior mean of z given the observed pixels (default: all of them)."""
        mask = torch.ones_like(x, dtype=torch.bool) if mask is None else mask
        return self.likelihood.mean(self.decoder(self.encode(x, mask=mask)[0]))

    def q(self, x: torch.Tensor, mask: torch.Tensor) -> dist.Distribution:
        """q(z | x_obs, m) as a distribution with event dim 1."""
        loc, scale = self.encode(x, mask=mask)
        return dist.Normal(loc, scale).to_event(1)

    # the VAE's program, with the mask as the second argument (a dataset's batches are (x, mask))
    def model(self, x: torch.Tensor, mask: torch.Tensor, num_data: int | None = None) -> None:
        super().model(x, num_data, mask=mask)

    def guide(self, x: torch.Tensor, mask: torch.Tensor, num_data: int | None = None) -> None:
        super().guide(x, num_data, mask=mask)


def build_masked_vae(
    shape: tuple[int, ...],
    likelihood: str | Likelihood = "bernoulli",
    arch: str | Arch = "iwae",
    pixel_mean: torch.Tensor | None = None,
    **likelihood_options: float,
) -> MaskedVAE:
    """A :class:`MaskedVAE` for images of ``shape``: the arch's networks, the encoder with doubled input channels."""
    encoder_shape = (2 * shape[0], *shape[1:])
    return MaskedVAE(*vae_parts(shape, likelihood, arch, pixel_mean, encoder_shape, **likelihood_options))
