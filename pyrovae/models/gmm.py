"""Mixture baselines (Gaussian or Bernoulli components) as Pyro programs, trained by :func:`pyrovae.fit`.

    model:  x_i ~ sum_k w_k p(x | theta_k)      for i in a minibatch of N (the VAE's data plate)
    guide:  empty: w and theta are point estimates (maximum likelihood), registered with pyro.module

The assignment k_i is summed out exactly, either inside ``dist.MixtureSameFamily``
(``assignment="marginal"``: Trace_ELBO, TraceMeanField_ELBO) or by Pyro's parallel enumeration
(``assignment="enumerate"``: TraceEnum_ELBO, see :meth:`GMM.elbo`). With no latent left in the guide
the loss is exactly minus the minibatch-scaled log-likelihood, so ``fit``'s "ELBO" is the mean
log-likelihood per datapoint. Images (N, C, H, W) are flattened to (N, D) inside.

Parameterisation (chosen so that one Adam learning rate suits every pixel): means are stored
divided by a fixed per-component, per-dimension scale s (the k-means cluster's standard deviation,
or for full covariance its conditional one, the initial Cholesky diagonal), so that a step moves a
mean in units of its own spread. Diag variances are ``exp(2 r) + reg_covar``; a full covariance is
``L L^T`` with ``L = diag(s) M`` (M's strictly lower part scaled by 1/sqrt(D)) and ``L_ii =
sqrt(s_i^2 exp(2 r_i) + reg_covar)``. So ``reg_covar`` floors the (Cholesky diagonal) variance as
sklearn's does: a component cannot collapse onto a constant pixel, and the likelihood stays bounded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import ELBO, Trace_ELBO, TraceEnum_ELBO
from torch import nn

from ..errors import PyrovaeError
from .vae import data_plate, register

COVARIANCES = ("diag", "full")
FAMILIES = ("gaussian", "bernoulli")
ASSIGNMENTS = ("marginal", "enumerate")


# ------------------------------------------------------------------------------------------ k-means
@dataclass
class KMeansResult:
    """The best of several k-means++ runs: centres (K, D), labels (N,) and inertia (sum of squared distances)."""

    centers: torch.Tensor
    labels: torch.Tensor
    inertia: float


def _sq_dists(x: torch.Tensor, x_sq: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    return (x_sq[:, None] - 2.0 * (x @ centers.T) + (centers * centers).sum(1)[None]).clamp_min_(0.0)


def _seed_pp(x: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """k-means++ seeding: each next centre drawn with probability proportional to D(x)^2."""
    n = len(x)
    first = torch.randint(n, (1,), device=x.device, generator=generator)
    centers = [x[first]]
    d2 = ((x - x[first]) ** 2).sum(1)
    for _ in range(1, k):
        weights = d2 if float(d2.sum()) > 0 else torch.ones_like(d2)  # all points covered: draw uniformly
        idx = torch.multinomial(weights, 1, generator=generator)
        centers.append(x[idx])
        d2 = torch.minimum(d2, ((x - x[idx]) ** 2).sum(1))
    return torch.cat(centers)


def kmeans_pp(
    x: torch.Tensor,
    k: int,
    restarts: int = 3,
    iters: int = 50,
    generator: torch.Generator | None = None,
    tol: float = 1e-4,
) -> KMeansResult:
    """k-means (Lloyd) from k-means++ seeds on ``x``'s device, ``restarts`` times; the lowest inertia wins.

    ``generator`` (on ``x``'s device) makes it reproducible; ``tol`` stops a run when the centres move
    less than ``tol`` times the data's total variance (sklearn's rule). Empty clusters are reseeded at
    the points farthest from their centres.
    """
    if k < 1 or restarts < 1 or iters < 0:
        raise PyrovaeError(f"k-means needs k >= 1, restarts >= 1 and iters >= 0; got {k}, {restarts}, {iters}")
    x = x.reshape(len(x), -1).float()
    if len(x) < k:
        raise PyrovaeError(f"k-means needs at least k={k} datapoints, got {len(x)}")
    x_sq = (x * x).sum(1)
    threshold = tol * float(x.var(0, unbiased=False).sum()) if len(x) > 1 else 0.0
    best: KMeansResult | None = None
    for _ in range(restarts):
        centers = _seed_pp(x, k, generator)
        for _ in range(iters):
            d2 = _sq_dists(x, x_sq, centers)
            labels = d2.argmin(1)
            counts = torch.bincount(labels, minlength=k)
            new = torch.zeros_like(centers).index_add_(0, labels, x) / counts.clamp_min(1)[:, None].to(x.dtype)
            empty = (counts == 0).nonzero().flatten()
            if len(empty):
                far = d2.gather(1, labels[:, None]).squeeze(1).topk(len(empty)).indices
                new[empty] = x[far]
            shift = float(((new - centers) ** 2).sum())
            centers = new
            if shift <= threshold:
                break
        d2 = _sq_dists(x, x_sq, centers)
        dmin, labels = d2.min(1)
        inertia = float(dmin.sum())
        if best is None or inertia < best.inertia:
            best = KMeansResult(centers, labels, inertia)
    return best


# ---------------------------------------------------------------------------------------------- GMM
class GMM(nn.Module):
    """A K-component mixture with point-estimated parameters, written as a Pyro model and guide.

    ``dim`` is D or a data shape such as (C, H, W) (then :meth:`sample` returns that shape).
    ``family="gaussian"`` with ``covariance="diag"|"full"``, or ``family="bernoulli"`` (binary data,
    component logits). Call :meth:`initialize` (k-means++) before :func:`pyrovae.fit`.
    """

    def __init__(
        self,
        k: int,
        dim: int | tuple[int, ...],
        covariance: str = "diag",
        family: str = "gaussian",
        assignment: str = "marginal",
        reg_covar: float = 1e-6,
        name: str = "gmm",
    ) -> None:
        super().__init__()
        if not isinstance(k, int) or k < 1:
            raise PyrovaeError(f"a mixture needs K >= 1 components, got {k!r}")
        if covariance not in COVARIANCES:
            raise PyrovaeError(f"unknown covariance {covariance!r}; choose one of {', '.join(COVARIANCES)}")
        if family not in FAMILIES:
            raise PyrovaeError(f"unknown mixture family {family!r}; choose one of {', '.join(FAMILIES)}")
        if assignment not in ASSIGNMENTS:
            raise PyrovaeError(f"unknown assignment {assignment!r}; choose one of {', '.join(ASSIGNMENTS)}")
        if not reg_covar >= 0:
            raise PyrovaeError(f"reg_covar must be >= 0, got {reg_covar}")
        self.shape = (dim,) if isinstance(dim, int) else tuple(int(d) for d in dim)
        d = math.prod(self.shape)
        if d < 1:
            raise PyrovaeError(f"the data dimension must be >= 1, got shape {self.shape}")
        self.k, self.dim, self.covariance, self.family = k, d, covariance, family
        self.assignment, self.reg_covar, self.name = assignment, float(reg_covar), name
        self.logits = nn.Parameter(torch.zeros(k))
        # Gaussian: mean = loc_raw * scale; Bernoulli: loc_raw are the component logits (scale stays 1).
        self.loc_raw = nn.Parameter(torch.randn(k, d) * 0.1)
        self.register_buffer("scale", torch.ones(k, d))
        if family == "gaussian":
            self.log_std = nn.Parameter(torch.zeros(k, d))  # diag: std; full: Cholesky diagonal (see module doc)
            if covariance == "full":
                self.tril_raw = nn.Parameter(torch.zeros(k, d, d))  # strictly lower part of M in L = diag(s) M
                self.tril_gain = 1.0 / math.sqrt(d)  # so that one Adam step moves a row of L by O(lr), whatever D

    # -- parameters in the usual form
    @property
    def weights(self) -> torch.Tensor:
        """Mixture weights (K,)."""
        return torch.softmax(self.logits, -1)

    @property
    def means(self) -> torch.Tensor:
        """Component means (K, D): Gaussian means, or Bernoulli probabilities."""
        if self.family == "bernoulli":
            return torch.sigmoid(self.loc_raw)
        return self.loc_raw * self.scale

    @property
    def variances(self) -> torch.Tensor:
        """Diagonal variances (K, D), floored at ``reg_covar`` (diag Gaussian only)."""
        return torch.exp(2 * self.log_std) + self.reg_covar

    @property
    def scale_tril(self) -> torch.Tensor:
        """Cholesky factors L (K, D, D) of the full covariances, with L_ii^2 >= ``reg_covar``."""
        s = self.scale
        diag = torch.sqrt(s * s * torch.exp(2 * self.log_std) + self.reg_covar)
        return (s[:, :, None] * self.tril_gain) * torch.tril(self.tril_raw, -1) + torch.diag_embed(diag)

    @property
    def covariances(self) -> torch.Tensor:
        """Covariances: (K, D) variances for diag, (K, D, D) matrices for full."""
        if self.family != "gaussian":
            raise PyrovaeError("a Bernoulli mixture has no covariances")
        if self.covariance == "diag":
            return self.variances
        tril = self.scale_tril
        return tril @ tril.transpose(-1, -2)

    # -- distributions
    def components(self, index: torch.Tensor | None = None) -> dist.Distribution:
        """The component distributions, batch (K,) (or ``index``'s shape), event (D,)."""

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t if index is None else t[index]

        if self.family == "bernoulli":
            return dist.Bernoulli(logits=pick(self.loc_raw)).to_event(1)
        if self.covariance == "diag":
            return dist.Normal(pick(self.means), pick(self.variances).sqrt()).to_event(1)
        return dist.MultivariateNormal(pick(self.means), scale_tril=pick(self.scale_tril))

    def mixture(self) -> dist.Distribution:
        """p(x) with the assignment summed out: by matrix products for factorised components
        (:class:`FactorisedMixture`), else ``MixtureSameFamily`` of :meth:`components`."""
        if self.family == "bernoulli" or self.covariance == "diag":
            return FactorisedMixture(self)
        return self.mixture_same_family()

    def mixture_same_family(self) -> dist.MixtureSameFamily:
        """p(x) as Pyro's ``MixtureSameFamily`` (the reference the fast form is tested against)."""
        return dist.MixtureSameFamily(dist.Categorical(logits=self.logits), self.components())

    def flatten(self, x: torch.Tensor) -> torch.Tensor:
        """(N, *shape) -> (N, D), refusing data of another dimension."""
        flat = x.reshape(len(x), -1)
        if flat.shape[1] != self.dim:
            raise PyrovaeError(f"the mixture is for D={self.dim} dimensions, got data of shape {tuple(x.shape)}")
        return flat

    # -- Pyro programs
    def model(self, x: torch.Tensor, *_: torch.Tensor, num_data: int | None = None) -> None:
        """x_i ~ mixture (marginal) or k_i ~ Cat(w), x_i ~ p(x | theta_{k_i}) with k_i enumerated."""
        register(self.name, self)
        x = self.flatten(x)
        with data_plate(x, num_data):
            if self.assignment == "marginal":
                pyro.sample("x", self.mixture(), obs=x)
            else:
                k = pyro.sample("assignment", dist.Categorical(logits=self.logits), infer={"enumerate": "parallel"})
                pyro.sample("x", self.components(k), obs=x)

    def guide(self, x: torch.Tensor, *_: torch.Tensor, num_data: int | None = None) -> None:
        """Empty: the parameters are point estimates in the model, and the assignment is summed out there."""

    def elbo(self) -> ELBO:
        """The estimator this formulation needs: Trace_ELBO (marginal) or TraceEnum_ELBO (enumerate).

        ``fit``'s ``val_data`` works with "marginal" only: its evaluation runs under no_grad, where Pyro's
        TraceEnum_ELBO.differentiable_loss refuses to run; monitor an enumerated model with :meth:`log_prob`.
        """
        return Trace_ELBO() if self.assignment == "marginal" else TraceEnum_ELBO(max_plate_nesting=1)

    # -- initialisation
    @torch.no_grad()
    def initialize(
        self,
        x: torch.Tensor,
        restarts: int = 3,
        iters: int = 50,
        generator: torch.Generator | None = None,
    ) -> GMM:
        """Set weights, means and (co)variances from k-means++ clusters of ``x`` (as sklearn's ``init_params='kmeans'``)."""
        x = self.flatten(x).to(self.logits.device, torch.float32)
        km = kmeans_pp(x, self.k, restarts, iters, generator)
        counts = torch.bincount(km.labels, minlength=self.k).to(x.dtype)
        self.logits.copy_(torch.log((counts + 1e-3) / (len(x) + 1e-3 * self.k)))
        if self.family == "bernoulli":
            sums = torch.zeros_like(km.centers).index_add_(0, km.labels, x)
            probs = (sums + 1.0) / (counts[:, None] + 2.0)  # Laplace smoothing keeps the logits finite
            self.loc_raw.copy_(torch.logit(probs))
            return self
        means = torch.zeros_like(km.centers).index_add_(0, km.labels, x) / counts.clamp_min(1)[:, None]
        diff = x - means[km.labels]
        var = torch.zeros_like(means).index_add_(0, km.labels, diff * diff) / counts.clamp_min(1)[:, None]
        reg = self.reg_covar
        small = max(reg * 1e-2, 1e-12)
        self.scale.copy_(torch.sqrt(var + reg).clamp_min(1e-6))
        self.loc_raw.copy_(means / self.scale)
        if self.covariance == "diag":
            self.log_std.copy_(0.5 * torch.log(var.clamp_min(small)))
            return self
        eye = torch.eye(self.dim, dtype=torch.float64, device=x.device)
        for c in range(self.k):
            dc = diff[km.labels == c].double()
            cov = dc.T @ dc / max(len(dc), 1) + reg * eye
            tril = _cholesky(cov)
            s = tril.diagonal().clamp_min(1e-6)  # conditional stds: the scale a step should be measured in
            self.scale[c] = s.float()
            self.loc_raw[c] = (means[c] / s).float()
            self.log_std[c] = (0.5 * torch.log(((s * s) - reg).clamp_min(small) / (s * s))).float()
            self.tril_raw[c] = torch.tril(tril / (s[:, None] * self.tril_gain), -1).float()
        return self

    # -- evaluation
    @torch.no_grad()
    def joint_log_prob(self, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """log w_k + log p(x_i | theta_k), shape (N, K), computed in batches."""
        x = self.flatten(x)
        mix = self.mixture()
        if isinstance(mix, FactorisedMixture):
            return torch.cat([mix.joint_log_prob(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
        comps, log_w = self.components(), torch.log_softmax(self.logits, -1)
        return torch.cat(
            [comps.log_prob(x[i : i + batch_size].unsqueeze(-2)) + log_w for i in range(0, len(x), batch_size)]
        )

    def log_prob(self, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """Exact log p(x_i) per datapoint (N,): logsumexp over components."""
        return torch.logsumexp(self.joint_log_prob(x, batch_size), -1)

    def responsibilities(self, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """Posterior assignment probabilities p(k | x_i), shape (N, K)."""
        return torch.softmax(self.joint_log_prob(x, batch_size), -1)

    def assign(self, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """The most probable component of each datapoint (N,)."""
        return self.joint_log_prob(x, batch_size).argmax(-1)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` draws from the mixture, shaped (n, *shape)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        if self.family == "bernoulli":
            x = torch.bernoulli(self.means[k], generator=generator)
        else:
            eps = torch.randn(n, self.dim, device=k.device, generator=generator)
            if self.covariance == "diag":
                x = self.means[k] + self.variances[k].sqrt() * eps
            else:
                x = torch.empty_like(eps)
                tril, means = self.scale_tril, self.means
                for c in k.unique():
                    rows = (k == c).nonzero().flatten()
                    x[rows] = means[c] + eps[rows] @ tril[c].T
        return x.reshape(n, *self.shape)


class FactorisedMixture(dist.TorchDistribution):
    """sum_k w_k prod_d p(x_d | theta_kd) for diagonal-Gaussian or Bernoulli components.

    The per-component log-likelihoods are two matrix products (float64, so that large precisions
    cannot cancel badly) instead of a (batch, K, D) elementwise tensor: the same numbers as
    ``MixtureSameFamily``, many times faster at D = 784.
        Gaussian:  log N(x | m_k, v_k) = -1/2 [x^2 . (1/v_k) - 2 x . (m_k/v_k) + sum m_k^2/v_k + sum log 2 pi v_k]
        Bernoulli: log Bern(x | l_k)   = x . l_k + sum_d log sigmoid(-l_kd)
    """

    arg_constraints: dict = {}

    def __init__(self, gmm: GMM, batch_shape: torch.Size = torch.Size()) -> None:
        self.gmm = gmm
        self.log_w = torch.log_softmax(gmm.logits, -1)
        if gmm.family == "bernoulli":
            self.lin = gmm.loc_raw.double()  # (K, D) logits
            self.quad = None
            self.const = torch.nn.functional.logsigmoid(-gmm.loc_raw).sum(-1).double()
        else:
            var = gmm.variances.double()
            means = gmm.means.double()
            self.quad = -0.5 / var
            self.lin = means / var
            self.const = -0.5 * ((means * means / var).sum(-1) + torch.log(2 * math.pi * var).sum(-1))
        super().__init__(torch.Size(batch_shape), torch.Size([gmm.dim]), validate_args=False)

    @property
    def support(self):
        return dist.constraints.independent(
            dist.constraints.boolean if self.gmm.family == "bernoulli" else dist.constraints.real, 1
        )

    def expand(self, batch_shape, _instance=None) -> FactorisedMixture:
        new = self._get_checked_instance(FactorisedMixture, _instance)
        new.gmm, new.log_w, new.lin, new.quad, new.const = self.gmm, self.log_w, self.lin, self.quad, self.const
        super(FactorisedMixture, new).__init__(torch.Size(batch_shape), self.event_shape, validate_args=False)
        return new

    def joint_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log w_k + log p(x | theta_k), shape (..., K)."""
        flat = x.reshape(-1, x.shape[-1]).double()
        out = flat @ self.lin.T + self.const
        if self.quad is not None:
            out = out + (flat * flat) @ self.quad.T
        return (out.to(self.log_w.dtype) + self.log_w).reshape(*x.shape[:-1], -1)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(self.joint_log_prob(x), -1)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        n = int(torch.Size(sample_shape + self.batch_shape).numel())
        return self.gmm.sample(n).reshape(*sample_shape, *self.batch_shape, self.gmm.dim)


def _cholesky(cov: torch.Tensor) -> torch.Tensor:
    """Cholesky factor, adding growing jitter if the (float64) matrix is numerically singular."""
    jitter = 0.0
    scale = float(cov.diagonal().mean()) or 1.0
    for _ in range(8):
        tril, info = torch.linalg.cholesky_ex(cov + jitter * torch.eye(len(cov), dtype=cov.dtype, device=cov.device))
        if int(info) == 0:
            return tril
        jitter = scale * 1e-10 if jitter == 0 else jitter * 100
    raise PyrovaeError("could not factor a component covariance; raise reg_covar")


__all__ = ["GMM", "KMeansResult", "kmeans_pp"]
