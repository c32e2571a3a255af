"""Evaluation: importance-sampled log p(x) against a model whose log p(x) is known exactly, k̂, and the CLI.

The reference model is linear-Gaussian: z ~ N(0, I_d), x = W z + b + σ ε, so p(x) = N(b, W Wᵀ + σ² I)
and p(z | x) = N(S Wᵀ (x - b) / σ², S) with S = (I + Wᵀ W / σ²)⁻¹, both in closed form.
"""

from __future__ import annotations

import json
import math

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO

from pyrovae import PyrovaeError
from pyrovae.cli import main
from pyrovae.infer.diagnostics import active_units, bits_per_dim, khat_summary, pareto_khat
from pyrovae.infer.importance import evaluate_points, log_likelihood
from pyrovae.infer.memory import _plan

D, Z = 5, 2


class LinearGaussian:
    """A linear-Gaussian VAE as a Pyro model, with guides of chosen quality around the exact posterior."""

    def __init__(self, seed: int = 0, sigma: float = 0.5) -> None:
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(D, Z, generator=g)
        self.b = torch.randn(D, generator=g)
        self.sigma = sigma
        self.S = torch.linalg.inv(torch.eye(Z) + self.W.T @ self.W / sigma**2)  # posterior covariance

    def model(self, x: torch.Tensor, num_data: int | None = None) -> None:
        with pyro.plate("data", num_data or len(x), subsample=torch.arange(len(x))):
            z = pyro.sample("z", dist.Normal(torch.zeros(Z), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T + self.b, self.sigma).to_event(1), obs=x)

    def exact_log_p(self, x: torch.Tensor) -> torch.Tensor:
        cov = self.W @ self.W.T + self.sigma**2 * torch.eye(D)
        return torch.distributions.MultivariateNormal(self.b, cov).log_prob(x)

    def posterior_mean(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b) @ self.W @ self.S / self.sigma**2

    def sample(self, n: int, seed: int = 1) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, Z, generator=g)
        return z @ self.W.T + self.b + self.sigma * torch.randn(n, D, generator=g)

    def exact_guide(self, x: torch.Tensor, num_data: int | None = None, widen: float = 1.0) -> None:
        """q(z|x) = p(z|x): a full-covariance Normal (so every weight equals p(x)); ``widen`` scales its sd."""
        tril = widen * torch.linalg.cholesky(self.S)
        with pyro.plate("data", num_data or len(x), subsample=torch.arange(len(x))):
            pyro.sample("z", dist.MultivariateNormal(self.posterior_mean(x), scale_tril=tril))

    def diag_guide(self, shift: float, scale: float):
        """A mean-field Normal: the posterior mean moved by ``shift``, the marginal std times ``scale``."""
        std = self.S.diagonal().sqrt()

        def guide(x: torch.Tensor, num_data: int | None = None) -> None:
            with pyro.plate("data", num_data or len(x), subsample=torch.arange(len(x))):
                pyro.sample("z", dist.Normal(self.posterior_mean(x) + shift, scale * std).to_event(1))

        return guide


@pytest.fixture(scope="module")
def lg() -> LinearGaussian:
    return LinearGaussian()


def _log_p_se(log_w: torch.Tensor) -> torch.Tensor:
    """Delta-method standard error of log-mean-exp of each row: sd(w) / (mean(w) sqrt K)."""
    w = (log_w.double() - log_w.double().amax(1, keepdim=True)).exp()
    return w.std(1) / (w.mean(1) * math.sqrt(log_w.shape[1]))


# ------------------------------------------------------------------------------------------ exactness
def test_log_likelihood_matches_exact_linear_gaussian(lg):
    # A guide that is wrong (mean off by ~0.5 posterior sd, mean-field) but wider than the posterior
    # (bounded weights, k̂ < 0): at K = 5000 the estimate's standard error is about 0.01 nats here.
    # Tolerance: 4 standard errors (from the weights themselves) + 2e-3 nats for float32 rounding;
    # the bias of log-mean-exp, about -Var(w)/(2 K mean(w)^2), is < 1e-3 nats.
    x = lg.sample(6)
    guide = lg.diag_guide(shift=0.1, scale=1.3)
    est, log_w = log_likelihood(lg.model, guide, x, num_samples=5000, return_log_weights=True)
    exact = lg.exact_log_p(x)
    tol = 4 * _log_p_se(log_w).float() + 2e-3
    assert log_w.shape == (6, 5000)
    assert ((est - exact).abs() <= tol).all(), (est - exact, tol)
    assert tol.max() < 0.06  # the test has teeth


