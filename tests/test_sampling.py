"""Better samples: the MMD statistic, the two-stage and latent-GMM samplers, and ``pyrovae samples``."""

from __future__ import annotations

import json
import subprocess
import sys

import pyro
import pytest
import torch

from pyrovae import Pixels, build_vae, fit, make_splits, synthetic
from pyrovae.cli import main
from pyrovae.nn.likelihoods import GaussianLearned
from pyrovae.nn.nets import Arch
from pyrovae.tasks.samples import (
    PosteriorCodes,
    encode,
    fit_latent_gmm,
    fit_two_stage,
    median_bandwidth,
    mmd2,
    mmd_permutation_test,
)


# --------------------------------------------------------------------------------------------- MMD
def test_mmd_matches_the_kernel_formula():
    """Exact (float64): the unbiased and biased estimators against the kernel matrices written out."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 3, generator=g), torch.randn(9, 3, generator=g) + 0.3
    sigma = 1.3
    k = lambda a, b: torch.exp(-torch.cdist(a.double(), b.double()).pow(2) / (2 * sigma**2))  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    unbiased = (kxx.sum() - 7) / 42 + (kyy.sum() - 9) / 72 - 2 * kxy.mean()
    biased = kxx.mean() + kyy.mean() - 2 * kxy.mean()
    assert mmd2(x, y, sigma)[0] == pytest.approx(float(unbiased), rel=1e-12)
    assert mmd2(x, y, sigma, unbiased=False)[0] == pytest.approx(float(biased), rel=1e-12)
    # the median heuristic: the median distance between distinct pooled points
    pooled = torch.cat([x, y]).double()
    d = torch.cdist(pooled, pooled)
    assert median_bandwidth(x, y) == pytest.approx(float(d[~torch.eye(16, dtype=torch.bool)].median()))


def test_mmd_is_about_zero_for_one_distribution_and_larger_for_a_shifted_one():
    """Two draws of N(0, I_5), 300 points each: |MMD²| < 0.01 (its null spread here is ~0.002); a 0.5 shift
    in every coordinate: MMD² more than 10 times larger, and the permutation test rejects (p < 0.01)."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(300, 5, generator=g), torch.randn(300, 5, generator=g)
    shifted = torch.randn(300, 5, generator=g) + 0.5
    same = mmd2(x, y)[0]
    diff, p_diff = mmd_permutation_test(x, shifted, permutations=200)
    assert abs(same) < 0.01
    assert diff > 10 * max(abs(same), 1e-3) and p_diff < 0.01
    assert mmd_permutation_test(x, y, permutations=10)[0] == pytest.approx(same, rel=1e-9)  # two code paths agree
    assert mmd2(x, x[:1].expand(300, 5) + 0.0)[0] > diff  # a collapsed sample is farther still


def test_mmd_permutation_test_is_calibrated_under_the_null():
    """40 pairs of samples from one distribution (100 points each, 100 shuffles): at most 8 p-values below 0.05
    (expected 2; P(more than 8) < 1e-3 for a calibrated test), and the p-values are not all tiny or all large."""
    g = torch.Generator().manual_seed(2)
    ps = [mmd_permutation_test(torch.randn(100, 3, generator=g), torch.randn(100, 3, generator=g), 100, seed=i)[1]
          for i in range(40)]  # fmt: skip
    assert sum(p < 0.05 for p in ps) <= 8
    assert 0.2 < sum(ps) / len(ps) < 0.8  # uniform p-values have mean 0.5


def test_mmd_refuses_mismatched_samples():
    from pyrovae import PyrovaeError

    with pytest.raises(PyrovaeError, match="two samples"):
        mmd2(torch.zeros(5, 3), torch.zeros(5, 4))


