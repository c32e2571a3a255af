"""Semi-supervised learning with the M2 model of Kingma et al. 2014, as Pyro programs trained by ``fit``.

    model:  y ~ Cat(1/10),  z ~ N(0, I),  x ~ p(x | decoder(z, y))
    guide:  y ~ q(y | x) (the classifier),  z ~ N(encoder(x, y))

One program handles a batch of both kinds: for the unlabelled images y is summed out exactly by
enumerating it in the guide (``infer={"enumerate": "parallel"}``, ``TraceEnum_ELBO(max_plate_nesting=1)``);
for the labelled ones y is observed, and the model adds the classification term α · log q(y | x) as
a ``pyro.factor`` with α = 1 · N (N all training images; the paper used 0.1 · N on MNIST, which on
Fashion-MNIST with 100 labels let the unlabelled term pull q(y|x) away from the labels: 5-epoch test
accuracy 0.57 vs 0.70 at 1 · N and 0.715 at 10 · N, baseline 0.69), so that the
classifier learns from the labels directly and not only through the generative model. Each batch
holds ``batch_size`` unlabelled images (one epoch = one pass over them) and a fresh draw of
``labelled_batch`` labelled ones; both plates are subsampled, so the loss is an unbiased estimate of
-(Σ_unlabelled U(x) + Σ_labelled L(x, y) + α E_labelled log q(y | x)).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.infer import TraceEnum_ELBO
from torch import nn

from ..errors import PyrovaeError
from ..nn.likelihoods import Likelihood, make_likelihood
from ..nn.nets import mlp, normal_head
from .vae import VAE, data_plate, register


def _cat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Concatenate on the last dim after broadcasting the leading ones (an enumerated y has extra dims)."""
    lead = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    return torch.cat([a.expand(*lead, a.shape[-1]), b.expand(*lead, b.shape[-1])], dim=-1)


class Classifier(nn.Module):
    """q(y | x): an MLP from flattened images to class logits (also the supervised baseline)."""

    def __init__(self, shape: tuple[int, ...], hidden: tuple[int, ...], n_classes: int, activation: str) -> None:
        super().__init__()
        self.event_dims = len(shape)
        self.net = mlp([math.prod(shape), *hidden, n_classes], activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(-self.event_dims))


