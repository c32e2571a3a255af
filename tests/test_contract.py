"""The contract: a Pyro program written as Pyro's tutorials write them trains, scores and evaluates unchanged.

The tutorial-style VAE below takes ``x`` only (no ``num_data``), opens a plain ``pyro.plate("data", N)``,
registers its networks with ``pyro.module`` and decodes to Bernoulli probabilities. pyrovae supplies the
minibatch scale (:class:`pyrovae.infer.handlers.DataScale`), which must equal what Pyro's own subsampled plate does.
"""

from __future__ import annotations

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from pyro.infer import SVI, Trace_ELBO
from torch import nn

from pyrovae import PyrovaeError, TensorData, evaluate_points, fit, log_likelihood
from pyrovae.infer import RenyiBound
from pyrovae.infer.handlers import DataScale
from pyrovae.infer.importance import importance_draws

D, Z, H = 12, 2, 16


class TutorialVAE(nn.Module):
    """A VAE as a reader of Pyro's tutorial would write it: nothing in it knows about pyrovae."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder_body = nn.Sequential(nn.Linear(D, H), nn.Softplus())
        self.encoder_loc, self.encoder_log_scale = nn.Linear(H, Z), nn.Linear(H, Z)
        self.decoder = nn.Sequential(nn.Linear(Z, H), nn.Softplus(), nn.Linear(H, D), nn.Sigmoid())

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], Z), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(self.decoder(z)).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder_body", self.encoder_body)
        pyro.module("encoder_loc", self.encoder_loc)
        pyro.module("encoder_log_scale", self.encoder_log_scale)
        with pyro.plate("data", x.shape[0]):
            h = self.encoder_body(x)
            pyro.sample("z", dist.Normal(self.encoder_loc(h), self.encoder_log_scale(h).exp()).to_event(1))


def binary_data(n: int, seed: int = 0) -> torch.Tensor:
    """Two prototypes with 10% of the bits flipped: a little structure for a 2-d latent to find."""
    g = torch.Generator().manual_seed(seed)
    protos = (torch.rand(2, D, generator=g) < 0.5).float()
    x = protos[torch.randint(0, 2, (n,), generator=g)]
    flip = (torch.rand(n, D, generator=g) < 0.1).float()
    return (x + flip) % 2


@pytest.fixture(autouse=True)
def fresh_param_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def test_tutorial_vae_trains_and_evaluates_unchanged():
    torch.manual_seed(0)
    x = binary_data(200)
    vae = TutorialVAE()
    result = fit(vae.model, vae.guide, x[:160], epochs=8, batch_size=40, lr=1e-2, val_data=x[160:], seed=0, quiet=True)
    assert result.history[-1]["val_elbo"] > result.history[0]["val_elbo"]
    pyro.set_rng_seed(1)
    log_p = log_likelihood(vae.model, vae.guide, x[160:], num_samples=200)
    res = evaluate_points(vae.model, vae.guide, x[160:], num_samples=200)
    assert log_p.shape == (40,) and torch.isfinite(log_p).all()
    # log p̂_K >= ELBO on average (Burda et al.); both from 200 particles, so up to MC noise of ~0.1 nats
    assert res.log_likelihood.mean() > res.elbo.mean() - 0.1
    # the ELBO's MC KL against the parts' analytic KL: equal in expectation; the mean over 40 points of a
    # 200-draw difference has sd ~0.02 nats here, tolerance 0.1
    assert abs(float((res.elbo - res.reconstruction + res.kl).mean())) < 0.1
    assert res.khat.shape == (40,) and res.z_mean.shape == (40, Z)


# ------------------------------------------------------------------------------------ DataScale vs Pyro
def _local_global_model(x, subsample_of: int | None = None):
    """A global mean mu outside the plate, a local z_i inside; optionally Pyro's own subsampled plate."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    plate = (
        pyro.plate("data", subsample_of, subsample=torch.arange(len(x))) if subsample_of else pyro.plate("data", len(x))
    )
    with plate:
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        pyro.sample("x", dist.Normal(z, 0.5), obs=x)


def _local_global_guide(x, subsample_of: int | None = None):
    pyro.sample("mu", dist.Normal(pyro.param("mu_loc", torch.tensor(0.3)), 0.7))
    plate = (
        pyro.plate("data", subsample_of, subsample=torch.arange(len(x))) if subsample_of else pyro.plate("data", len(x))
    )
    with plate:
        pyro.sample("z", dist.Normal(0.8 * x, 0.6))


