"""The examples run end to end (on small synthetic data) and learn something."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_example(tmp_path):
    test_elbo = load("train_fashion_mnist").main(["--dataset", "synthetic", "--epochs", "2", "--out", str(tmp_path)])
    assert -600 < test_elbo < 0 and (tmp_path / "checkpoint.pt").exists()


def test_user_written_two_layer_model_trains():
    mod = load("two_layer_vae")
    one = mod.main(["--dataset", "synthetic", "--epochs", "1"])
    four = mod.main(["--dataset", "synthetic", "--epochs", "6"])
    assert four > one  # more training, a better ELBO (the gap here is tens of nats, MC error < 1)


@pytest.mark.parametrize("elbos", [["trace", "meanfield", "iwae"]])
def test_compare_elbos_example(elbos):
    results = load("compare_elbos").main(["--dataset", "synthetic", "--epochs", "1", "--elbos", *elbos])
    assert set(results) == set(elbos) and all(-600 < v < 0 for v in results.values())


def test_missing_pixels_example(tmp_path):
    out = load("missing_pixels").main(
        ["--dataset", "synthetic", "--epochs", "2", "--n", "50", "--k", "100", "--out", str(tmp_path)]
    )
    assert (tmp_path / "completions.png").exists() and out["log_p_missing"] < 0


def test_inference_gap_example():
    args = ["--dataset", "synthetic", "--epochs", "1", "--n", "5", "--steps", "20", "--k", "100", "--nuts-points", "1"]
    out = load("inference_gap").main([*args, "--warmup", "20", "--samples", "20"])
    # the two gaps split log p-hat - L[q] exactly, by construction
    total = out["approximation_gap"] + out["amortization_gap"]
    assert abs(total - (out["log_likelihood"] - out["elbo_q"])) < 1e-3


QUICK_COMPARE = ["--dataset", "synthetic", "--epochs", "1", "--train-size", "400", "--k", "10", "--n", "50"]


def _check_comparison(summary: dict, mine: str, out) -> None:
    """The user's program sits in the same report as the mixture, scored by the same code."""
    rows = summary["models"]
    assert mine in rows and rows["gmm"]["likelihood_kind"] == "exact"
    assert rows[mine]["likelihood_kind"] == "importance-sampled, K=10"
    assert rows[mine]["log_likelihood"] >= rows[mine]["elbo"]  # log p-hat >= the ELBO over the same draws
    for row in rows.values():
        assert -600 < row["log_likelihood"] < 0 and row["clustering"] is not None
    assert (out / "compare.json").exists() and rows[mine]["model"] in (out / "compare.md").read_text()


def test_tutorial_vae_example_is_compared_with_the_gmm(tmp_path):
    summary = load("tutorial_vae").main([*QUICK_COMPARE, "--gmm-k", "4", "--out", str(tmp_path)])
    assert set(summary["models"]) == {"tutorial", "vae", "gmm"}
    _check_comparison(summary, "tutorial", tmp_path)


def test_conditional_vae_example_is_compared_with_the_gmm(tmp_path):
    summary = load("conditional_vae").main([*QUICK_COMPARE, "--gmm-k", "4", "--out", str(tmp_path)])
    _check_comparison(summary, "cvae", tmp_path)


def test_enumerated_vae_example_sums_its_class_exactly(tmp_path):
    mod = load("enumerated_vae")
    summary = mod.main([*QUICK_COMPARE, "--gmm-k", "4", "--out", str(tmp_path)])
    _check_comparison(summary, "enumerated", tmp_path)

    # log_likelihood of the enumerated program against the same model with the class summed by hand in a
    # factor: the guide draws the same z (same seed), so the two agree to float32 rounding (1e-3 nats of ~500)
    import pyro
    import pyro.distributions as dist
    import torch

    import pyrovae

    vae = mod.EnumeratedVAE(20, n_classes=3, d_z=2, hidden=8)
    x = (torch.rand(5, 20, generator=torch.Generator().manual_seed(0)) < 0.4).float()

    def by_hand(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
            c = torch.arange(3).reshape(3, *[1] * (z.dim() - 1))
            per_class = dist.Bernoulli(logits=vae.decode(z, c)).to_event(1).log_prob(x)
            pyro.factor("x", torch.logsumexp(per_class, dim=0) - torch.log(torch.tensor(3.0)))

    pyro.set_rng_seed(4)
    enumerated = pyrovae.log_likelihood(vae.model, vae.guide, x, num_samples=50)
    pyro.set_rng_seed(4)
    summed = pyrovae.log_likelihood(by_hand, vae.guide, x, num_samples=50)
    assert torch.allclose(enumerated, summed, atol=1e-3), (enumerated, summed)


# ------------------------------------------------------------------ Pyro's example programs as users bring them
def test_pyro_cvae_example_trains_by_fit_as_by_svi_and_scores_log_p_y_given_x():
    # Pyro's conditional VAE as its example writes it (unsized plate, pyro.module in the model only, a frozen
    # baseline, boolean-mask indexing): fit and SVI from the same start take the same steps, so their per-image
    # ELBOs agree to float32 rounding; log p(y | x) is finite and above the ELBO of the last epoch (a bound).
    out = load("pyro_cvae").main(
        ["--dataset", "synthetic", "--train-size", "300", "--test-size", "20", "--epochs", "2", "--k", "20", "--svi",
         "--hidden", "64", "--z-dim", "8"]  # fmt: skip
    )
    for ours, theirs in zip(out["fit_elbo"], out["svi_elbo"]):
        assert abs(ours - theirs) < 1e-3 * abs(theirs)
    assert out["fit_elbo"][1] > out["fit_elbo"][0]
    assert -1000 < out["log_p_y_given_x"] < 0


def test_pyro_ssvae_example_trains_with_its_auxiliary_loss():
    # The SS-VAE's enumerated guide and its classifier term through one fit: on the synthetic prototypes (10
    # classes, chance 0.1) 100 labels give q(y | x) an accuracy far above chance within one epoch.
    out = load("pyro_ssvae").main(["--dataset", "synthetic", "--train-size", "500", "--epochs", "1", "--labels", "100"])
    assert out["accuracy"] > 0.5


def test_markov_model_example_scores_each_sequence_as_the_kalman_filter():
    # A sequential latent (pyro.markov inside the plate of sequences) trains by fit, and log_likelihood of the
    # trained linear-Gaussian model matches the Kalman filter's exact log p per sequence. IS is a stochastic lower
    # bound: below the truth by its bias (measured 0.015 nats at this training budget, 0.14 at 40 epochs, where the
    # guide is worse), above it only by the Monte Carlo noise of a mean over 50 sequences (sd ~0.01 nats at K = 2000).
    out = load("markov_model").main(["--linear", "--sequences", "200", "--epochs", "100", "--k", "2000"])
    assert -0.1 < out["log_p"] - out["exact_log_p"] < 0.05
