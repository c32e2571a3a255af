"""The hand-written PyTorch VAE that pyrovae is measured against: same networks, likelihood, KL and batching.

No Pyro: the loss is written out (Bernoulli log-likelihood from logits as Σ x·l − softplus(l), analytic or MC KL, or the
IWAE bound), scaled like pyrovae's (N/B times the minibatch sum) so that Adam sees the same problem.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pyrovae.models.vae import VAE


def bernoulli_log_px(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Σ x·l − softplus(l) over the image dims: the Bernoulli log-likelihood as pyrovae's likelihood computes it
    (faster than F.binary_cross_entropy_with_logits), so that a comparison measures the framework, not the kernel."""
    return (x * logits).flatten(-3).sum(-1) - F.softplus(logits).flatten(-3).sum(-1)


def normal_kl(loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """KL(N(loc, scale²) ‖ N(0, I)), summed over the last dim."""
    return 0.5 * (loc.pow(2) + scale.pow(2) - 1).sum(-1) - scale.log().sum(-1)


def plain_loss(vae: VAE, x: torch.Tensor, num_data: int, kind: str = "meanfield", k: int = 1) -> torch.Tensor:
    """Negative ELBO (or IWAE bound) of a Bernoulli VAE, summed over the batch and scaled by N/B."""
    loc, scale = vae.encoder(x)
    eps = torch.randn((k, *loc.shape) if k > 1 else loc.shape, device=x.device)
    z = loc + scale * eps
    logits = vae.decoder(z)
    log_px = bernoulli_log_px(x, logits)
    if kind == "meanfield":
        bound = log_px - normal_kl(loc, scale)
        if k > 1:
            bound = bound.mean(0)
    else:
        log_pz = -0.5 * (z.pow(2) + math.log(2 * math.pi)).sum(-1)
        log_qz = (-0.5 * (eps.pow(2) + math.log(2 * math.pi)) - scale.log()).sum(-1)
        log_w = log_px + log_pz - log_qz
        if kind == "iwae":
            bound = torch.logsumexp(log_w, 0) - math.log(k) if k > 1 else log_w
        else:  # trace: MC KL
            bound = log_w.mean(0) if k > 1 else log_w
    return -(num_data / len(x)) * bound.sum()


def plain_epoch(vae: VAE, data, optimizer: torch.optim.Optimizer, batch_size: int, kind: str = "meanfield", k: int = 1):
    """One epoch over a pyrovae dataset (device-resident, permutation batching); returns the summed loss tensor."""
    n = len(data)
    perm = torch.randperm(n, device=data.device)
    total = torch.zeros((), device=data.device)
    for start in range(0, n, batch_size):
        idx = perm[start : start + batch_size]
        optimizer.zero_grad(set_to_none=True)
        loss = plain_loss(vae, data.batch(idx), n, kind, k)
        loss.backward()
        optimizer.step()
        total += loss.detach() * (len(idx) / n)
    return total


@torch.no_grad()
def plain_log_likelihood(vae: VAE, x: torch.Tensor, k: int, chunk: int, batch: int) -> torch.Tensor:
    """log p(x) by importance sampling with q(z|x) (the IWAE bound, K = ``k``), written out: ``batch`` images
    and ``chunk`` particles per call, chunks combined by a running log-sum-exp, as pyrovae's evaluation does."""
    out = []
    for start in range(0, len(x), batch):
        xb = x[start : start + batch]
        loc, scale = vae.encoder(xb)
        acc = torch.full((len(xb),), -math.inf, device=x.device)
        for p0 in range(0, k, chunk):
            eps = torch.randn((min(chunk, k - p0), *loc.shape), device=x.device)
            z = loc + scale * eps
            logits = vae.decoder(z)
            log_px = bernoulli_log_px(xb, logits)
            log_pz = -0.5 * (z.pow(2) + math.log(2 * math.pi)).sum(-1)
            log_qz = (-0.5 * (eps.pow(2) + math.log(2 * math.pi)) - scale.log()).sum(-1)
            acc = torch.logaddexp(acc, torch.logsumexp(log_px + log_pz - log_qz, 0))
        out.append(acc - math.log(k))
    return torch.cat(out)
