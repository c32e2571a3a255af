"""AIS and BDMC against models whose log p(x) is known exactly: linear-Gaussian (pPCA), a 1-D conjugate model
with a positive latent (a transform and its Jacobian), and a mixture whose discrete site is enumerated.

Tolerances: AIS weights are independent over chains and datapoints, so a mean over N datapoints of
(estimate - exact) has the standard error sqrt(Σ se_i²)/N from each datapoint's delta-method se; the tests
allow 4 such standard errors (a false failure about once in 16 000 runs) plus a small allowance for the
log's downward bias (var/2 per datapoint, below 0.01 nats at the schedules used here). All seeded.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyrovae import PyrovaeError
from pyrovae.infer.ais import annealed_log_likelihood, check_annealable
from pyrovae.infer.bdmc import bdmc, simulate
from pyrovae.infer.hmc import _adapt, _hmc, _latent_sites, _run, _Target
from pyrovae.infer.importance import log_likelihood
from pyrovae.infer.program import _inspect

from .test_evaluate import LinearGaussian, Z


@pytest.fixture(scope="module")
def lg() -> LinearGaussian:
    return LinearGaussian()


def _mean_error_ok(est, exact, se, bias=0.01) -> bool:
    err = float((est - exact).double().mean())
    tol = 4 * float(se.double().pow(2).sum().sqrt()) / len(est) + bias
    return abs(err) < tol


class Conjugate:
    """λ ~ Gamma(a, b) per datapoint, x_ij ~ N(0, 1/λ) for j < M: p(x_i) in closed form (a Student-t),
    the posterior Gamma(a + M/2, b + Σ_j x_ij²/2). The latent is positive: AIS moves log λ."""

    a, b, m = 2.0, 1.5, 4

    def model(self, x):
        with pyro.plate("data", len(x)):
            lam = pyro.sample("lam", dist.Gamma(torch.tensor(self.a), torch.tensor(self.b)))
            pyro.sample("x", dist.Normal(torch.zeros_like(x), lam.rsqrt().unsqueeze(-1)).to_event(1), obs=x)

    def guide(self, x):
        """A LogNormal near (not at) the posterior: its mean off by 0.3 in log space, its sd 1.5 times too wide."""
        a, b = self.a + self.m / 2, self.b + x.pow(2).sum(-1) / 2
        with pyro.plate("data", len(x)):
            pyro.sample("lam", dist.LogNormal(torch.log(a / b) + 0.3, torch.full_like(b, 1.5 / math.sqrt(a))))

    def exact_log_p(self, x):
        a, b, m = self.a, self.b, self.m
        s = x.double().pow(2).sum(-1) / 2
        return (
            a * math.log(b)
            + math.lgamma(a + m / 2)
            - math.lgamma(a)
            - m / 2 * math.log(2 * math.pi)
            - (a + m / 2) * torch.log(b + s)
        ).float()

    def sample(self, n, seed=3):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            lam = torch.distributions.Gamma(self.a, self.b).sample((n,))
            return torch.randn(n, self.m) * lam.rsqrt().unsqueeze(-1)


# ------------------------------------------------------------------------------------------ exactness
def test_ais_is_exact_on_linear_gaussian(lg):
    # A shifted, too-narrow guide (IS at K = 800 is off by ~0.3 nats here); 50 steps of AIS recover log p(x).
    x = lg.sample(30)
    guide = lg.diag_guide(0.3, 0.7)
    pyro.set_rng_seed(0)
    r = annealed_log_likelihood(lg.model, guide, x, num_steps=50, num_chains=8, num_leapfrog=3)
    exact = lg.exact_log_p(x)
    assert r.log_likelihood.shape == r.stderr.shape == r.acceptance.shape == r.ess.shape == (30,)
    assert r.log_weights.shape == (30, 8)
    assert _mean_error_ok(r.log_likelihood, exact, r.stderr), (r.log_likelihood - exact).mean()
    assert ((r.ess >= 1 - 1e-4) & (r.ess <= 8 + 1e-4)).all()
    assert ((r.log_likelihood - exact).abs() < 0.5).all()  # no datapoint far off (its se here is < 0.1)


def test_exact_guide_gives_exact_weights(lg):
    # With q = p(z|x) every intermediate target is the posterior: every increment is log p(x), exactly (float32).
    x = lg.sample(6)
    pyro.set_rng_seed(1)
    r = annealed_log_likelihood(lg.model, lg.exact_guide, x, num_steps=5, num_chains=3, num_leapfrog=2, warmup=4)
    assert torch.allclose(r.log_likelihood, lg.exact_log_p(x), atol=1e-4)


def test_ais_is_exact_on_a_conjugate_model_with_a_positive_latent():
    cm = Conjugate()
    x = cm.sample(30)
    pyro.set_rng_seed(2)
    r = annealed_log_likelihood(cm.model, cm.guide, x, num_steps=50, num_chains=8, num_leapfrog=3)
    assert _mean_error_ok(r.log_likelihood, cm.exact_log_p(x), r.stderr)


def test_enumerated_discrete_latent_is_summed_out():
    # c ~ Categorical(π) enumerated, z ~ N(μ_c, 1), x ~ N(z, 0.5): p(x) = Σ_c π_c N(x; μ_c, 1.25), the guide on z only.
    pi, mu = torch.tensor([0.3, 0.7]), torch.tensor([-2.0, 1.5])

    @pyro.infer.config_enumerate
    def model(x):
        with pyro.plate("data", len(x)):
            c = pyro.sample("c", dist.Categorical(pi))
            z = pyro.sample("z", dist.Normal(mu[c], 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=x)

    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(0.8 * x, 0.6))

    x = torch.linspace(-3, 3, 20)
    exact = torch.logsumexp(pi.log() + dist.Normal(mu, 1.25**0.5).log_prob(x[:, None]), dim=1)
    pyro.set_rng_seed(3)
    r = annealed_log_likelihood(model, guide, x, num_steps=50, num_chains=8, num_leapfrog=3)
    assert _mean_error_ok(r.log_likelihood, exact, r.stderr)


# ------------------------------------------------------------------------------------------ BDMC
@pytest.mark.parametrize("which", ["linear-gaussian", "conjugate"])
def test_bdmc_bounds_bracket_the_truth(lg, which):
    # On data simulated from the model, at 10 and at 100 steps, the forward chain is below the exact log p(x) and
    # the reverse chain above it, on average over 40 datapoints (each mean within 4 of its standard errors of being
    # on its side); the gap narrows with the longer schedule, to under 0.2 nats (-0.05 to 0.1 over seeds 1-6 here:
    # with 4 chains both bounds keep some Monte Carlo slack).
    m = lg if which == "linear-gaussian" else Conjugate()
    guide = lg.diag_guide(0.3, 0.7) if which == "linear-gaussian" else m.guide
    pyro.set_rng_seed(4)
    sim = simulate(m.model, m.sample(40))
    x, latents = sim["x"], {k: v for k, v in sim.items() if k != "x"}
    exact = m.exact_log_p(x).double()
    gaps = []
    for steps in (10, 100):
        s = bdmc(m.model, guide, x, latents=latents, num_steps=steps, num_chains=4, num_leapfrog=3)
        lo, hi = s.lower.log_likelihood.double(), s.upper.log_likelihood.double()
        se_lo = float(s.lower.stderr.double().pow(2).sum().sqrt()) / len(x)
        se_hi = float(s.upper.stderr.double().pow(2).sum().sqrt()) / len(x)
        assert float((lo - exact).mean()) < 4 * se_lo + 1e-3
        assert float((hi - exact).mean()) > -4 * se_hi - 1e-3
        gaps.append(float(s.gap.mean()))
    assert gaps[0] > 0 and abs(gaps[1]) < min(gaps[0], 0.2), gaps  # the 100-step gap is within MC noise of 0


def test_simulate_draws_latents_and_data(lg):
    pyro.set_rng_seed(5)
    sim = simulate(lg.model, lg.sample(7))
    assert sim["z"].shape == (7, Z) and sim["x"].shape == (7, 5)


# ------------------------------------------------------------------------------------------ chains
def test_vectorised_and_looped_chains_agree(lg):
    # The same estimator with all 8 chains in one call and with one chain per call (eight calls, combined):
    # both within MC error of the exact value, and of each other.
    x = lg.sample(20)
    guide = lg.diag_guide(0.3, 0.7)
    exact = lg.exact_log_p(x)
    out = []
    for chain_size in (8, 1):
        pyro.set_rng_seed(6)
        r = annealed_log_likelihood(
            lg.model, guide, x, num_steps=30, num_chains=8, num_leapfrog=3, chain_size=chain_size
        )
        assert _mean_error_ok(r.log_likelihood, exact, r.stderr)
        out.append(r)
    se = (out[0].stderr.pow(2) + out[1].stderr.pow(2)).sqrt()
    assert _mean_error_ok(out[0].log_likelihood, out[1].log_likelihood, se)


def test_a_program_without_a_chain_dim_loops_over_chains(lg):
    # A net that flattens its input's leading dims breaks a chain dim: AIS warns and runs one chain per call.
    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(len(x), Z), 1.0).to_event(1)).reshape(-1, Z)
            pyro.sample("x", dist.Normal(z @ lg.W.T + lg.b, lg.sigma).to_event(1), obs=x)

    x = lg.sample(10)
    pyro.set_rng_seed(7)
    with pytest.warns(UserWarning, match="one chain per call"):
        r = annealed_log_likelihood(model, lg.diag_guide(0.3, 0.7), x, num_steps=30, num_chains=4, num_leapfrog=3)
    assert _mean_error_ok(r.log_likelihood, lg.exact_log_p(x), r.stderr)


@pytest.mark.parametrize("accept", [0.65, 0.85])
def test_step_size_adaptation_reaches_its_target_on_a_gaussian(accept):
    # z ~ N(0, diag(s²)) in 6 dims with scales spanning 30x, x ~ N(z, 0.2²): the posterior is Gaussian and the
    # guide (unit sd) far from its scale. After the warm-up, 30 frozen HMC transitions on the posterior accept
    # at the target rate: mean over 40 datapoints x 16 chains x 30 transitions within 0.07 of it (the rate's
    # dependence on the step is steep, and 5 averaged warm-up iterates leave a few percent of error in the step).
    s = torch.tensor([3.0, 1.0, 0.3, 0.1, 1.0, 0.5])

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(6), s).to_event(1))
            pyro.sample("x", dist.Normal(z, 0.2).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(x, 1.0).to_event(1))

    pyro.set_rng_seed(8)
    x = torch.randn(40, 6) * s
    prog = _inspect(model, guide, (x,), {}, None)
    with torch.no_grad():
        lat = _latent_sites(*_run(prog, (x,), {}, None, None))
    target = _Target(prog, (x,), {}, lat, 16, 40)
    step, scale = _adapt(target, 4, 10, accept, 1.0)
    with torch.no_grad():
        _, guide_tr = _run(prog, (x,), {}, None, 16)
    state = target.state({"z": guide_tr.nodes["z"]["value"]})
    rates = []
    for _ in range(30):
        state, a = _hmc(target, state, 1.0, step, scale, 4)
        rates.append(a.mean())
    assert abs(float(torch.stack(rates[5:]).mean()) - accept) < 0.07, float(torch.stack(rates).mean())


# ------------------------------------------------------------------------------------------ refusals
def test_a_global_latent_gets_the_same_refusal_as_log_likelihood(lg):
    def model(x):
        g = pyro.sample("g", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(g, 1.0), obs=x[:, 0])

    def guide(x):
        pyro.sample("g", dist.Normal(0.0, 1.0))

    x = lg.sample(3)
    with pytest.raises(PyrovaeError) as is_err:
        log_likelihood(model, guide, x, num_samples=5)
    with pytest.raises(PyrovaeError) as ais_err:
        annealed_log_likelihood(model, guide, x, num_steps=2)
    assert str(ais_err.value) == str(is_err.value) and "\n" not in str(ais_err.value)


def test_bad_input_and_discrete_guide_sites_are_refused(lg):
    x = lg.sample(3)
    for kw, match in (
        ({"num_steps": 0}, "annealing steps"),
        ({"num_chains": 0}, "chains"),
        ({"num_leapfrog": 0}, "leapfrog"),
        ({"target_accept": 1.5}, "acceptance"),
        ({"schedule": "cubic"}, "schedule"),
        ({"memory_mb": -1}, "memory"),
    ):
        with pytest.raises(PyrovaeError, match=match):
            annealed_log_likelihood(lg.model, lg.exact_guide, x, **kw)

    def model(x):
        with pyro.plate("data", len(x)):
            y = pyro.sample("y", dist.Categorical(torch.ones(2) / 2))
            pyro.sample("x", dist.Normal(y.float(), 1.0), obs=x[:, 0])

    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("y", dist.Categorical(torch.ones(2) / 2))

    with pytest.raises(PyrovaeError, match="empty"):
        annealed_log_likelihood(lg.model, lg.exact_guide, x[:0])
    with pytest.raises(PyrovaeError, match="continuous"):
        annealed_log_likelihood(model, guide, x, num_steps=2)
    with pytest.raises(PyrovaeError, match="continuous"):  # the same refusal before any work (evaluate runs it first)
        check_annealable(model, pyro.infer.config_enumerate(guide), x)