def test_elbo_is_below_exact_log_p_and_splits_into_its_parts(lg):
    # ELBO = E_q log w <= log p(x) (Jensen). Its MC error at K = 5000 is sd(log w)/sqrt(K) ~ 0.01 nats,
    # the true gap KL(q || p(z|x)) here is 0.4-0.6 nats: we ask ELBO < exact - 0.1. Reconstruction - KL
    # (analytic KL for the mean-field guide) equals the ELBO up to MC error: tolerance 0.05 nats.
    x = lg.sample(6)
    res = evaluate_points(lg.model, lg.diag_guide(shift=0.1, scale=1.3), x, num_samples=5000)
    exact = lg.exact_log_p(x)
    assert (res.elbo < exact - 0.1).all(), (res.elbo, exact)
    assert (res.gap > 0).all()
    assert torch.allclose(res.reconstruction - res.kl, res.elbo, atol=0.05)
    assert res.z_mean.shape == (6, Z)
    assert torch.allclose(res.z_mean, lg.posterior_mean(x) + 0.1, atol=1e-5)  # guide means, exact


def test_exact_posterior_gives_exact_log_p_under_any_chunking(lg):
    # With q = p(z|x) every weight equals p(x), so log p̂ is exact for any draws and any chunking:
    # tolerance 1e-3 nats (float32 rounding of log p(x, z) - log q(z|x)). A 0.001 MB budget forces
    # one datapoint and a few particles per call; KL falls back to MC (MVN vs Normal has no formula).
    x = lg.sample(5)
    exact = lg.exact_log_p(x)
    for kwargs in ({}, {"memory_mb": 0.001}, {"chunk_size": 7, "batch_size": 2}):
        est = log_likelihood(lg.model, lg.exact_guide, x, num_samples=50, **kwargs)
        assert torch.allclose(est, exact, atol=1e-3), kwargs
    res = evaluate_points(lg.model, lg.exact_guide, x, num_samples=50)
    assert torch.allclose(res.elbo, exact, atol=1e-3)
    assert torch.allclose(res.reconstruction - res.kl, exact, atol=1e-3)


# ------------------------------------------------------------------------------------------ K and seeds
def test_k1_is_an_elbo_sample(lg, tiny_vae, tiny_splits):
    # K = 1: log p̂ is log w of one draw, i.e. a single-sample ELBO. Same seed, same draws as Pyro's
    # own Trace_ELBO: the sums agree to float32 rounding (relative 1e-5).
    for model, guide, x in (
        (lg.model, lg.diag_guide(0.1, 1.3), lg.sample(6)),
        (tiny_vae.model, tiny_vae.guide, tiny_splits.test.batch(torch.arange(20))),
    ):
        pyro.set_rng_seed(3)
        est = log_likelihood(model, guide, x, num_samples=1)
        pyro.set_rng_seed(3)
        elbo = -Trace_ELBO().loss(model, guide, x, num_data=len(x))
        assert est.shape == (len(x),)
        assert math.isclose(float(est.sum()), elbo, rel_tol=1e-5, abs_tol=1e-4)


def test_evaluation_leaves_the_param_store_alone(tiny_vae, tiny_splits):
    # nothing is optimised in a sweep, so the model's modules are not (re-)registered in Pyro's store;
    # a model used with SVI afterwards registers them as usual
    pyro.clear_param_store()
    log_likelihood(tiny_vae.model, tiny_vae.guide, tiny_splits.test.batch(torch.arange(4)), num_samples=8)
    assert len(pyro.get_param_store()) == 0
    pyro.poutine.trace(tiny_vae.guide).get_trace(tiny_splits.test.batch(torch.arange(4)))
    assert any(name.startswith("vae.encoder") for name in pyro.get_param_store().keys())
    pyro.clear_param_store()