def test_datascale_equals_pyros_subsampled_plate():
    # A batch of 10 out of N = 250: the data plate's sites count 25 times, mu once. Same seed, same draws:
    # the losses agree to float32 rounding (relative 1e-6), for the ELBO and for the per-datapoint IWAE bound
    # (which divides the scale back out per datapoint: it must see DataScale's full size).
    x = torch.linspace(-1, 1, 10)
    pyro.set_rng_seed(0)
    pyro_loss = Trace_ELBO().loss(_local_global_model, _local_global_guide, x, 250)
    pyro.set_rng_seed(0)
    with DataScale(250):
        ours = Trace_ELBO().loss(_local_global_model, _local_global_guide, x)
    assert math.isclose(ours, pyro_loss, rel_tol=1e-6)
    pyro.set_rng_seed(0)
    unscaled = Trace_ELBO().loss(_local_global_model, _local_global_guide, x)
    assert not math.isclose(unscaled, pyro_loss, rel_tol=1e-2)  # the scale matters here

    def local_model(x, n=None):
        with pyro.plate("data", n or len(x), subsample=torch.arange(len(x)) if n else None):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=x)

    def local_guide(x, n=None):
        with pyro.plate("data", n or len(x), subsample=torch.arange(len(x)) if n else None):
            pyro.sample("z", dist.Normal(0.8 * x, 0.6))

    pyro.set_rng_seed(1)
    pyro_iwae = RenyiBound(0.0, 5).loss(local_model, local_guide, x, 250)
    pyro.set_rng_seed(1)
    with DataScale(250):
        our_iwae = RenyiBound(0.0, 5).loss(local_model, local_guide, x)
    assert math.isclose(our_iwae, pyro_iwae, rel_tol=1e-6)
    # a plate Pyro already subsamples is left alone (no double scale)
    pyro.set_rng_seed(0)
    with DataScale(250):
        twice = Trace_ELBO().loss(_local_global_model, _local_global_guide, x, 250)
    assert math.isclose(twice, pyro_loss, rel_tol=1e-6)