# -------------------------------------------------------------------------------------- samplers
@pytest.fixture(scope="module")
def stage1():
    """A learned-γ Gaussian VAE (z of 4) on synthetic 12x12 images with 10 classes; γ starts at 0.05 so that
    10 short epochs reach the regime the two-stage argument is about (γ ≈ 0.04, small posterior scales)."""
    torch.manual_seed(0)
    raw = synthetic(n_train=1200, n_test=400, shape=(1, 12, 12), seed=0)
    splits = make_splits(raw, Pixels("none"), "cpu", val_size=200, seed=0)
    pyro.set_rng_seed(0)
    vae = build_vae(splits.train.shape, GaussianLearned(gamma=0.05), Arch("mlp", (64,), "tanh", 4))
    fit(vae.model, vae.guide, splits.train, epochs=10, lr=3e-3, quiet=True, seed=0)
    pyro.clear_param_store()
    return splits, vae.eval()


def test_two_stage_codes_match_the_aggregate_posterior_better_than_the_prior(stage1):
    """On held-out codes z ~ q(z|x) of 400 test images: MMD² of 400 two-stage codes is below half that of
    400 prior draws (measured: about 0.003 vs 0.017), and the prior's mismatch is real (permutation p < 0.01)."""
    splits, vae = stage1
    pyro.set_rng_seed(0)
    codes = encode(vae, splits.train, "sample")
    held_out = encode(vae, splits.test.all(), "sample").all()
    sampler, history = fit_two_stage(vae, codes, epochs=60, hidden=(64, 64), lr=3e-3, seed=0)
    assert len(history) == 60 and sampler.stage2.gamma < 1.0  # γ₂ learned, down from its start at 1
    torch.manual_seed(1)
    prior = torch.randn(400, 4)
    two_stage = sampler.sample_codes(400, prior)
    mmd_prior, p_prior = mmd_permutation_test(prior, held_out, permutations=100)
    mmd_two = mmd2(two_stage, held_out, median_bandwidth(prior, held_out))[0]
    assert p_prior < 0.01
    assert mmd_two < 0.5 * mmd_prior, (mmd_two, mmd_prior)
    images = sampler.sample(16, prior)
    assert images.shape == (16, 1, 12, 12) and bool(((images >= 0) & (images <= 1)).all())


def test_latent_gmm_sampler_shapes_and_fitted_log_likelihood(stage1):
    """Codes (n, z_dim) and images (n, 1, 12, 12) in [0, 1]; the GMM's mean log-likelihood of its own samples
    is within 0.3 nats (about 5 standard errors at n = 2000) of its mean on the codes it was fitted to, and
    it matches the held-out codes better than the prior (MMD² below half the prior's)."""
    splits, vae = stage1
    pyro.set_rng_seed(0)
    codes = encode(vae, splits.train, "sample")
    sampler = fit_latent_gmm(vae, codes, k=10, seed=0)
    gen = torch.Generator().manual_seed(0)
    z = sampler.sample_codes(2000, generator=gen)
    assert z.shape == (2000, 4)
    x = sampler.sample(8, generator=gen)
    assert x.shape == (8, 1, 12, 12) and bool(((x >= 0) & (x <= 1)).all())
    torch.manual_seed(0)
    fitted = sampler.gmm.log_prob(codes.all())
    own = sampler.gmm.log_prob(z)
    assert abs(float(own.mean()) - float(fitted.mean())) < 0.3, (float(own.mean()), float(fitted.mean()))
    held_out = encode(vae, splits.test.all(), "sample").all()
    prior = torch.randn(400, 4, generator=gen)
    bw = median_bandwidth(prior, held_out)
    assert mmd2(z[:400], held_out, bw)[0] < 0.5 * mmd2(prior, held_out, bw)[0]


def test_posterior_codes_means_and_samples(stage1):
    """``codes="mean"`` returns the encoder means exactly; ``"sample"`` draws around them with the encoder's scale."""
    splits, vae = stage1
    x = splits.test.all()[:50]
    loc, scale = vae.encoder(x)
    assert torch.equal(encode(vae, x, "mean").all(), loc.detach())
    torch.manual_seed(0)
    draws = torch.stack([encode(vae, x, "sample").all() for _ in range(200)])
    assert torch.allclose(draws.mean(0), loc.detach(), atol=5 * float(scale.detach().max()) / 200**0.5)
    with pytest.raises(Exception, match="unknown codes"):
        PosteriorCodes(loc, scale, "median")


