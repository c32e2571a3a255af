"""The built-in VAE: ``model`` and ``guide`` are Pyro programs, and read like the maths.

    model:  z_i ~ N(0, I),  x_i ~ p(x | decoder(z_i))        for i in a minibatch of N
    guide:  z_i ~ N(loc(x_i), scale(x_i))

The data plate is subsampled: with ``num_data`` = N and a batch of B, every site is scaled by N/B so
that the minibatch loss is an unbiased estimate of the full-data ELBO.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ..errors import PyrovaeError
from ..nn.likelihoods import Likelihood, make_likelihood
from ..nn.nets import PRESETS, Arch, logit, make_networks

_COLLECTED: ContextVar[bool] = ContextVar("pyrovae_parameters_collected", default=False)  # True in fit's hot loop


def register(name: str, module: nn.Module) -> None:
    """``pyro.module(name, module)``: puts the module's parameters in Pyro's param store, where SVI and
    ``poutine.trace(param_only=True)`` find them on every call. Skipped inside :func:`parameters_collected`."""
    if not _COLLECTED.get():
        pyro.module(name, module)


@contextmanager
def parameters_collected() -> Iterator[None]:
    """Models skip :func:`register` inside: in ``fit``'s hot loop (the parameters were collected on the first
    step and the optimiser holds them) and in evaluation sweeps (nothing is optimised), re-registering the
    modules on every call (about 50 µs each) is bookkeeping nobody reads. Not for Pyro's ``loss_and_grads``
    or ``SVI``, which look for the param sites."""
    token = _COLLECTED.set(True)
    try:
        yield
    finally:
        _COLLECTED.reset(token)


@functools.lru_cache(maxsize=16)
def _indices(n: int, device: torch.device) -> torch.Tensor:
    """0..n-1 on ``device``, made once per batch size (a fresh arange per plate per step costs ~10 µs)."""
    return torch.arange(n, device=device)


@functools.lru_cache(maxsize=16)
def _standard_normal(z_dim: int, device: torch.device, dtype: torch.dtype) -> dist.Distribution:
    """N(0, I) in ``z_dim`` dimensions, built once: distributions are immutable, and building this one
    (two tensors, two distribution objects) took ~25 µs of every step."""
    zeros = torch.zeros(z_dim, device=device, dtype=dtype)
    return dist.Normal(zeros, zeros + 1).to_event(1)


def standard_normal(dim: int, like: torch.Tensor) -> dist.Distribution:
    """The prior N(0, I) in ``dim`` dimensions on ``like``'s device and dtype (one object per setting)."""
    return _standard_normal(dim, like.device, like.dtype)


def data_plate(x: torch.Tensor, num_data: int | None, name: str = "data") -> pyro.plate:
    """The plate over datapoints: a minibatch of ``len(x)`` out of ``num_data`` (default: all of them)."""
    return pyro.plate(name, num_data or len(x), subsample=_indices(len(x), x.device))


FILL = 0.0  # what the encoder sees in place of a missing pixel (the mask channel tells it apart)