class M2(VAE):
    """The M2 model: the label-conditioned :class:`~pyrovae.models.vae.VAE` (classifier q(y|x), encoder q(z|x,y),
    decoder p(x|y,z) with any :class:`Likelihood`), run on a labelled and an unlabelled batch at once.

    Defaults follow the paper's MNIST networks (one hidden layer of 500 softplus units, z of 50).
    ``alpha`` (the weight of the labelled classification term) is set by :func:`train_m2`.
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        likelihood: str | Likelihood = "bernoulli",
        hidden: tuple[int, ...] = (500,),
        z_dim: int = 50,
        n_classes: int = 10,
        activation: str = "softplus",
        alpha: float = 0.0,
        name: str = "m2",
    ) -> None:
        likelihood = make_likelihood(likelihood) if isinstance(likelihood, str) else likelihood
        d = math.prod(shape)
        out_shape = (likelihood.outputs_per_pixel * shape[0], *shape[1:])
        classifier = Classifier(shape, hidden, n_classes, activation)
        encoder = mlp([d + n_classes, *hidden, 2 * z_dim], activation)
        decoder = mlp([z_dim + n_classes, *reversed(hidden), math.prod(out_shape)], activation)
        super().__init__(
            encoder, decoder, likelihood, z_dim, name, event_dims=len(shape), n_classes=n_classes, classifier=classifier
        )
        self.shape, self.out_shape, self.alpha = tuple(shape), out_shape, alpha

    # -- networks
    def one_hot(self, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return F.one_hot(y, self.n_classes).to(like.dtype)

    def encode(
        self, x: torch.Tensor, y: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z | x, y)'s (loc, scale); ``y`` may carry enumeration dims on the left.

        The first layer is W [x; onehot(y)] + b = (W_x x + b) + W_y[:, y]: its image part is computed once
        for all enumerated classes (10x less of the encoder's largest matrix product), the class part
        is a column lookup. The same function as the encoder on the concatenation.
        """
        if y is None or mask is not None:
            raise PyrovaeError("M2's encoder reads a whole image and its label")
        flat = x.flatten(-len(self.shape))
        first = self.encoder[0]
        d = flat.shape[-1]
        h = F.linear(flat, first.weight[:, :d], first.bias) + first.weight[:, d:].T[y]
        return normal_head(self.encoder[1:](h))

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's output (..., k*C, H, W) for codes ``z`` and labels ``y``."""
        if y is None:
            raise PyrovaeError("M2's decoder reads a code and its label")
        return self.decoder(_cat(z, self.one_hot(y, z))).unflatten(-1, self.out_shape)

    def prior_z(self, like: torch.Tensor) -> dist.Distribution:
        return self.prior(like)

    # -- Pyro programs: the VAE's sites in two plates, y observed in one and enumerated in the other
    def model(
        self,
        xu: torch.Tensor | None,
        xl: torch.Tensor | None = None,
        yl: torch.Tensor | None = None,
        num_data: int | None = None,
        num_labelled: int | None = None,
    ) -> None:
        """Unlabelled ``xu`` (y latent) in the ``data`` plate; labelled ``xl, yl`` in the ``labelled`` plate."""
        register(f"{self.name}.decoder", self.decoder)
        register(f"{self.name}.likelihood", self.likelihood)
        if xl is not None:
            if self.alpha:
                register(f"{self.name}.classifier", self.classifier)
            with data_plate(xl, num_labelled, "labelled"):
                self.model_sites(xl, yl, suffix="_l")
                if self.alpha:  # α E_labelled log q(y|x): α/n per point, times the plate's n/b
                    n = num_labelled or len(xl)
                    log_q = dist.Categorical(logits=self.classifier(xl)).log_prob(yl)
                    pyro.factor("classification", (self.alpha / n) * log_q)
        if xu is not None:
            with data_plate(xu, num_data):
                self.model_sites(xu, suffix="_u")

    def guide(
        self,
        xu: torch.Tensor | None,
        xl: torch.Tensor | None = None,
        yl: torch.Tensor | None = None,
        num_data: int | None = None,
        num_labelled: int | None = None,
    ) -> None:
        """q(z | x, y) for the labelled; q(y | x) enumerated, then q(z | x, y), for the unlabelled."""
        register(f"{self.name}.encoder", self.encoder)
        if xl is not None:
            with data_plate(xl, num_labelled, "labelled"):
                self.guide_sites(xl, yl, suffix="_l")
        if xu is not None:
            register(f"{self.name}.classifier", self.classifier)
            with data_plate(xu, num_data):
                self.guide_sites(xu, suffix="_u")

    @staticmethod
    def elbo() -> TraceEnum_ELBO:
        """The estimator: enumeration of the guide's y needs TraceEnum_ELBO with one plate dim."""
        return TraceEnum_ELBO(max_plate_nesting=1)

    # -- use
    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 2000) -> torch.Tensor:
        """The most probable class under q(y | x)."""
        return torch.cat([self.classifier(b).argmax(-1) for b in x.split(batch_size)])

    @torch.no_grad()
    def sample_per_class(self, per_class: int = 10, like: torch.Tensor | None = None) -> torch.Tensor:
        """(n_classes * per_class) mean images, row c of class c; column j shares one z ~ N(0, I) across classes."""
        like = like if like is not None else next(self.parameters())
        z = self.prior_z(like).sample((per_class,))
        y = torch.arange(self.n_classes, device=z.device).repeat_interleave(per_class)
        return self.likelihood.mean(self.decode(z.repeat(self.n_classes, 1), y))


# -------------------------------------------------------------------------------------------- data
