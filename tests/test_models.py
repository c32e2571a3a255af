"""Likelihoods and networks: every combination builds, scores data finitely and trains its parameters."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceMeanField_ELBO

from pyrovae import LIKELIHOODS, Pixels, PyrovaeError, build_vae, fit, make_likelihood, make_splits, synthetic
from pyrovae.likelihoods import BernoulliImage
from pyrovae.nets import Arch

CONV = Arch("conv", (8, 16), "relu", 4)
MLP = Arch("mlp", (32,), "tanh", 4, logit_bias=True)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
@pytest.mark.parametrize("arch", [MLP, CONV], ids=["mlp", "conv"])
@pytest.mark.parametrize("likelihood", list(LIKELIHOODS))
def test_every_likelihood_and_arch_scores_and_backpropagates(shape, arch, likelihood):
    binary = likelihood == "bernoulli"
    raw = synthetic(n_train=40, n_test=10, shape=shape, seed=0)
    splits = make_splits(raw, Pixels("fixed" if binary else "none"), val_size=8)
    vae = build_vae(shape, likelihood, arch, pixel_mean=splits.train_pixel_mean)
    x = splits.train.batch(torch.arange(16))
    loss = TraceMeanField_ELBO(num_particles=3, vectorize_particles=True).differentiable_loss(vae.model, vae.guide, x)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in vae.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert vae.reconstruct(x).shape == x.shape and vae.sample(5, x).shape == (5, *shape)


def test_gaussian_learned_variance_is_trained():
    raw = synthetic(n_train=600, n_test=10, shape=(1, 12, 12), seed=0)
    splits = make_splits(raw, Pixels("none"), val_size=100)
    vae = build_vae(splits.train.shape, "gaussian-learned", MLP, pixel_mean=splits.train_pixel_mean)
    assert float(vae.likelihood.log_gamma.detach()) == 0.0
    fit(vae.model, vae.guide, splits.train, epochs=5, batch_size=50, lr=1e-2, quiet=True, seed=0)
    # The pixel noise has sd ~0.1, so the optimal log gamma is near -4.6. Adam moves it by at most
    # ~lr per step: 50 steps at 1e-2 reach about -0.5 at best; it must get at least 70% of the way.
    assert float(vae.likelihood.log_gamma.detach()) < -0.35
    assert any(name.endswith("log_gamma") for name in pyro.get_param_store().keys())


def test_support_checks():
    x = torch.tensor([0.0, 0.5, 1.0])
    with pytest.raises(PyrovaeError, match="bernoulli likelihood needs binary pixels"):
        make_likelihood("bernoulli").check_support(x)
    make_likelihood("bernoulli").check_support(x, allow=True)
    with pytest.raises(PyrovaeError, match="continuous-bernoulli likelihood needs pixels in"):
        make_likelihood("continuous-bernoulli").check_support(x + 1)
    make_likelihood("gaussian").check_support(x + 5)  # real support: anything goes
    with pytest.raises(PyrovaeError, match="unknown likelihood 'poisson'"):
        make_likelihood("poisson")
    with pytest.raises(PyrovaeError, match="unknown arch 'resnet'"):
        build_vae((1, 28, 28), "bernoulli", "resnet")


def test_iwae_preset_starts_at_the_pixel_means():
    mean = torch.full((1, 28, 28), 0.2)
    vae = build_vae((1, 28, 28), "bernoulli", "iwae", pixel_mean=mean)
    bias = vae.decoder.net[-1].bias
    assert torch.allclose(torch.sigmoid(bias), torch.full_like(bias, 0.2), atol=1e-6)
    assert [m.out_features for m in vae.encoder.net if isinstance(m, torch.nn.Linear)] == [200, 200, 100]


def test_bf16_autocast_runs_the_networks_in_mixed_precision():
    # Same draws, networks in bfloat16 (8 bits of mantissa): the loss moves by well under 2%,
    # and what reaches the distributions is float32.
    raw = synthetic(n_train=64, n_test=8, shape=(1, 12, 12), seed=0)
    splits = make_splits(raw, Pixels("fixed"), val_size=8)
    vae = build_vae(splits.train.shape, "bernoulli", MLP, pixel_mean=splits.train_pixel_mean)
    x = splits.train.batch(torch.arange(32))
    losses = []
    for dtype in (None, torch.bfloat16):
        vae.autocast = dtype
        pyro.set_rng_seed(0)
        losses.append(float(TraceMeanField_ELBO().differentiable_loss(vae.model, vae.guide, x)))
        assert vae._run(vae.decoder, torch.zeros(2, 4)).dtype == torch.float32
    assert losses[0] != losses[1] and abs(losses[1] - losses[0]) < 0.02 * abs(losses[0])


def test_bernoulli_image_log_prob_equals_torch_bernoulli():
    # Σ x·l − softplus(l) is Bernoulli(logits).to_event(3).log_prob, for binary x and (as the
    # cross-entropy) for grey x; gradients too; and plates' expand keeps the fast class.
    torch.manual_seed(0)
    logits = (4 * torch.randn(5, 3, 1, 28, 28)).requires_grad_(True)
    lik = make_likelihood("bernoulli")
    for x in ((torch.rand(3, 1, 28, 28) < 0.3).float(), torch.rand(3, 1, 28, 28)):
        ours = lik(logits)
        assert isinstance(ours, BernoulliImage)
        ref = dist.Bernoulli(logits=logits, validate_args=False).to_event(3)
        a, b = ours.log_prob(x), ref.log_prob(x)
        assert a.shape == b.shape == (5, 3)
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-3)  # sums of 784 float32 terms of size ~4
        (ga,) = torch.autograd.grad(a.sum(), logits)
        (gb,) = torch.autograd.grad(b.sum(), logits)
        assert torch.allclose(ga, gb, atol=1e-6)
    expanded = lik(logits[:, :1]).expand((5, 3))
    assert isinstance(expanded, BernoulliImage) and expanded.batch_shape == (5, 3)
    assert torch.allclose(expanded.log_prob(x), lik(logits[:, :1]).log_prob(x).expand(5, 3))
    same = lik(logits)
    assert same.expand((5, 3)) is same  # a plate's no-op expand adds no object and no autograd node
    assert lik(logits).sample().shape == logits.shape
