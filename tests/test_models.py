"""Likelihoods and networks: every combination builds, scores data finitely and trains its parameters."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceMeanField_ELBO

from pyrovae import LIKELIHOODS, Pixels, PyrovaeError, build_vae, fit, make_likelihood, make_splits, synthetic
from pyrovae.nn.likelihoods import BernoulliImage
from pyrovae.nn.nets import Arch

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


# ------------------------------------------------------------------- the one VAE program's label option
class _LabelledLinear:
    """A label-conditioned linear-Gaussian VAE with closed forms: y ~ Cat(1/3), z ~ N(0, I₂),
    x | y, z ~ N(Wz + V e_y + b, I₄) (W with orthogonal columns), so that x | y ~ N(V e_y + b, WWᵀ + I),
    and the encoder is the exact posterior q(z | x, y) = p(z | x, y), a diagonal Gaussian."""

    C, Z, D = 3, 2, 4

    def __init__(self) -> None:
        from torch import nn

        from pyrovae.models.vae import VAE
        from pyrovae.nn.likelihoods import LearnedNoise

        g = torch.Generator().manual_seed(0)
        q, _ = torch.linalg.qr(torch.randn(self.D, self.Z, generator=g))
        self.W = q * torch.tensor([2.0, 0.7])
        self.V, self.b = torch.randn(self.C, self.D, generator=g), torch.randn(self.D, generator=g)
        cov = torch.linalg.inv(torch.eye(self.Z) + self.W.T @ self.W)  # σ = 1 (LearnedNoise starts at γ = 1)
        gain, sd = cov @ self.W.T, cov.diag().sqrt()
        W, V, b = self.W, self.V, self.b

        class Encoder(nn.Module):
            def forward(self, x, y):
                return (x - b - V[y]) @ gain.T, sd.expand(*torch.broadcast_shapes(x.shape, V[y].shape)[:-1], -1)

        class Decoder(nn.Module):
            def forward(self, z, y):
                return z @ W.T + V[y] + b

        classifier = nn.Linear(self.D, self.C)
        nn.init.zeros_(classifier.weight)
        nn.init.zeros_(classifier.bias)  # q(y | x) uniform: the y draws carry all the importance-sampling noise
        self.vae = VAE(
            Encoder(), Decoder(), LearnedNoise(), self.Z, event_dims=1, n_classes=self.C, classifier=classifier
        )

    def log_p_x_given_y(self, x: torch.Tensor) -> torch.Tensor:
        """(C, N): log p(x_n | y = c)."""
        cov = self.W @ self.W.T + torch.eye(self.D)
        return torch.stack([dist.MultivariateNormal(self.V[c] + self.b, cov).log_prob(x) for c in range(self.C)])

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(1)
        y = torch.randint(self.C, (n,), generator=g)
        z = torch.randn(n, self.Z, generator=g)
        return z @ self.W.T + self.V[y] + self.b + torch.randn(n, self.D, generator=g), y


def test_label_conditioned_vae_enumerates_y_exactly():
    """y unobserved: TraceEnum_ELBO on the VAE's own model/guide sums y out; with the exact q(z | x, y), the ELBO
    is Σ_y q(y|x)[log p(y) + log p(x|y) - log q(y|x)] for every z draw (float32 rounding, rel 1e-5).
    y observed: the ELBO is log p(y) + log p(x | y) exactly."""
    from pyro.infer import Trace_ELBO, TraceEnum_ELBO

    lin = _LabelledLinear()
    x, y = lin.sample(7)
    log_py = -torch.log(torch.tensor(3.0))
    pyro.set_rng_seed(0)
    loss = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(lin.vae.model, lin.vae.guide, x)
    log_q_y = torch.full((3, 7), float(log_py))  # the zero classifier: uniform
    expected = (log_q_y.exp() * (log_py + lin.log_p_x_given_y(x) - log_q_y)).sum()
    assert float(loss.detach()) == pytest.approx(-float(expected), rel=1e-5)
    labelled = Trace_ELBO().differentiable_loss(lin.vae.model, lin.vae.guide, x, y=y)  # MC KL: weights cancel
    exact = (log_py + lin.log_p_x_given_y(x).gather(0, y[None])).sum()
    assert float(labelled.detach()) == pytest.approx(-float(exact), rel=1e-5)


def test_label_conditioned_vae_log_likelihood_matches_the_mixture():
    """``log_likelihood`` on the VAE's own model and guide: with y unobserved (drawn from the uniform q(y|x):
    ``log_likelihood`` draws a guide site marked for enumeration, bit for bit as if the user had switched the
    enumeration off with ``poutine.infer_config``),
    log p̂(x) is within 0.06 nats (3 sd; seen 0.019) of the closed-form mixture log Σ_y p(y) p(x|y) at K = 5000 (its
    sd is at most sqrt((C-1)/K) = 0.02 here, since var(w)/E[w]² = C Σ_y p(y|x)² - 1 <= C - 1); with y observed it is
    log p(x, y) to float32 rounding (the exact q(z | x, y) makes every weight equal)."""
    import pyro.poutine as poutine

    from pyrovae.infer.importance import log_likelihood

    lin = _LabelledLinear()
    x, y = lin.sample(8)
    log_pxy = lin.log_p_x_given_y(x) - torch.log(torch.tensor(3.0))
    pyro.set_rng_seed(0)
    log_p = log_likelihood(lin.vae.model, lin.vae.guide, x, num_samples=5000)
    assert (log_p - torch.logsumexp(log_pxy, 0)).abs().max() < 0.06
    pyro.set_rng_seed(0)
    sampled_y = poutine.infer_config(lin.vae.guide, lambda site: {"enumerate": None})
    assert torch.equal(log_likelihood(lin.vae.model, sampled_y, x, num_samples=5000), log_p)
    model = lambda x, y: lin.vae.model(x, y=y)  # noqa: E731
    guide = lambda x, y: lin.vae.guide(x, y=y)  # noqa: E731
    log_p_joint = log_likelihood(model, guide, x, y, num_samples=10)
    assert torch.allclose(log_p_joint, log_pxy.gather(0, y[None])[0], atol=1e-4)