class VAE(nn.Module):
    """A VAE with a standard Normal prior, an amortised Normal guide and any :class:`Likelihood`.

    One program, with two options on top of the plain ``x``: a boolean ``mask`` (True = observed) that
    conditions on the observed pixels only (the encoder then reads ``[x ⊙ m, m]``, see
    :meth:`encoder_input`), and a label ``y`` for a VAE built with ``n_classes`` (y ~ Cat(1/n) in the
    model; in the guide, q(y | x) by ``classifier``, enumerated where y is not given: train it with
    ``TraceEnum_ELBO``), whose networks take y as a second argument (see :meth:`encode`, :meth:`decode`).
    ``event_dims`` are the dims of one datapoint.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        likelihood: Likelihood,
        z_dim: int,
        name: str = "vae",
        *,
        event_dims: int = 3,
        n_classes: int = 0,
        classifier: nn.Module | None = None,
    ):
        super().__init__()
        if n_classes and classifier is None:
            raise PyrovaeError("a label-conditioned VAE (n_classes > 0) needs a classifier q(y | x)")
        self.encoder, self.decoder, self.likelihood, self.classifier = encoder, decoder, likelihood, classifier
        self.z_dim, self.name, self.event_dims, self.n_classes = z_dim, name, event_dims, n_classes
        self.autocast: torch.dtype | None = None  # e.g. torch.bfloat16: networks in mixed precision

    def _run(self, net: nn.Module, x: torch.Tensor):
        """A network call, under autocast if asked; outputs back in float32 for the distributions."""
        if self.autocast is None:
            return net(x)
        with torch.autocast(x.device.type, dtype=self.autocast):
            out = net(x)
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()

    def prior(self, like: torch.Tensor) -> dist.Distribution:
        """p(z) = N(0, I), on the device and dtype of ``like``."""
        return standard_normal(self.z_dim, like)

    def prior_y(self, like: torch.Tensor) -> dist.Distribution:
        """p(y) = Cat(1/n_classes), for a label-conditioned VAE."""
        return dist.Categorical(logits=like.new_zeros(self.n_classes))

    # -- the networks, as the program sees them: a network that reads a label takes it as its second argument
    @staticmethod
    def encoder_input(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[x with missing pixels set to FILL, mask] along the channel dim: missing values never reach the net."""
        return torch.cat([torch.where(mask, x, FILL), mask.to(x.dtype)], dim=-3)

    def encode(
        self, x: torch.Tensor, y: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z | x[, y])'s (loc, scale): ``encoder(x)`` or ``encoder(x, y)``; with ``mask``, the encoder reads
        :meth:`encoder_input` (observed pixels and the mask) instead of x."""
        inp = x if mask is None else self.encoder_input(x, mask)
        return self._run(self.encoder, inp) if y is None else self.encoder(inp, y)

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's output for codes ``z``: ``decoder(z)`` or ``decoder(z, y)``."""
        return self._run(self.decoder, z) if y is None else self.decoder(z, y)

    def observation(self, out: torch.Tensor, mask: torch.Tensor | None = None) -> dist.Distribution:
        """p(x | z) from the decoder's output; with ``mask``, each missing pixel's log-prob is exactly zero."""
        if mask is None:
            return self.likelihood(out, self.event_dims)
        return self.likelihood.distribution(out).mask(mask).to_event(self.event_dims)

    # -- the program: the sites of a batch, inside the caller's data plate ...
    def model_sites(
        self, x: torch.Tensor, y: torch.Tensor | None = None, mask: torch.Tensor | None = None, suffix: str = ""
    ) -> torch.Tensor:
        """[y ~ p(y) (observed if given),] z ~ p(z), x ~ p(x | decode(z[, y])) (observed pixels only with ``mask``)."""
        if self.n_classes:
            y = pyro.sample("y" + suffix, self.prior_y(x), obs=y)
        z = pyro.sample("z" + suffix, self.prior(x))
        # missing values are replaced (NaN allowed there) so that no gradient can pass through them
        obs = x if mask is None else torch.where(mask, x, FILL)
        pyro.sample("x" + suffix, self.observation(self.decode(z, y), mask), obs=obs)
        return z

    def guide_sites(
        self, x: torch.Tensor, y: torch.Tensor | None = None, mask: torch.Tensor | None = None, suffix: str = ""
    ) -> torch.Tensor:
        """[y ~ q(y | x), enumerated, if not given,] z ~ q(z | x[, y])."""
        if self.n_classes and y is None:
            logits = self.classifier(x)
            y = pyro.sample("y" + suffix, dist.Categorical(logits=logits), infer={"enumerate": "parallel"})
        loc, scale = self.encode(x, y, mask)
        return pyro.sample("z" + suffix, dist.Normal(loc, scale).to_event(1))

    # ... and in the data plate, as Pyro programs
    def model(
        self,
        x: torch.Tensor,
        num_data: int | None = None,
        *,
        mask: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> None:
        register(f"{self.name}.decoder", self.decoder)  # each program registers only what it uses
        register(f"{self.name}.likelihood", self.likelihood)
        with data_plate(x, num_data):
            self.model_sites(x, y, mask)

    def guide(
        self,
        x: torch.Tensor,
        num_data: int | None = None,
        *,
        mask: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> None:
        register(f"{self.name}.encoder", self.encoder)
        if self.n_classes and y is None:
            register(f"{self.name}.classifier", self.classifier)
        with data_plate(x, num_data):
            self.guide_sites(x, y, mask)

    # -- conveniences for evaluation and pictures (not used by training)
    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The likelihood's mean at the posterior mean of z."""
        return self.likelihood.mean(self.decoder(self.encoder(x)[0]))

    @torch.no_grad()
    def sample(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """Mean images decoded from ``n`` prior draws."""
        z = self.prior(like).sample((n,))
        return self.likelihood.mean(self.decoder(z))


def vae_parts(
    shape: tuple[int, ...],
    likelihood: str | Likelihood = "bernoulli",
    arch: str | Arch = "iwae",
    pixel_mean: torch.Tensor | None = None,
    encoder_shape: tuple[int, ...] | None = None,
    **likelihood_options: float,
) -> tuple[nn.Module, nn.Module, Likelihood, int]:
    """Encoder, decoder, likelihood and z dim for images of ``shape`` (the encoder reads ``encoder_shape``
    if given, e.g. image and mask stacked). With an arch whose ``logit_bias`` is set, the decoder's output
    bias starts at the logit of ``pixel_mean`` (the training pixel means), as in Burda et al. 2016."""
    lik = make_likelihood(likelihood, **likelihood_options) if isinstance(likelihood, str) else likelihood
    if isinstance(arch, str) and arch not in PRESETS:
        raise PyrovaeError(f"unknown arch {arch!r}; choose one of {', '.join(PRESETS)}")
    spec = PRESETS[arch] if isinstance(arch, str) else arch
    if encoder_shape is None:
        encoder, decoder = make_networks(spec, tuple(shape), lik.outputs_per_pixel)
    else:
        encoder, _ = make_networks(spec, tuple(encoder_shape), lik.outputs_per_pixel)
        _, decoder = make_networks(spec, tuple(shape), lik.outputs_per_pixel)
    if spec.logit_bias and pixel_mean is not None:
        bias = logit(pixel_mean.reshape(shape))
        if lik.outputs_per_pixel > 1:
            bias = torch.cat([bias, torch.zeros_like(bias)], dim=0)
        decoder.init_output_bias(bias)
    return encoder, decoder, lik, spec.z_dim


def build_vae(
    shape: tuple[int, ...],
    likelihood: str | Likelihood = "bernoulli",
    arch: str | Arch = "iwae",
    pixel_mean: torch.Tensor | None = None,
    **likelihood_options: float,
) -> VAE:
    """A VAE for images of ``shape`` from a likelihood name and an arch preset (or :class:`Arch`); see
    :func:`vae_parts` for the networks and the output-bias start."""
    return VAE(*vae_parts(shape, likelihood, arch, pixel_mean, **likelihood_options))
