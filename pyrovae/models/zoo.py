"""The model zoo's register: each family's model/guide pair, how ``fit`` trains it, and what it says of itself.

An entry builds its module from a :class:`ZooData` (image shape, training pixel means, a few training images,
classes); ``fit`` trains ``training_pair`` (the module's ``model``/``guide`` unless it says otherwise) by the
entry's estimator; a conditional entry's programs also take ``y`` (and score log p(x | y)).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from pyro.infer import ELBO
from torch import nn

from ..errors import PyrovaeError
from .beta import BetaVAE
from .conditional import ConditionalVAE
from .discrete import DiscreteVAE
from .flow import FlowGuideVAE
from .gmm import GMM
from .hierarchical import TwoLayerVAE
from .vae import VAE, vae_parts
from .vampprior import VampPriorVAE


@dataclass(frozen=True)
class ZooData:
    """What a zoo model is built from: the images' shape, their pixel means and a few of them, and the classes."""

    shape: tuple[int, ...]
    pixel_mean: torch.Tensor
    sample: torch.Tensor  # training images (VampPrior's pseudo-inputs start at some, the mixture's k-means++ at all)
    classes: int = 10


@dataclass(frozen=True)
class ZooEntry:
    """One row of the zoo: how to build the model, which estimator trains it, and a line about it."""

    name: str
    about: str
    build: Callable[[ZooData], nn.Module]
    elbo: Callable[[nn.Module], str | ELBO] = lambda m: "meanfield"
    particles: int | None = None
    conditional: bool = False  # the programs take y= (labels) and log p(x | y) is scored
    gap: bool = False  # its inference gap is split into approximation and amortisation (``pyrovae gap``) too
    lr: float = 1e-3


def _parts(data: ZooData) -> tuple:
    return vae_parts(data.shape, "bernoulli", "iwae", data.pixel_mean)


def _mixture(data: ZooData) -> GMM:
    gmm = GMM(10, data.shape, family="bernoulli")
    return gmm.initialize(data.sample, generator=torch.Generator(device=data.sample.device).manual_seed(0))


ENTRIES: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        ZooEntry("vae", "one stochastic layer (z 50), diagonal Gaussian guide, ELBO", lambda d: VAE(*_parts(d)),
                 gap=True),
        ZooEntry("beta-vae", "the VAE trained with β = 4 on the KL (scored as the model, β = 1)",
                 lambda d: BetaVAE(*_parts(d), beta=4.0)),
        ZooEntry("vampprior", "the VAE with a VampPrior of 100 pseudo-inputs, trained by Trace_ELBO",
                 lambda d: VampPriorVAE(*_parts(d), pseudo_inputs=d.sample[:100]), lambda m: "trace"),
        ZooEntry("flow", "the VAE with 2 IAF transforms on the guide given the encoder's context, trained by "
                 "Trace_ELBO", lambda d: FlowGuideVAE(*_parts(d), flows=2), lambda m: "trace", gap=True),
        ZooEntry("hvae", "two stochastic layers (z1 100, z2 50), ELBO",
                 lambda d: TwoLayerVAE(d.shape, pixel_mean=d.pixel_mean), lambda m: "trace"),
        ZooEntry("hvae-iwae5", "two stochastic layers, IWAE bound k = 5",
                 lambda d: TwoLayerVAE(d.shape, pixel_mean=d.pixel_mean), lambda m: "iwae", particles=5),
        ZooEntry("hvae-iwae50", "two stochastic layers, IWAE bound k = 50",
                 lambda d: TwoLayerVAE(d.shape, pixel_mean=d.pixel_mean), lambda m: "iwae", particles=50),
        ZooEntry("discrete", "2 categorical latents of 10 values, enumerated exactly (TraceEnum_ELBO)",
                 lambda d: DiscreteVAE(d.shape, pixel_mean=d.pixel_mean), lambda m: m.elbo()),
        ZooEntry("cvae", "conditional VAE given the label: its number is log p(x | y), not log p(x)",
                 lambda d: ConditionalVAE(d.shape, d.classes, pixel_mean=d.pixel_mean), conditional=True),
        ZooEntry("gmm", "baseline: Bernoulli mixture of 10 components (k-means++ start), exact log p(x)",
                 _mixture, lambda m: m.elbo(), lr=0.02),
    )
}  # fmt: skip


def zoo_names(spec: str) -> list[str]:
    """The entries ``spec`` names: ``all`` or a comma-separated list of names, in the zoo's order."""
    if spec.strip() == "all":
        return list(ENTRIES)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in ENTRIES]
    if unknown or not names:
        raise PyrovaeError(f"unknown zoo model {(unknown or [spec])[0]!r}; choose all or some of {', '.join(ENTRIES)}")
    return [n for n in ENTRIES if n in names]


def training_pair(module: nn.Module) -> tuple[Callable, Callable]:
    """The (model, guide) that ``fit`` trains: ``module.training_pair()`` if it has one (β-VAE), else its programs."""
    pair = getattr(module, "training_pair", None)
    return pair() if pair is not None else (module.model, module.guide)
