"""The zoo's models: each trains a few steps by ``fit``, scores finitely with ``log_likelihood`` above its ELBO,
and passes one check of its own maths."""

from __future__ import annotations

import functools
import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch.nn.functional import one_hot

from pyrovae import Fitted, Pixels, compare, fit, log_likelihood, make_splits, synthetic
from pyrovae.data import Call
from pyrovae.errors import PyrovaeError
from pyrovae.models.beta import BetaVAE
from pyrovae.models.vae import VAE
from pyrovae.models.zoo import ENTRIES, ZooData, training_pair, zoo_names
from pyrovae.tasks.gap import inference_gaps


@pytest.fixture(scope="module")
def splits():
    return make_splits(synthetic(n_train=260, n_test=40, shape=(1, 12, 12), seed=0), Pixels("dynamic"), val_size=60)


@pytest.fixture(scope="module")
def zoo_data(splits):
    return ZooData(splits.train.shape, splits.train_pixel_mean, splits.train.all()[:120], classes=10)


class Labelled:
    """Training images with their labels as the keyword ``y`` (what a conditional program takes)."""

    def __init__(self, images) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, idx):
        return Call((self.images.batch(idx),), {"y": self.images.labels[idx]})


@pytest.mark.parametrize("name", list(ENTRIES))
def test_trains_and_scores_above_its_elbo(name, splits, zoo_data):
    entry = ENTRIES[name]
    module = entry.build(zoo_data)
    before = {k: v.detach().clone() for k, v in module.named_parameters()}
    model, guide = training_pair(module)
    data = Labelled(splits.train) if entry.conditional else splits.train
    result = fit(model, guide, data, elbo=entry.elbo(module), particles=entry.particles, epochs=1, batch_size=50,
                 lr=entry.lr, quiet=True, seed=0)  # fmt: skip
    assert math.isfinite(result.history[-1]["train_elbo"])
    assert any(not torch.equal(before[k], v) for k, v in module.named_parameters()), "no parameter moved"
    x = splits.test.batch(torch.arange(20))
    kwargs = {"y": splits.test.labels[:20]} if entry.conditional else {}
    log_p = log_likelihood(module.model, module.guide, x, num_samples=300, **kwargs)
    estimator = entry.elbo(module)
    elbo_fn = Trace_ELBO(num_particles=50, vectorize_particles=True, max_plate_nesting=1)
    if not isinstance(estimator, str):  # the discrete VAE and the mixture: their own (enumerating) estimator
        elbo_fn = estimator
    with torch.no_grad(), poutine.block():
        elbo = -float(elbo_fn.loss(module.model, module.guide, x, **kwargs)) / len(x)
    assert log_p.shape == (20,) and torch.isfinite(log_p).all()
    # log p(x) >= ELBO exactly; the two estimates' Monte Carlo errors (50 particles x 20 images for the ELBO,
    # 300 for log p̂, whose bias is downward) are well under the 0.1 nats/image allowed here
    assert float(log_p.mean()) >= elbo - 0.1


def test_beta_one_is_the_plain_vae_and_beta_weights_the_kl(zoo_data, splits):
    torch.manual_seed(0)
    beta_vae = BetaVAE(*_shared_parts(zoo_data), beta=1.0)
    plain = VAE(beta_vae.encoder, beta_vae.decoder, beta_vae.likelihood, beta_vae.z_dim)
    x = splits.test.batch(torch.arange(16))
    elbo = TraceMeanField_ELBO(max_plate_nesting=1)

    def loss(model, guide):
        pyro.set_rng_seed(3)
        return float(elbo.loss(model, guide, x))

    assert loss(*beta_vae.training_pair()) == pytest.approx(loss(plain.model, plain.guide), rel=1e-6)
    with torch.no_grad():
        loc, scale = beta_vae.encode(x)
        kl = float(torch.distributions.kl_divergence(dist.Normal(loc, scale), dist.Normal(0.0, 1.0)).sum())
    # MeanField's KL is analytic and its reconstruction term draws the same z under the same seed: the
    # losses at beta = 3 and beta = 1 differ by exactly 2 KL
    beta3 = functools.partial(beta_vae.model, beta=3.0), functools.partial(beta_vae.guide, beta=3.0)
    assert loss(*beta3) - loss(*beta_vae.training_pair()) == pytest.approx(2 * kl, rel=1e-4)


def _shared_parts(zoo_data):
    from pyrovae.models.vae import vae_parts

    return vae_parts(zoo_data.shape, "bernoulli", "iwae", zoo_data.pixel_mean)