def test_mean_log_p_is_non_decreasing_in_k(lg):
    # E log p̂_K increases with K (Burda et al. 2016, Thm 1). Over 8 seeds and 6 points, each step
    # in K may not fall by more than 3 standard errors of the seed-to-seed difference; and K = 500
    # must beat K = 1 clearly (the ELBO gap here is ~1.2 nats).
    x = lg.sample(6)
    guide = lg.diag_guide(shift=0.2, scale=1.2)
    ks = [1, 5, 50, 500]
    means = torch.zeros(8, len(ks))
    for s in range(8):
        for j, k in enumerate(ks):
            pyro.set_rng_seed(100 + s)
            means[s, j] = log_likelihood(lg.model, guide, x, num_samples=k).mean()
    for j in range(len(ks) - 1):
        diff = means[:, j + 1] - means[:, j]
        se = diff.std() / math.sqrt(len(diff))
        assert diff.mean() >= -3 * se, (ks[j], ks[j + 1], diff)
    assert means[:, -1].mean() > means[:, 0].mean() + 0.3


def test_chunked_equals_unchunked_for_the_same_draws(lg):
    # Chunking over K: the same RNG stream is consumed in the same order, so the weights are identical
    # and log-sum-exp over chunks equals log-sum-exp over all K (tolerance 1e-5 nats).
    x = lg.sample(6)
    guide = lg.diag_guide(shift=0.1, scale=1.3)
    pyro.set_rng_seed(7)
    chunked, w_chunked = log_likelihood(
        lg.model, guide, x, num_samples=64, chunk_size=16, batch_size=6, return_log_weights=True
    )
    pyro.set_rng_seed(7)
    parts = [log_likelihood(lg.model, guide, x, num_samples=16, return_log_weights=True)[1] for _ in range(4)]
    w_seq = torch.cat(parts, dim=1)
    assert torch.equal(w_chunked, w_seq)
    assert torch.allclose(chunked, torch.logsumexp(w_seq, 1) - math.log(64), atol=1e-5)

    # Chunking over the batch: each chunk of points sees the draws a separate call on it would.
    pyro.set_rng_seed(8)
    by_batch = log_likelihood(lg.model, guide, x, num_samples=32, chunk_size=32, batch_size=2)
    pyro.set_rng_seed(8)
    separate = torch.cat([log_likelihood(lg.model, guide, x[i : i + 2], num_samples=32) for i in range(0, 6, 2)])
    assert torch.allclose(by_batch, separate, atol=1e-5)

    # One call for all K against chunks of 16: torch's CPU normal sampler fills consecutive draws in
    # order when each chunk holds a multiple of 16 numbers; if a torch version stops doing so the
    # draws differ and there is nothing to compare.
    torch.manual_seed(0)
    whole = torch.randn(64, 6, Z)
    torch.manual_seed(0)
    if not torch.equal(whole, torch.cat([torch.randn(16, 6, Z) for _ in range(4)])):
        pytest.skip("this torch does not draw chunked normals in the same order")
    pyro.set_rng_seed(7)
    unchunked = log_likelihood(lg.model, guide, x, num_samples=64, chunk_size=64, batch_size=6)
    assert torch.allclose(chunked, unchunked, atol=1e-5)


def test_memory_budget_plans_smaller_chunks():
    # 1 KB per (particle, datapoint): 1 MB holds 1024 pairs.
    assert _plan(5000, 100, None, None, 1.0, lambda: 1024.0) == (1024, 1)
    assert _plan(10, 100, None, None, 1.0, lambda: 1024.0) == (10, 100)
    assert _plan(5000, 100, 8, 3, None, lambda: 1 / 0) == (8, 3)  # both given: no probe


# ------------------------------------------------------------------------------------------ k-hat
def test_khat_good_for_exact_posterior_and_bad_for_a_narrow_guide(lg):
    # Exact posterior: weights equal up to float32 rounding (k̂ reported as 0, no tail to fit); the
    # exact posterior widened 1.2x: bounded weights, a real Pareto fit with k̂ <= 0 in theory (seen:
    # -0.7 to -0.8) -> < 0.5 (Yao et al. 2018). Mean-field guide with 0.1x the posterior sd: the true
    # tail index is 1 - 0.1² = 0.99, but one point's k̂ from K = 5000 weights (a tail of 212) scatters
    # (over 12 seeds x 6 points: 0.73 to 1.2), so we ask every point > 0.5 and their mean > 0.7
    # (seen: 0.88 to 1.0).
    x = lg.sample(6)
    good = evaluate_points(lg.model, lg.exact_guide, x, num_samples=2000)
    wide = evaluate_points(
        lg.model, lambda x, num_data=None: lg.exact_guide(x, num_data, widen=1.2), x, num_samples=2000
    )
    bad = evaluate_points(lg.model, lg.diag_guide(shift=0.0, scale=0.1), x, num_samples=5000)
    assert (good.khat == 0).all(), good.khat
    assert (wide.khat < 0.5).all(), wide.khat
    assert ((wide.log_likelihood - lg.exact_log_p(x)).abs() < 0.05).all()
    assert (bad.khat > 0.5).all() and bad.khat.mean() > 0.7, bad.khat
    assert khat_summary(bad.khat)["khat_bad"] >= 0.5
    assert math.isnan(pareto_khat(torch.zeros(2, 10))[0])  # too few weights for a tail