# ----------------------------------------------------------------------------------- parity with SVI
def test_fit_matches_pyro_svi_step_for_step():
    # 15 full-batch steps of pyro.infer.SVI with pyro.optim.Adam against fit with the same seed, the same
    # user's Trace_ELBO instance and lr. fit draws a permutation of the data each epoch before its step, so
    # the SVI loop does too. Adam is elementwise: one torch Adam over all parameters is Pyro's per-parameter
    # Adam. Tolerance 1e-5: float32 rounding (foreach vs per-tensor kernels) over 15 steps of size ~1e-2.
    x = binary_data(32)
    torch.manual_seed(0)
    ours, theirs = TutorialVAE(), TutorialVAE()
    theirs.load_state_dict(ours.state_dict())

    pyro.set_rng_seed(5)
    svi = SVI(theirs.model, theirs.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    for _ in range(15):
        perm = torch.randperm(len(x))
        svi.step(x[perm])

    pyro.clear_param_store()
    result = fit(ours.model, ours.guide, x, elbo=Trace_ELBO(), epochs=15, batch_size=32, lr=1e-2, seed=5, quiet=True)
    assert result.epochs_done == 15
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.allclose(p, q, atol=1e-5), name
    assert not torch.allclose(ours.decoder[0].weight, TutorialVAE().decoder[0].weight)  # it did train


def test_a_users_trace_elbo_instance_trains_the_tutorial_program():
    x = binary_data(120)
    torch.manual_seed(0)
    vae = TutorialVAE()
    result = fit(vae.model, vae.guide, x, elbo=Trace_ELBO(num_particles=2), epochs=6, batch_size=30, lr=1e-2, seed=0)
    # 6 epochs from a random start: the ELBO rises by several nats (MC noise per epoch < 0.5 here)
    assert result.history[-1]["train_elbo"] > result.history[0]["train_elbo"] + 1.0


# ------------------------------------------------------------------------- exact non-amortised guide
class LinearGaussian:
    """z ~ N(0, I_Z), x = W z + b + σ ε: log p(x) = log N(x; b, W Wᵀ + σ² I) exactly."""

    def __init__(self, seed: int = 0, sigma: float = 0.5, flatten: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        self.W, self.b, self.sigma, self.flatten = (
            torch.randn(5, Z, generator=g),
            torch.randn(5, generator=g),
            sigma,
            flatten,
        )

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], Z), 1.0).to_event(1))
            if self.flatten:  # as a net written for (batch, features) inputs does: breaks a particle dim
                z = z.reshape(-1, Z)
            pyro.sample("x", dist.Normal(z @ self.W.T + self.b, self.sigma).to_event(1), obs=x)

    def model_ids(self, x, ids):
        """The same model for data given with ids (which it ignores)."""
        self.model(x)

    def exact_log_p(self, x):
        cov = self.W @ self.W.T + self.sigma**2 * torch.eye(5)
        return torch.distributions.MultivariateNormal(self.b, cov).log_prob(x)

    def sample(self, n: int, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(n, Z, generator=g) @ self.W.T + self.b + self.sigma * torch.randn(n, 5, generator=g)


def local_guide(n: int, loc: torch.Tensor | None = None, scale: torch.Tensor | None = None):
    """One Normal per datapoint, closed over: the guide cannot run on fewer datapoints than it was built for."""

    def guide(x):
        q_loc = pyro.param("loc", torch.zeros(n, Z) if loc is None else loc)
        q_scale = pyro.param("scale", torch.ones(n, Z) if scale is None else scale, constraint=constraints.positive)
        with pyro.plate("data", n):
            pyro.sample("z", dist.Normal(q_loc, q_scale).to_event(1))

    return guide


def indexed_guide(n: int):
    """One Normal per datapoint, looked up by the datapoints' ids: trains on minibatches of (x, ids)."""

    def guide(x, ids):
        loc = pyro.param("loc", torch.zeros(n, Z))
        scale = pyro.param("scale", torch.ones(n, Z), constraint=constraints.positive)
        with pyro.plate("data", len(ids)):
            pyro.sample("z", dist.Normal(loc[ids], scale[ids]).to_event(1))

    return guide


def _se(log_w: torch.Tensor) -> torch.Tensor:
    """Delta-method standard error of log-mean-exp of each row: sd(w) / (mean(w) sqrt K)."""
    w = (log_w.double() - log_w.double().amax(1, keepdim=True)).exp()
    return w.std(1) / (w.mean(1) * math.sqrt(log_w.shape[1]))


def test_non_amortised_guide_matches_exact_log_p():
    # The guide holds one (loc, scale) per datapoint: the exact posterior mean moved by 0.1 and the marginal
    # sd times 1.3 (wider than the posterior: bounded weights). log_likelihood runs the program on the data
    # it was given: a batch size of 3 is asked for, but the guide cannot run on 3 of 8 points, so it does not.
    # Tolerance: 4 standard errors from the weights themselves + 2e-3 nats of float32 rounding.
    lg = LinearGaussian()
    x = lg.sample(8)
    S = torch.linalg.inv(torch.eye(Z) + lg.W.T @ lg.W / lg.sigma**2)  # the posterior covariance
    mean = (x - lg.b) @ lg.W @ S / lg.sigma**2
    guide = local_guide(8, mean + 0.1, 1.3 * S.diagonal().sqrt().expand(8, Z))
    pyro.set_rng_seed(2)
    est, log_w = log_likelihood(lg.model, guide, x, num_samples=4000, batch_size=3, return_log_weights=True)
    assert est.shape == (8,) and log_w.shape == (8, 4000)
    assert ((est - lg.exact_log_p(x)).abs() < 4 * _se(log_w).float() + 2e-3).all()


def test_non_amortised_guide_trains_by_fit_on_minibatches():
    # With the datapoints' ids as a second tensor, fit trains one Normal per datapoint on minibatches of 4
    # (DataScale scales the plate by 8/4). The model's posterior is Gaussian and the guide mean-field, so the
    # trained guide is close but not exact: log p̂ at K = 2000 within 0.05 nats of the exact value (its MC
    # error here is < 0.01), and the ELBO below log p by the mean-field gap (> 0).
    lg = LinearGaussian()
    x = lg.sample(8)
    ids = torch.arange(8)
    guide = indexed_guide(8)
    fit(lg.model_ids, guide, TensorData(x, ids), epochs=300, batch_size=4, lr=5e-2, seed=0, quiet=True)
    pyro.set_rng_seed(2)
    res = evaluate_points(lg.model_ids, guide, x, ids, num_samples=2000)
    exact = lg.exact_log_p(x)
    assert ((res.log_likelihood - exact).abs() < 0.05).all(), (res.log_likelihood, exact)
    assert (res.elbo < exact).all()


def test_a_net_that_flattens_falls_back_to_one_particle_per_call():
    # The same exact model with a reshape(-1, Z) inside: a particle dim breaks it, so the sweep warns and
    # runs one particle per call; the estimate still matches the exact log p(x) (tolerance as above).
    lg = LinearGaussian(flatten=True)
    x = lg.sample(4)
    S = torch.linalg.inv(torch.eye(Z) + lg.W.T @ lg.W / lg.sigma**2)
    guide = local_guide(4, (x - lg.b) @ lg.W @ S / lg.sigma**2, 1.3 * S.diagonal().sqrt().expand(4, Z))
    pyro.set_rng_seed(3)
    with pytest.warns(UserWarning, match="one particle per call"):
        est, log_w = log_likelihood(lg.model, guide, x, num_samples=300, return_log_weights=True)
    assert ((est - lg.exact_log_p(x)).abs() < 4 * _se(log_w).float() + 2e-3).all()


def test_enumerated_discrete_latent_is_summed_exactly():
    # A two-component mixture with the component enumerated and no continuous latent: the guide is empty,
    # so one "particle" is the exact log p(x) = log Σ_c π_c N(x; μ_c, 1) (tolerance: float32 rounding).
    pi, mu = torch.tensor([0.3, 0.7]), torch.tensor([-2.0, 1.5])

    @pyro.infer.config_enumerate
    def model(x):
        with pyro.plate("data", len(x)):
            c = pyro.sample("c", dist.Categorical(pi))
            pyro.sample("x", dist.Normal(mu[c], 1.0), obs=x)

    x = torch.linspace(-3, 3, 7)
    exact = torch.logsumexp(pi.log() + dist.Normal(mu, 1.0).log_prob(x[:, None]), dim=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the enumerated program vectorises: no fallback warning
        est = log_likelihood(model, lambda x: None, x, num_samples=3)
    assert torch.allclose(est, exact, atol=1e-5)


def test_a_global_latent_gets_a_one_line_error():
    x = torch.randn(6)
    with pytest.raises(PyrovaeError, match="not defined") as err:
        log_likelihood(_local_global_model, _local_global_guide, x, num_samples=5)
    assert "\n" not in str(err.value) and "'mu'" in str(err.value)
    with pytest.raises(PyrovaeError, match="no plate named"):
        fit(_local_global_model, _local_global_guide, x, epochs=1, batch_size=3, data_plate="points", quiet=True)


def test_importance_draws_are_the_draws_behind_the_weights():
    # importance_draws returns the guide's z beside the log-weights of the same sweep (here in particle chunks
    # of 16): recomputing log p(x, z) - log q(z) from the draws gives the weights to float32 rounding, and the
    # self-normalised posterior mean is the exact one within 5 Monte Carlo standard errors of a 2000-draw SNIS.
    lg = LinearGaussian()
    x = lg.sample(4)
    S = torch.linalg.inv(torch.eye(Z) + lg.W.T @ lg.W / lg.sigma**2)
    mean = (x - lg.b) @ lg.W @ S / lg.sigma**2
    sd = 1.3 * S.diagonal().sqrt().expand(4, Z)
    guide = local_guide(4, mean + 0.1, sd)
    pyro.set_rng_seed(6)
    log_w, draws = importance_draws(lg.model, guide, x, sites=("z",), num_samples=2000, chunk_size=16)
    z = draws["z"]
    assert log_w.shape == (4, 2000) and z.shape == (4, 2000, Z)
    x_given_z = dist.Normal(z @ lg.W.T + lg.b, lg.sigma).to_event(1).log_prob(x[:, None])
    by_hand = (
        x_given_z
        + dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
        - dist.Normal(mean[:, None] + 0.1, sd[:, None]).log_prob(z).sum(-1)
    )
    assert torch.allclose(log_w, by_hand, atol=1e-3)
    w = torch.softmax(log_w, dim=1)
    snis = (w[..., None] * z).sum(1)
    se = ((w[..., None] ** 2) * (z - snis[:, None]) ** 2).sum(1).sqrt()  # delta-method sd of the SNIS mean
    assert ((snis - mean).abs() < 5 * se + 1e-3).all(), (snis, mean, se)
