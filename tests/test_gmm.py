"""The GMM baseline: a Pyro model trained by ``fit``, checked against known mixtures, scipy and sklearn.

Statistical tolerances are a few standard errors of the quantity at the sample sizes used, stated
per test; exact computations (log-likelihoods, losses) are compared to float32 round-off.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO
from scipy.optimize import linear_sum_assignment
from scipy.special import logsumexp
from scipy.stats import multivariate_normal
from sklearn.mixture import GaussianMixture

from pyrovae import ImageData, Pixels, PyrovaeError, fit, synthetic
from pyrovae.models.gmm import GMM, kmeans_pp

MEANS = np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
WEIGHTS = np.array([0.5, 0.3, 0.2])
COVS = np.array([[[1.0, 0.5], [0.5, 1.0]], [[0.5, 0.0], [0.0, 0.5]], [[0.8, -0.3], [-0.3, 0.6]]])


def _three_gaussians(n: int = 3000, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    k = rng.choice(3, n, p=WEIGHTS)
    chol = np.linalg.cholesky(COVS)
    x = MEANS[k] + np.einsum("nij,nj->ni", chol[k], rng.normal(size=(n, 2)))
    return torch.from_numpy(x).float()


def _match(true: np.ndarray, fitted: np.ndarray) -> np.ndarray:
    """Index of the fitted component matched to each true one (Hungarian on squared distances)."""
    cost = ((true[:, None] - fitted[None]) ** 2).sum(-1)
    rows, cols = linear_sum_assignment(cost)
    return cols[np.argsort(rows)]


def _scipy_log_prob(gmm: GMM, x: torch.Tensor) -> np.ndarray:
    w = gmm.weights.detach().double().numpy()
    mu = gmm.means.detach().double().numpy()
    cov = gmm.covariances.detach().double().numpy()
    if cov.ndim == 2:
        cov = np.stack([np.diag(c) for c in cov])
    comps = np.stack([multivariate_normal(mu[c], cov[c]).logpdf(x.double().numpy()) for c in range(gmm.k)], 1)
    return logsumexp(comps + np.log(w), axis=1)


def _fit(gmm: GMM, x: torch.Tensor, epochs: int = 20, lr: float = 0.03) -> None:
    fit(
        gmm.model,
        gmm.guide,
        x,
        elbo=gmm.elbo(),
        epochs=epochs,
        batch_size=500,
        lr=lr,
        lr_schedule="cosine",
        quiet=True,
        seed=0,
    )


def test_recovers_a_known_mixture_and_log_prob_matches_scipy():
    """3 full-covariance Gaussians in 2-D, 3000 points: means within 0.15 (standard error of a mean is
    at most sqrt(1/600) = 0.04 per coordinate), weights within 0.03 (SE <= 0.009); the exact
    log-likelihood equals scipy's with the same parameters to 1e-4 relative (float32 vs float64)."""
    x = _three_gaussians()
    gmm = GMM(3, 2, covariance="full").initialize(x, generator=torch.Generator().manual_seed(0))
    _fit(gmm, x)
    order = _match(MEANS, gmm.means.detach().numpy())
    np.testing.assert_allclose(gmm.means.detach().numpy()[order], MEANS, atol=0.15)
    np.testing.assert_allclose(gmm.weights.detach().numpy()[order], WEIGHTS, atol=0.03)
    np.testing.assert_allclose(gmm.covariances.detach().numpy()[order], COVS, atol=0.15)
    np.testing.assert_allclose(gmm.log_prob(x).numpy(), _scipy_log_prob(gmm, x), rtol=1e-4)
    resp = gmm.responsibilities(x)
    torch.testing.assert_close(resp.sum(1), torch.ones(len(x)))
    assert torch.equal(gmm.assign(x), resp.argmax(1))
    truth = np.random.default_rng(0).choice(3, len(x), p=WEIGHTS)  # the same draws as the data's labels
    assert (order[truth] == gmm.assign(x).numpy()).mean() > 0.95  # overlap of the true components: ~2% errors
    # Samples reproduce the mixture mean: SE of each coordinate's mean over 20000 draws is ~0.02.
    samples = gmm.sample(20000, generator=torch.Generator().manual_seed(1))
    np.testing.assert_allclose(samples.mean(0).numpy(), WEIGHTS @ MEANS, atol=0.08)


