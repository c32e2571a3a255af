"""The estimators: each trains, they agree where theory says they must, and the IWAE bound is per datapoint."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro.distributions import constraints
from pyro.infer import RenyiELBO, Trace_ELBO, TraceMeanField_ELBO

from pyrovae import ESTIMATORS, PyrovaeError, RenyiBound, evaluate_elbo, fit, make_elbo
from pyrovae.infer import MeanField, Trace


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_every_estimator_trains(name, tiny_vae, tiny_splits):
    # Untrained, the decoder already predicts the pixel means (logit bias), so the remaining gain is
    # what the latent code explains: 30 short epochs on 500 noisy images gain 7-8 nats for every
    # estimator; we ask >= 5. The validation ELBO's MC error here is < 0.5 nats (200 images, analytic KL).
    before = evaluate_elbo(tiny_vae.model, tiny_vae.guide, tiny_splits.val)
    result = fit(
        tiny_vae.model,
        tiny_vae.guide,
        tiny_splits.train,
        elbo=name,
        particles=3 if name in ("iwae", "renyi") else 1,
        alpha=0.5 if name == "renyi" else None,
        epochs=30,
        batch_size=50,
        lr=3e-3,
        val_data=tiny_splits.val,
        quiet=True,
        seed=1,
    )
    assert result.epochs_done == 30
    assert result.val_elbo > before + 5, (name, before, result.val_elbo)


def test_trace_and_meanfield_agree_in_expectation(tiny_vae, tiny_splits):
    # Same parameters, same batch: the MC-KL and analytic-KL losses have the same expectation.
    # 400 draws of each; tolerance 4 standard errors of the difference (a false alarm ~ 6e-5).
    x = tiny_splits.val.batch(torch.arange(50))
    draws = {}
    for name, elbo in (("trace", Trace_ELBO()), ("meanfield", TraceMeanField_ELBO())):
        with torch.no_grad():
            draws[name] = torch.tensor(
                [float(elbo.differentiable_loss(tiny_vae.model, tiny_vae.guide, x)) for _ in range(400)]
            )
    diff = draws["trace"].mean() - draws["meanfield"].mean()
    se = math.sqrt(draws["trace"].var() / 400 + draws["meanfield"].var() / 400)
    assert abs(diff) < 4 * se, (float(diff), se)
    assert draws["trace"].var() > draws["meanfield"].var()  # analytic KL removes the KL's MC noise


def test_iwae_bound_is_above_the_elbo(tiny_vae, tiny_splits):
    # E[IWAE_K] >= ELBO, strictly for a guide that is not the exact posterior. Averaged over 40
    # draws each, the MC error is far below the gap seen here (several nats per image).
    x = tiny_splits.val.batch(torch.arange(50))
    with torch.no_grad():
        elbo = torch.stack(
            [TraceMeanField_ELBO().differentiable_loss(tiny_vae.model, tiny_vae.guide, x) for _ in range(40)]
        )
        iwae = torch.stack(
            [RenyiBound(0.0, 20).differentiable_loss(tiny_vae.model, tiny_vae.guide, x) for _ in range(40)]
        )
    # losses are negative bounds
    assert -iwae.mean() > -elbo.mean() + 4 * (iwae.std() + elbo.std()) / math.sqrt(40)


def test_iwae_matches_pyro_renyi_without_subsampling(tiny_vae, tiny_splits):
    # With scale 1 (no minibatch) Pyro's RenyiELBO(alpha=0) is the same per-datapoint bound: same seed, same draws.
    x = tiny_splits.val.batch(torch.arange(30))
    pyro.set_rng_seed(3)
    ours = RenyiBound(0.0, 7).loss(tiny_vae.model, tiny_vae.guide, x)
    pyro.set_rng_seed(3)
    theirs = RenyiELBO(alpha=0.0, num_particles=7, vectorize_particles=True).loss(tiny_vae.model, tiny_vae.guide, x)
    assert ours == pytest.approx(theirs, rel=1e-5)


def test_iwae_scale_sits_outside_the_log_sum_exp(tiny_vae, tiny_splits):
    # With a minibatch of B out of N the bound is (N/B) * sum_i IWAE(x_i): the same draws, scaled.
    x = tiny_splits.val.batch(torch.arange(30))
    pyro.set_rng_seed(5)
    full = RenyiBound(0.0, 7).loss(tiny_vae.model, tiny_vae.guide, x)
    pyro.set_rng_seed(5)
    scaled = RenyiBound(0.0, 7).loss(tiny_vae.model, tiny_vae.guide, x, num_data=300)
    assert scaled == pytest.approx(10 * full, rel=1e-5)


def test_minibatch_losses_average_to_the_full_data_loss(tiny_vae, tiny_splits):
    # Partition 200 points into 4 minibatches of 50 with num_data=200: the mean of the 4 scaled losses
    # estimates the full-data loss. 500 vectorised particles make each estimate's MC error small;
    # tolerance 4 standard errors, the SE from 20 repeats of the full-data loss.
    x = tiny_splits.val.all()
    elbo = TraceMeanField_ELBO(num_particles=500, vectorize_particles=True)
    with torch.no_grad():
        full = torch.stack([elbo.differentiable_loss(tiny_vae.model, tiny_vae.guide, x) for _ in range(20)])
        mini = torch.stack(
            [
                elbo.differentiable_loss(tiny_vae.model, tiny_vae.guide, x[i : i + 50], num_data=200)
                for i in range(0, 200, 50)
            ]
        ).mean()
    se = full.std() * math.sqrt(1 + 1 / 20)
    assert abs(mini - full.mean()) < 4 * se + 1e-3 * abs(full.mean()), (float(mini), float(full.mean()), float(se))
    assert abs(mini) > 100 * 50  # sanity: the scale is the full dataset's, not the minibatch's


def test_registry_accepts_classes_instances_and_refuses_unknown_names():
    elbo = TraceMeanField_ELBO()
    assert make_elbo(elbo) is elbo
    assert isinstance(make_elbo(Trace_ELBO, particles=3), Trace_ELBO)
    assert make_elbo("iwae").num_particles == 5
    with pytest.raises(PyrovaeError, match="unknown ELBO 'nope'; choose one of trace"):
        make_elbo("nope")
    with pytest.raises(PyrovaeError, match="needs --alpha"):
        make_elbo("renyi")


def test_iwae_refuses_sites_outside_the_data_plate(tiny_splits):
    def model(x, num_data=None):
        mu = pyro.sample("mu", pyro.distributions.Normal(0.0, 1.0))  # a global latent
        with pyro.plate("data", len(x)):
            pyro.sample("x", pyro.distributions.Normal(mu, 1.0), obs=x)

    def guide(x, num_data=None):
        loc = pyro.param("loc", torch.tensor(0.0))
        pyro.sample("mu", pyro.distributions.Normal(loc, 1.0))

    with pytest.raises(PyrovaeError, match="every sample site inside the data plate"):
        RenyiBound(0.0, 3).loss(model, guide, torch.randn(10))


@pytest.mark.parametrize(
    "ours, pyros", [(Trace, Trace_ELBO), (MeanField, TraceMeanField_ELBO)], ids=["trace", "meanfield"]
)
@pytest.mark.parametrize("vectorize", [True, False], ids=["vectorized", "loop"])
def test_on_device_estimators_equal_pyros_and_never_sync(ours, pyros, vectorize, tiny_vae, tiny_splits, monkeypatch):
    # Same seed, same draws: the same loss and the same gradients as Pyro's estimator (float32 rounding),
    # both on the validated path (Pyro's traces) and on the lean hot-loop path (validation off).
    x = tiny_splits.val.batch(torch.arange(40))
    results = []
    for cls, validate in ((pyros, True), (ours, True), (ours, False)):
        tiny_vae.zero_grad()
        pyro.set_rng_seed(9)
        with pyro.validation_enabled(validate):
            loss = cls(num_particles=3, vectorize_particles=vectorize).differentiable_loss(
                tiny_vae.model, tiny_vae.guide, x, num_data=400
            )
        loss.backward()
        results.append((float(loss.detach()), [p.grad.clone() for p in tiny_vae.parameters()]))
    for loss, grads in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-6)
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(grads, results[0][1]))

    # and no host round trip: .item() / bool() of a tensor would be a CUDA sync
    def refuse(*_):
        raise AssertionError("host sync inside the loss")

    monkeypatch.setattr(torch.Tensor, "item", refuse)
    monkeypatch.setattr(torch.Tensor, "__bool__", refuse)
    with pyro.validation_enabled(False):
        ours(num_particles=2, vectorize_particles=True).differentiable_loss(tiny_vae.model, tiny_vae.guide, x)


@pytest.mark.parametrize("ours, pyros", [(Trace, Trace_ELBO), (MeanField, TraceMeanField_ELBO)], ids=["trace", "mf"])
def test_lean_path_keeps_score_function_terms(ours, pyros):
    # A discrete latent inside a subsampled plate: the lean path must fall back to Pyro's full bookkeeping
    # (log p/q of every site for Trace's score-function surrogate; the analytic Bernoulli KL for
    # MeanField); same loss and gradients as Pyro's.
    data = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 1.0])

    def model(x):
        with pyro.plate("data", 12, subsample=torch.arange(len(x))):
            c = pyro.sample("c", pyro.distributions.Bernoulli(0.4))
            pyro.sample("x", pyro.distributions.Normal(c * 2.0 - 1.0, 1.0), obs=x)

    def guide(x):
        p = pyro.param("p", torch.full((len(x),), 0.3), constraint=constraints.unit_interval)
        with pyro.plate("data", 12, subsample=torch.arange(len(x))):
            pyro.sample("c", pyro.distributions.Bernoulli(p))

    results = []
    for cls in (pyros, ours):
        pyro.clear_param_store()
        pyro.set_rng_seed(3)
        with pyro.validation_enabled(False):  # Pyro's mean-field check refuses a discrete site
            loss = cls(num_particles=4, vectorize_particles=True).differentiable_loss(model, guide, data)
        (grad,) = torch.autograd.grad(loss, [pyro.param("p").unconstrained()])
        results.append((float(loss.detach()), grad))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-5, atol=1e-7)
    assert results[0][1].abs().sum() > 0  # the score-function gradient is really there