def test_khat_recovers_a_known_pareto_tail():
    """Weights w = U^(-k), U uniform, have a generalised Pareto tail of shape exactly k. With K = 20000 per
    row, the tail PSIS fits has ~424 weights and k̂'s sampling sd is ~0.05 at these k (Vehtari et al. 2024),
    so each row lies within 0.2 (4 sd) of its k whichever ArviZ (0.x or 1.x) computes it. A sign slip
    (fitting the left tail) gives k̂ < 0 for every row."""
    rng = np.random.default_rng(0)
    shapes = np.array([0.2, 0.4, 0.6, 0.8, 1.0])
    log_w = -shapes[:, None] * np.log(rng.uniform(size=(len(shapes), 20000)))
    khat = pareto_khat(torch.as_tensor(log_w))
    assert khat.shape == shapes.shape
    assert np.abs(khat - shapes).max() < 0.2, khat


def test_khat_of_a_flat_tail_is_not_estimated_and_other_rows_are_unchanged():
    """A row whose largest weights are all one value (a discrete guide, float32 rounding) has no tail to fit:
    ArviZ 1.x raises on it and 0.x returns inf, so pyrovae reports NaN there, and the rows beside it get
    exactly the k̂ they get alone (the flat row must not change or break the others)."""
    rng = np.random.default_rng(1)
    pareto_rows = -np.array([[0.3], [0.9]]) * np.log(rng.uniform(size=(2, 2000)))
    flat = np.concatenate([np.zeros(1000), -rng.uniform(1, 2, size=1000)])[None]  # top 134 weights equal
    khat = pareto_khat(torch.as_tensor(np.concatenate([pareto_rows[:1], flat, pareto_rows[1:]])))
    alone = pareto_khat(torch.as_tensor(pareto_rows))
    assert math.isnan(khat[1]) and np.isfinite(alone).all()
    assert khat[[0, 2]] == pytest.approx(alone, abs=1e-12)
    assert khat_summary(khat)["khat_bad"] == pytest.approx(float((alone > 0.7).mean()))  # NaN left out


def test_bits_per_dim_and_active_units():
    assert bits_per_dim(torch.tensor([-784 * math.log(2)]), 784, "binary") == pytest.approx(1.0)
    # dequantised: density on [0, 1]^D is 256^D times the density on the 0..256 pixel scale -> +8 bits/dim
    assert bits_per_dim(torch.tensor([0.0]), 10, "dequantized") == pytest.approx(8.0)
    assert bits_per_dim(torch.tensor([0.0]), 10, "undefined") is None
    z = torch.stack([torch.linspace(-1, 1, 100), torch.full((100,), 0.3), 0.05 * torch.randn(100)], dim=1)
    assert active_units(z) == 1  # Var 0.34, 0 and 0.0025 against the 0.01 threshold


def test_bad_input_raises(lg):
    x = lg.sample(3)
    with pytest.raises(PyrovaeError, match="at least 1"):
        log_likelihood(lg.model, lg.exact_guide, x, num_samples=0)
    with pytest.raises(PyrovaeError, match="memory"):
        log_likelihood(lg.model, lg.exact_guide, x, num_samples=5, memory_mb=-1)

    def outside(x, num_data=None):  # a latent outside the data plate couples the datapoints
        pyro.sample("g", dist.Normal(0.0, 1.0))

    def model(x, num_data=None):
        g = pyro.sample("g", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(g, 1.0), obs=x[:, 0])

    with pytest.raises(PyrovaeError, match="data plate"):
        log_likelihood(model, outside, x, num_samples=5)


