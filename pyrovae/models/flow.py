"""A VAE whose guide is a normalising flow (Kingma et al. 2016; Rezende & Mohamed 2015): the encoder's
diagonal Gaussian pushed through a stack of Pyro's inverse autoregressive transforms, each conditioned on the
encoder's last hidden layer h(x) (Kingma et al.'s context),

    model:  z_i ~ N(0, I),  x_i ~ p(x | decoder(z_i))
    guide:  u_i ~ N(loc(x_i), scale(x_i)),  z_i = T_L(· ; h(x_i)) ∘ … ∘ T_1(u_i ; h(x_i))
            (``conditional_affine_autoregressive``)

so that log q(z_i | x_i) = log N(u_i) − Σ_l log |det ∂T_l|. The transforms are modules of this one, so
``register`` puts them in Pyro's param store with the networks. Sampling is one pass per transform, and the
density of a draw comes from each transform's cache (the inverse is never run). No closed-form KL: train with
a sampling ELBO (``trace``, ``iwae``). :class:`FlowFamily` is the guide's family with one member per datapoint,
what ``pyrovae gap`` fits q* in.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from torch import nn
from torch.distributions import constraints

from ..infer.local import ConditionalFlows, LocalFamily, PerDatapointFlows
from .vae import VAE, data_plate, register


class FlowGuideVAE(VAE):
    """A :class:`~pyrovae.models.vae.VAE` with ``flows`` conditional affine autoregressive transforms on the guide."""

    def __init__(self, *parts, flows: int = 2, hidden: int = 100, name: str = "flow_vae") -> None:
        super().__init__(*parts, name=name)
        context = self.encoder.features_dim
        self.flows = nn.ModuleList(
            T.conditional_affine_autoregressive(self.z_dim, context, hidden_dims=[hidden]) for _ in range(flows)
        )

    def encode_context(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The encoder's (loc, scale) and its last hidden layer h, the flows' context."""
        h = self.encoder.features(x)
        return (*self.encoder.head(h), h)

    def posterior(self, x: torch.Tensor) -> dist.TransformedDistribution:
        """q(z | x): the encoder's Gaussian through the flows, each given the context h(x)."""
        loc, scale, h = self.encode_context(x)
        return dist.TransformedDistribution(dist.Normal(loc, scale).to_event(1), [t.condition(h) for t in self.flows])

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
        """The likelihood's mean at the flows' image of the encoder's mean."""
        u, _, h = self.encode_context(x)
        for t in self.flows:
            u = t.condition(h)(u)
        return self.likelihood.mean(self.decoder(u))

    def local_family(self) -> FlowFamily:
        """The guide's family with every parameter per datapoint (for ``pyrovae gap``)."""
        return FlowFamily(self)


class FlowFamily(LocalFamily):
    """q(z | θ_i) = the flows with weights W_i and context h_i applied to N(loc_i, scale_i), every parameter local.
    Cremer et al. (2018) fit a flow's own parameters per datapoint too; with the last layers' weights at zero the
    flows are the identity, so this family holds every diagonal Gaussian and its q* is at least as good."""

    elbo = "trace"
    steps = 2000  # the per-image weights converge slower than a Gaussian's loc and scale (bench/RESULTS.md)
    constraints = MappingProxyType({"scale": constraints.positive})

    def __init__(self, vae: FlowGuideVAE) -> None:
        self.flows = ConditionalFlows(vae.flows)
        self.encode_context = vae.encode_context

    def amortised(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        loc, scale, h = self.encode_context(x)
        shared = {name: p.detach().expand(len(x), *p.shape) for name, p in self.flows.named_parameters()}
        return {"loc": loc, "scale": scale, "context": h, **shared}

    def distribution(self, params: Mapping[str, torch.Tensor]) -> dist.TransformedDistribution:
        weights = {name: v for name, v in params.items() if name not in ("loc", "scale", "context")}
        base = dist.Normal(params["loc"], params["scale"]).to_event(1)
        return dist.TransformedDistribution(base, [PerDatapointFlows(self.flows, weights, params["context"])])
