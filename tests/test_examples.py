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