# ------------------------------------------------------------------------------------------- CLI
TINY = ["--dataset", "synthetic", "--hidden", "32", "--z-dim", "4", "--quiet", "--epochs", "2"]


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "pyrovae", *args], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL
    )


def test_samples_cli_writes_its_files(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--likelihood", "gaussian-learned", "--binarize", "none", "--out", str(run)]) == 0
    args = ["samples", str(run), "--stage2-epochs", "2", "--stage2-hidden", "32", "--gmm-k", "5", "--n", "100"]
    assert main([*args, "--k", "10", "--referee-epochs", "1", "--quiet"]) == 0
    for name in ("samples.json", "samples.md", "samples_compare.png", "samplers.pt"):
        assert (run / name).is_file(), name
    s = json.loads((run / "samples.json").read_text())
    assert set(s["samplers"]) == {"prior", "two_stage", "latent_gmm", "aggregate_posterior", "real_val"}
    for name in ("prior", "two_stage", "latent_gmm"):
        row = s["samplers"][name]
        assert all(key in row for key in ("mmd2_pixels", "mmd2_referee", "mmd2_latent", "referee_log_likelihood"))
    assert (run / "referee" / "checkpoint.pt").is_file() and s["codes"] == "sample"


@pytest.mark.parametrize(
    "setup, message",
    [
        ("bernoulli", "needs the learned-γ Gaussian decoder"),
        ("missing", "is not a run folder"),
        ("bad-option", "expected a positive integer"),
    ],
)
def test_samples_cli_bad_input_gives_one_line_and_exit_2(tmp_path, setup, message):
    run = tmp_path / "run"
    if setup == "bernoulli":
        assert main(["train", *TINY, "--epochs", "1", "--out", str(run)]) == 0
    extra = ["--gmm-k", "0"] if setup == "bad-option" else []
    res = run_cli("samples", str(run), *extra)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr and message in lines[0], res.stderr
    assert not (run / "samples.json").exists()


def test_stage2_is_the_built_in_vae_on_codes():
    """The stage-2 VAE is a :class:`VAE` (no program of its own): its model's log joint at given u and codes is
    log N(u; 0, I) + log N(z; decoder(u), γ₂ I) (float32 rounding), γ₂ = exp(GAMMA_GAIN · raw); ``sample`` adds
    N(0, γ₂) noise to the decoder's mean: the residual's sd is √γ₂ within 3% (16,000 draws: its s.e. is 0.6%)."""
    import pyro.distributions as dist
    import pyro.poutine as poutine

    from pyrovae.models.two_stage import LatentVAE
    from pyrovae.models.vae import VAE

    torch.manual_seed(0)
    stage2 = LatentVAE(4, hidden=(16,))
    assert isinstance(stage2, VAE) and type(stage2).model is VAE.model and type(stage2).guide is VAE.guide
    with torch.no_grad():
        stage2.likelihood.raw_log_gamma.fill_(-0.1)
    gamma = float(torch.tensor(-1.0).exp())
    assert stage2.gamma == pytest.approx(gamma, rel=1e-6)
    codes, u = torch.randn(5, 4), torch.randn(5, 4)
    tr = poutine.trace(poutine.condition(stage2.model, {"z": u})).get_trace(codes)
    expected = (
        dist.Normal(0.0, 1.0).log_prob(u).sum() + dist.Normal(stage2.decoder(u), gamma**0.5).log_prob(codes).sum()
    )
    assert float(tr.log_prob_sum().detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    torch.manual_seed(1)
    noisy = stage2.sample(4000, codes)
    torch.manual_seed(1)
    mean = stage2.sample(4000, codes, noise=False)
    assert float((noisy - mean).std()) == pytest.approx(gamma**0.5, rel=0.03)