# ------------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    # Trained once for the module; ``--eval-k`` evaluates at the end of training (its files are then
    # removed so that the tests below see only what ``pyrovae evaluate`` writes).
    out = tmp_path_factory.mktemp("run") / "run"
    assert (
        main(["train", "--dataset", "synthetic", "--epochs", "1", "--out", str(out), "--quiet", "--eval-k", "3"]) == 0
    )
    assert json.loads((out / "eval.json").read_text())["k"] == 3
    for path in [*out.glob("eval.*"), *out.glob("*.png")]:
        path.unlink()
    return out


def test_cli_evaluate_writes_results(tiny_run, capsys):
    code = main(["evaluate", str(tiny_run), "--k", "40", "--n", "60", "--device", "cpu", "--memory-mb", "64"])
    assert code == 0
    assert "log p(x)" in capsys.readouterr().out
    summary = json.loads((tiny_run / "eval.json").read_text())
    keys = "split n k elbo log_likelihood log_likelihood_sem bits_per_dim bits_per_dim_kind reconstruction kl gap"
    for key in [*keys.split(), "active_units", "khat_good", "khat_ok", "khat_bad", "worst", "seconds"]:
        assert key in summary, key
    assert (summary["split"], summary["n"], summary["k"]) == ("test", 60, 40)
    assert summary["bits_per_dim_kind"].startswith("binary")
    assert summary["log_likelihood"] >= summary["elbo"] - 1.0  # log p̂ is an IWAE bound above the ELBO
    assert summary["khat_good"] + summary["khat_ok"] + summary["khat_bad"] == pytest.approx(1.0)
    idata = az.from_netcdf(tiny_run / "eval.nc")  # read by the ArviZ installed (0.x or 1.x)
    assert idata.evaluation["log_likelihood"].shape == (60,)
    assert idata.evaluation["z_mean"].shape[0] == 60
    for name in ("samples", "reconstructions", "interpolations", "latents", "training", "khat"):
        assert (tiny_run / f"{name}.png").stat().st_size > 0, name
    assert (tiny_run / "eval.md").read_text().startswith("# Evaluation")


def test_cli_evaluate_val_split_without_figures(tiny_run, tmp_path):
    code = main(["evaluate", str(tiny_run), "--k", "5", "--n", "10", "--split", "val", "--no-figures", "--quiet"])
    assert code == 0
    summary = json.loads((tiny_run / "eval.json").read_text())
    assert summary["split"] == "val" and summary["khat_bad"] is None  # K = 5 is too few for k̂
    assert "figures" not in summary


def test_cli_evaluate_errors(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing" in err
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", str(tmp_path), "--k", "0"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_cli_evaluate_ais_and_bdmc_side_by_side(tiny_run, capsys):
    # --method bdmc runs IS, AIS on the same images and the BDMC sandwich on simulated ones; every number is
    # written beside what checks it (k̂, the AIS standard error and acceptance, the BDMC gap).
    argv = ["evaluate", str(tiny_run), "--k", "40", "--n", "12", "--device", "cpu", "--method", "bdmc"]
    code = main([*argv, "--steps", "5", "--chains", "2", "--leapfrog", "2", "--bdmc-n", "6"])
    assert code == 0
    out = capsys.readouterr().out
    assert "AIS log p(x)" in out and "BDMC gap" in out
    s = json.loads((tiny_run / "eval.json").read_text())
    assert s["method"] == "bdmc"
    a, b = s["ais"], s["bdmc"]
    assert (a["steps"], a["chains"], a["leapfrog"], b["n"]) == (5, 2, 2, 6)
    for key in ("log_likelihood", "mc_stderr", "acceptance", "ess", "minus_is", "minus_is_sem", "differ_frac"):
        assert math.isfinite(a[key]), key
    assert 0 <= a["acceptance"] <= 1 and b["upper"] >= b["lower"] - 5.0
    md = (tiny_run / "eval.md").read_text()
    assert "k̂ > 0.7 for" in md and "AIS, 5 steps" in md and "BDMC on 6 simulated images" in md
    idata = az.from_netcdf(tiny_run / "eval.nc")
    assert idata.evaluation["ais_log_likelihood"].shape == (12,)
    assert idata.evaluation["bdmc_gap"].shape == (6,)
    assert (tiny_run / "ais_vs_is.png").stat().st_size > 0


def test_cli_evaluate_rejects_a_bad_method(tiny_run, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", str(tiny_run), "--method", "mcmc"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(SystemExit):
        main(["evaluate", str(tiny_run), "--method", "ais", "--steps", "0"])