def test_diag_log_prob_matches_scipy():
    """Diagonal covariances: the exact log-likelihood equals scipy's (1e-4 relative)."""
    x = _three_gaussians(500)
    gmm = GMM(3, 2, covariance="diag").initialize(x, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(gmm.log_prob(x).numpy(), _scipy_log_prob(gmm, x), rtol=1e-4)


@pytest.mark.parametrize(
    "options", [{"covariance": "diag"}, {"covariance": "full"}, {"family": "bernoulli"}], ids=["diag", "full", "bern"]
)
def test_enumerated_and_marginal_losses_agree(options):
    """TraceEnum_ELBO on the enumerated model and Trace_ELBO on MixtureSameFamily give one loss, equal to
    -(N/B) sum log p(x_i), and one gradient, for the same parameters (1e-5 relative: float32)."""
    x = _three_gaussians(400)
    if options.get("family") == "bernoulli":
        x = (x > 1.0).float()
    marginal = GMM(3, 2, **options).initialize(x, generator=torch.Generator().manual_seed(0))
    enumerated = GMM(3, 2, assignment="enumerate", **options)
    enumerated.load_state_dict(marginal.state_dict())
    batch, n = x[:100], 400
    loss_m = Trace_ELBO().differentiable_loss(marginal.model, marginal.guide, batch, num_data=n)
    loss_e = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(
        enumerated.model, enumerated.guide, batch, num_data=n
    )
    torch.testing.assert_close(loss_e, loss_m, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(loss_m.detach(), -marginal.log_prob(batch).sum() * n / len(batch), rtol=1e-5, atol=0.0)
    grads_m = torch.autograd.grad(loss_m, list(marginal.parameters()))
    grads_e = torch.autograd.grad(loss_e, list(enumerated.parameters()))
    for gm, ge in zip(grads_m, grads_e):
        torch.testing.assert_close(ge, gm, rtol=1e-4, atol=1e-4)


def _sklearn_data(n: int = 3000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """4 correlated Gaussians in 5-D plus a constant column (which only the variance floor keeps finite)."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(0, 3, (4, 5))
    mix = rng.normal(0, 0.6, (4, 5, 5))
    labels = rng.choice(4, 2 * n, p=[0.4, 0.3, 0.2, 0.1])
    x = mu[labels] + np.einsum("nij,nj->ni", mix[labels], rng.normal(size=(2 * n, 5)))
    x = np.concatenate([x, np.full((2 * n, 1), 0.5)], 1)
    return x[:n], x[n:]


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_held_out_likelihood_matches_sklearn(covariance):
    """Same data, K, covariance type and reg_covar: the held-out mean log-likelihood is within 0.05 nats
    of sklearn's EM (both are maxima of the same likelihood; a different local optimum would differ by
    far more; measured gap ~1e-3)."""
    train, test = _sklearn_data()
    reference = GaussianMixture(4, covariance_type=covariance, reg_covar=1e-6, tol=1e-6, max_iter=500, random_state=0)
    reference.fit(train)
    gmm = GMM(4, 6, covariance=covariance, reg_covar=1e-6)
    gmm.initialize(torch.from_numpy(train).float(), generator=torch.Generator().manual_seed(0))
    _fit(gmm, torch.from_numpy(train).float(), epochs=30, lr=0.05)
    ours = gmm.log_prob(torch.from_numpy(test).float()).mean().item()
    assert abs(ours - reference.score(test)) < 0.05, (ours, reference.score(test))


def test_bernoulli_mixture_recovers_and_log_prob_is_exact():
    """3 Bernoulli components over 20 binary pixels, 4000 points: probabilities within 0.06 (SE <=
    sqrt(0.25/800) = 0.018), weights within 0.03 (SE <= 0.008); log_prob equals a direct numpy
    log-sum-exp to 1e-5 relative."""
    rng = np.random.default_rng(1)
    probs = np.where(rng.random((3, 20)) < 0.5, 0.15, 0.85)
    weights = np.array([0.5, 0.3, 0.2])
    k = rng.choice(3, 4000, p=weights)
    x = torch.from_numpy((rng.random((4000, 20)) < probs[k]).astype(np.float32))
    gmm = GMM(3, 20, family="bernoulli").initialize(x, generator=torch.Generator().manual_seed(0))
    _fit(gmm, x, epochs=20, lr=0.05)
    order = _match(probs, gmm.means.detach().numpy())
    np.testing.assert_allclose(gmm.means.detach().numpy()[order], probs, atol=0.06)
    np.testing.assert_allclose(gmm.weights.detach().numpy()[order], weights, atol=0.03)
    p = gmm.means.detach().double().numpy()
    xn = x.double().numpy()
    direct = logsumexp(
        xn @ np.log(p).T + (1 - xn) @ np.log1p(-p).T + np.log(gmm.weights.detach().double().numpy()), axis=1
    )
    np.testing.assert_allclose(gmm.log_prob(x).numpy(), direct, rtol=1e-5)
    assert set(gmm.sample(50).unique().tolist()) <= {0.0, 1.0}


def test_kmeans_pp_recovers_separated_clusters():
    """5 clusters 20 sigma apart in 10-D: every cluster gets its own label, centres are the clusters' means and within 0.35 of the truth (SE of a
    coordinate mean over 200 points is 0.07; the largest of 50 errors must pass: 0.35), and the same generator seed gives the same result."""
    rng = np.random.default_rng(2)
    centres = rng.normal(0, 20, (5, 10))
    labels = np.repeat(np.arange(5), 200)
    x = torch.from_numpy(centres[labels] + rng.normal(size=(1000, 10))).float()
    result = kmeans_pp(x, 5, restarts=3, iters=50, generator=torch.Generator().manual_seed(0))
    found = result.labels.numpy()
    for c in range(5):
        assert len(np.unique(found[labels == c])) == 1
    assert len(np.unique(found)) == 5
    order = _match(centres, result.centers.numpy())
    cluster_means = np.stack([x.numpy()[labels == c].mean(0) for c in range(5)])
    np.testing.assert_allclose(result.centers.numpy()[order], cluster_means, atol=1e-4)  # Lloyd's fixed point
    np.testing.assert_allclose(result.centers.numpy()[order], centres, atol=0.35)  # 5 SE of 0.07
    assert result.inertia == pytest.approx(1000 * 10, rel=0.1)  # sum of squared unit-variance noise
    again = kmeans_pp(x, 5, restarts=3, iters=50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.labels, result.labels)


def test_images_are_flattened_and_fit_runs_on_image_data():
    """(N, C, H, W) image batches train through ``fit`` on an ImageData split; samples come back as images."""
    raw = synthetic(n_train=300, n_test=10, shape=(1, 6, 6), seed=0)
    data = ImageData(raw.train_x, None, Pixels(dequantize=True), fixed_seed=0)
    gmm = GMM(4, (1, 6, 6), covariance="full").initialize(data.all(), generator=torch.Generator().manual_seed(0))
    result = fit(gmm.model, gmm.guide, data, epochs=2, batch_size=100, lr=0.01, quiet=True)
    assert result.history[-1]["train_elbo"] == pytest.approx(gmm.log_prob(data.all()).mean().item(), abs=1.0)
    assert gmm.sample(3).shape == (3, 1, 6, 6)
    assert gmm.log_prob(data.all()).shape == (300,)


@pytest.mark.parametrize(
    "args",
    [
        {"k": 0, "dim": 2},
        {"k": 3, "dim": 2, "covariance": "spherical"},
        {"k": 3, "dim": 2, "family": "poisson"},
        {"k": 3, "dim": 2, "assignment": "sample"},
        {"k": 3, "dim": 2, "reg_covar": -1.0},
    ],
)
def test_bad_input_is_a_pyrovae_error(args):
    with pytest.raises(PyrovaeError):
        GMM(**args)


def test_wrong_dimension_and_too_few_points_are_pyrovae_errors():
    with pytest.raises(PyrovaeError, match="D=3"):
        GMM(2, 3).log_prob(torch.zeros(4, 2))
    with pytest.raises(PyrovaeError, match="at least k"):
        kmeans_pp(torch.zeros(2, 3), 5)


@pytest.mark.parametrize("family", ["gaussian", "bernoulli"])
def test_factorised_mixture_equals_mixture_same_family(family):
    # The matrix-product form must give MixtureSameFamily's log-likelihood and gradients. Tolerance:
    # float32 rounding of a sum over 784 pixels (MixtureSameFamily's own error is ~1e-3 nats here).
    torch.manual_seed(0)
    x = torch.rand(64, 784) if family == "gaussian" else torch.bernoulli(torch.rand(64, 784))
    gmm = GMM(7, 784, family=family)
    gmm.initialize(x)
    fast, ref = gmm.mixture(), gmm.mixture_same_family()
    assert torch.allclose(fast.log_prob(x), ref.log_prob(x), rtol=1e-5, atol=2e-3)
    grads = []
    for d in (fast, ref):
        gmm.zero_grad()
        (gmm.mixture() if d is fast else gmm.mixture_same_family()).log_prob(x).sum().backward()
        grads.append([p.grad.clone() for p in gmm.parameters() if p.grad is not None])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-3)
    assert fast.expand([5]).batch_shape == (5,) and fast.expand([5]).log_prob(x[:5]).shape == (5,)