def test_vampprior_density_is_the_mixture_closed_form(zoo_data):
    module = ENTRIES["vampprior"].build(zoo_data)
    z = torch.randn(7, module.z_dim)
    with torch.no_grad():
        loc, scale = module.encoder(module.pseudo_inputs)  # (K, Z)
        per_component = (-0.5 * ((z[:, None] - loc) / scale) ** 2 - scale.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
        by_hand = torch.logsumexp(per_component, -1) - math.log(len(loc))
        assert torch.allclose(module.prior().log_prob(z), by_hand, atol=1e-4)
        generic = dist.MixtureSameFamily(module.prior().mixture_distribution, module.prior().component_distribution)
        assert torch.allclose(generic.log_prob(z), by_hand, atol=1e-4)
        # as the data plate and the particle plate see it: expanded to a batch, z with a particle dim in front
        zz = torch.randn(4, 7, module.z_dim)
        assert torch.allclose(module.prior().expand((7,)).log_prob(zz), generic.log_prob(zz), atol=1e-3)
    assert module.pseudo_inputs.requires_grad and len(loc) == 100


def test_flow_guide_density_is_base_minus_log_det_by_autograd(zoo_data, splits):
    module = ENTRIES["flow"].build(zoo_data)
    for t in module.flows:  # move the transforms off their near-identity start, so the check has teeth
        for p in t.parameters():
            p.data.add_(0.05 * torch.randn_like(p))
    x = splits.test.batch(torch.arange(3))
    loc, scale, h = module.encode_context(x)
    u = loc + scale * torch.randn_like(loc)

    def push(v: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for t in module.flows:
            v = t.condition(context)(v)
        return v

    z = push(u, h)
    log_q = module.posterior(x).log_prob(z)  # as the guide scores its draw: from the transforms' cache
    for i in range(len(x)):
        jac = torch.autograd.functional.jacobian(functools.partial(push, context=h[i]), u[i])
        by_hand = dist.Normal(loc[i], scale[i]).log_prob(u[i]).sum() - torch.linalg.slogdet(jac).logabsdet
        assert float(log_q[i].detach()) == pytest.approx(float(by_hand.detach()), abs=1e-3)
        assert abs(float(torch.linalg.slogdet(jac).logabsdet.detach())) > 0.1  # a flow that is not a volume-preserving no-op
    # the flows are conditional: the same u with another image's context goes elsewhere (Kingma et al.'s h(x))
    assert not torch.allclose(push(u[:1], h[1:2]), z[:1], atol=1e-4)
    # the guide's draws are scored by the same density (Pyro's trace holds the TransformedDistribution)
    tr = poutine.trace(module.guide).get_trace(x)
    assert isinstance(tr.nodes["z"]["fn"], dist.TransformedDistribution)
    assert set(pyro.get_param_store().keys()) >= {f"flow_vae$$$flows.{i}.nn.layers.0.weight" for i in range(2)}


def test_flow_family_with_its_weights_per_image(zoo_data, splits):
    # The family q* of the flow guide is fitted in: at the encoder's choice it is the guide itself (same draw, same
    # log q, with every image's copy of the weights); an image's weights move only that image's draw; with the
    # flows' last layers at zero it is the diagonal Gaussian N(loc, scale), so it holds the Gaussian family.
    from pyrovae.infer.local import family_of

    module = ENTRIES["flow"].build(zoo_data)
    for p in module.flows.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    x = splits.test.batch(torch.arange(4))
    family = family_of(module)
    with torch.no_grad():
        theta = family.amortised(x)
        assert theta["flows.0.nn.layers.0.weight"].shape[0] == 4
        pyro.set_rng_seed(3)
        q = family.distribution(theta).expand((5, 4))  # 5 draws per image, as the particle plate asks
        z = q.rsample()
        pyro.set_rng_seed(3)
        guide = module.posterior(x).expand((5, 4))
        z_guide = guide.rsample()
        assert z.shape == (5, 4, module.z_dim)
        assert torch.allclose(z, z_guide, atol=1e-5)
        assert torch.allclose(q.log_prob(z), guide.log_prob(z_guide), atol=1e-4)
        moved = {key: v.clone() for key, v in theta.items()}
        moved["flows.1.nn.layers.1.bias"][0] += 0.5  # image 0's own shift
        pyro.set_rng_seed(3)
        z_moved = family.distribution(moved).expand((5, 4)).rsample()
        assert not torch.allclose(z_moved[:, 0], z[:, 0], atol=1e-3) and torch.equal(z_moved[:, 1:], z[:, 1:])
        last = [key for key in theta if key.endswith("layers.1.weight") or key.endswith("layers.1.bias")]
        gauss = {key: torch.zeros_like(v) if key in last else v for key, v in theta.items()}
        q0 = family.distribution(gauss)
        z0 = q0.rsample()
        normal = dist.Normal(theta["loc"], theta["scale"]).to_event(1)
        assert torch.allclose(q0.log_prob(z0), normal.log_prob(z0), atol=1e-4)


def test_two_layer_joint_is_its_three_factors(zoo_data, splits):
    module = ENTRIES["hvae"].build(zoo_data)
    x = splits.test.batch(torch.arange(5))
    guide_tr = poutine.trace(module.guide).get_trace(x)
    model_tr = poutine.trace(poutine.replay(module.model, trace=guide_tr)).get_trace(x)
    z1, z2 = guide_tr.nodes["z1"]["value"], guide_tr.nodes["z2"]["value"]
    assert z1.shape == (5, 100) and z2.shape == (5, 50)  # the IWAE paper's sizes
    with torch.no_grad():
        loc1, log_s1 = module.p_z1(z2).chunk(2, -1)
        logits = module.p_x(z1)
        by_hand = (
            dist.Normal(0.0, 1.0).log_prob(z2).sum()
            + dist.Normal(loc1, log_s1.exp()).log_prob(z1).sum()
            + (x.flatten(1) * logits - torch.nn.functional.softplus(logits)).sum()
        )
    assert float(model_tr.log_prob_sum().detach()) == pytest.approx(float(by_hand), rel=1e-5)


def test_discrete_elbo_is_the_exact_sum_over_every_code(zoo_data, splits):
    module = ENTRIES["discrete"].build(zoo_data)
    x = splits.test.batch(torch.arange(4))
    with torch.no_grad():
        loss = float(module.elbo().loss(module.model, module.guide, x))
        logq = module.encoder(x.flatten(1)).unflatten(-1, (2, 10)).log_softmax(-1)  # (4, 2, 10)
        a, b = torch.meshgrid(torch.arange(10), torch.arange(10), indexing="ij")
        codes = [a.reshape(-1, 1).expand(-1, 4), b.reshape(-1, 1).expand(-1, 4)]  # (100, 4) each
        log_px = module.decode(codes).log_prob(x)  # (100, 4)
        log_qc = logq[:, 0, :].T[a.reshape(-1)] + logq[:, 1, :].T[b.reshape(-1)]  # (100, 4)
        elbo = (log_qc.exp() * (log_px + 2 * math.log(0.1) - log_qc)).sum()
    assert -loss == pytest.approx(float(elbo), rel=1e-5)


def test_conditional_vae_reads_the_label_in_both_programs(zoo_data, splits):
    module = ENTRIES["cvae"].build(zoo_data)
    x, y = splits.test.batch(torch.arange(6)), splits.test.labels[:6]
    guide_tr = poutine.trace(module.guide).get_trace(x, y=y)
    model_tr = poutine.trace(poutine.replay(module.model, trace=guide_tr)).get_trace(x, y=y)
    z = guide_tr.nodes["z"]["value"]
    with torch.no_grad():
        hot = one_hot(y, 10).float()
        loc, log_s = module.encoder(torch.cat([x.flatten(1), hot], -1)).chunk(2, -1)
        logits = module.decoder(torch.cat([z, hot], -1))
        log_q = dist.Normal(loc, log_s.exp()).log_prob(z).sum()
        log_p = dist.Normal(0.0, 1.0).log_prob(z).sum() + dist.Bernoulli(logits=logits).log_prob(x.flatten(1)).sum()
    assert float(guide_tr.log_prob_sum().detach()) == pytest.approx(float(log_q), rel=1e-5)
    assert float(model_tr.log_prob_sum().detach()) == pytest.approx(float(log_p), rel=1e-5)


def test_zoo_models_go_through_compare_and_gap(zoo_data, splits):
    x, y = splits.test.batch(torch.arange(8)), splits.test.labels[:8]
    built = {name: ENTRIES[name].build(zoo_data) for name in ("flow", "discrete", "cvae", "gmm")}
    built["cvae"] = Fitted(built["cvae"].model, built["cvae"].guide, args=(y,))  # scored as log p(x | y)
    rows = compare(built, x, k=40)["models"]
    assert all(math.isfinite(r["log_likelihood"]) for r in rows.values())
    assert rows["gmm"]["likelihood_kind"] == "exact" and rows["flow"]["likelihood_kind"] == "importance-sampled, K=40"
    gaps = inference_gaps(ENTRIES["vampprior"].build(zoo_data), x, steps=3, k=40)
    assert torch.isfinite(gaps.approximation_gap).all() and torch.isfinite(gaps.amortization_gap).all()


def test_zoo_names():
    assert zoo_names("all") == list(ENTRIES)
    assert zoo_names("gmm, vae") == ["vae", "gmm"]  # the zoo's order
    with pytest.raises(PyrovaeError, match="unknown zoo model 'pythae'; choose all or some of vae"):
        zoo_names("vae,pythae")


@pytest.mark.parametrize("name", ["vampprior", "flow", "hvae"])
def test_ais_scores_the_zoo_models_with_continuous_latents(name, splits, zoo_data):
    # AIS moves each latent in the unconstrained space of its support: the VampPrior's is a mixture's support (torch
    # has no map for that wrapper; its components' is used), the flow's and the two-layer VAE's are Gaussian. On 10
    # images of an untrained model AIS and IS (K = 500) estimate the same log p: they agree within a few nats
    # (IS is biased low by its gap, AIS by its schedule; both are small here), and AIS is finite per image.
    from pyrovae.infer.ais import annealed_log_likelihood

    module = ENTRIES[name].build(zoo_data)
    x = splits.test.batch(torch.arange(10))
    pyro.set_rng_seed(0)
    est = annealed_log_likelihood(module.model, module.guide, x, num_steps=30, num_chains=4)
    assert est.log_likelihood.shape == (10,) and torch.isfinite(est.log_likelihood).all()
    pyro.set_rng_seed(0)
    is_lp = log_likelihood(module.model, module.guide, x, num_samples=500)
    assert abs(float(est.log_likelihood.mean() - is_lp.mean())) < 5
