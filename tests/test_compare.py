"""`pyrovae compare`: both representations end to end, loading from run folders, clustering scores."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from pyrovae.cli import main
from pyrovae.tasks.compare import clustering_scores

QUICK = ["--dataset", "synthetic", "--epochs", "2", "--gmm-epochs", "3", "--k", "40", "--n", "150", "--quiet"]


def test_clustering_scores_match_known_cases():
    labels = np.repeat(np.arange(4), 25)
    permuted = (labels + 1) % 4  # a perfect clustering under other names
    assert clustering_scores(labels, permuted) == {
        "nmi": pytest.approx(1.0),
        "ari": pytest.approx(1.0),
        "accuracy": 1.0,
    }
    merged = np.where(labels == 3, 2, labels)  # two classes in one cluster: the best matching gets 75 of 100
    assert clustering_scores(labels, merged)["accuracy"] == 0.75
    rng = np.random.default_rng(0)
    noise = clustering_scores(labels, rng.integers(0, 4, 100))
    assert noise["ari"] < 0.1 and noise["nmi"] < 0.15  # chance level (ARI's expectation is 0)


@pytest.mark.parametrize("representation", ["binary", "dequantized"])
def test_compare_end_to_end_and_from_run_folders(tmp_path, representation):
    out = tmp_path / "cmp"
    assert main(["compare", *QUICK, "--representation", representation, "--out", str(out)]) == 0
    s = json.loads((out / "compare.json").read_text())
    assert s["representation"] == representation and s["n_test"] == 150
    vae, gmm = s["models"]["vae"], s["models"]["gmm"]
    assert gmm["likelihood_kind"] == "exact" and vae["likelihood_kind"] == "importance-sampled, K=40"
    assert vae["log_likelihood"] >= vae["elbo"]  # log p-hat with K=40 >= the ELBO over the same draws
    for row in (vae, gmm):
        assert 0 <= row["clustering"]["accuracy"] <= 1 and row["parameters"] > 0 and row["bits_per_dim"] > 0
    for png in ("samples_vae_vs_mixture.png", "mixture_means.png", "latents_by_cluster.png"):
        assert (out / png).stat().st_size > 0
    # the mixture's run folder: a typed config of kind gmm, its buffers in the checkpoint (no separate model.pt)
    gmm_cfg = json.loads((out / "gmm" / "config.json").read_text())
    assert gmm_cfg["kind"] == "gmm" and gmm_cfg["model"]["k"] == 10 and not (out / "gmm" / "model.pt").exists()
    assert "never compare across representations" in (out / "compare.md").read_text()
    # the same comparison from the saved run folders gives the same numbers (same seed, same draws)
    again = tmp_path / "again"
    args = ["--vae-run", str(out / "vae"), "--gmm-run", str(out / "gmm"), "--no-figures", "--out", str(again)]
    assert main(["compare", *QUICK, "--representation", representation, *args]) == 0
    s2 = json.loads((again / "compare.json").read_text())
    assert s2["models"]["gmm"]["log_likelihood"] == pytest.approx(gmm["log_likelihood"], rel=1e-6)
    assert s2["models"]["vae"]["log_likelihood"] == pytest.approx(vae["log_likelihood"], rel=1e-6)
    assert "k̂ > 0.7 for" in (out / "compare.md").read_text()  # every IS number beside its share of bad k̂
    if representation == "binary":  # --method ais: the VAE's row by AIS, labelled, with its IS number beside it
        ais_out = tmp_path / "ais"
        ais = ["--method", "ais", "--steps", "3", "--chains", "2", "--leapfrog", "2", "--out", str(ais_out)]
        assert main(["compare", *QUICK, "--representation", representation, *args[:4], "--no-figures", *ais]) == 0
        row = json.loads((ais_out / "compare.json").read_text())["models"]["vae"]
        assert row["estimator"] == "ais" and row["likelihood_kind"].startswith("AIS, 3 steps x 2 chains")
        assert row["importance_sampled"]["log_likelihood"] == pytest.approx(vae["log_likelihood"], rel=1e-6)
        assert "IS K=40" in (ais_out / "compare.md").read_text()


def test_compare_refuses_mismatched_runs_and_overwrites(tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", *QUICK, "--representation", "dequantized", "--no-figures", "--out", str(out)]) == 0
    before = (out / "compare.json").read_bytes()
    for args, message in [
        (["--vae-run", str(out / "vae"), "--out", str(tmp_path / "x")], "trained on another representation"),
        (["--out", str(out)], "already holds a comparison; pass --overwrite"),
        (["--gmm-k", "0"], "expected a positive integer"),
    ]:
        res = subprocess.run(
            [sys.executable, "-m", "pyrovae", "compare", *QUICK, *args], capture_output=True, text=True
        )
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and message in res.stderr, res.stderr
    assert (out / "compare.json").read_bytes() == before


def test_the_makefile_demo_command_parses():
    # `make demo` is the README's first command: every option it passes must exist
    import re
    import shlex
    from pathlib import Path

    from pyrovae.cli import build_parser

    text = (Path(__file__).resolve().parent.parent / "Makefile").read_text().replace("\\\n", " ")
    line = re.search(r"\$\(BIN\)/pyrovae (compare[^\n]*)", text).group(1)
    args = build_parser().parse_args(shlex.split(line))
    assert args.command == "compare" and args.download and args.dataset == "fashion-mnist"


def test_run_compare_takes_typed_options_and_refuses_a_bad_representation(tmp_path):
    # the library entry point takes a CompareOptions (no argparse); bad settings are one PyrovaeError
    import dataclasses

    from pyrovae.errors import PyrovaeError
    from pyrovae.tasks.compare import CompareOptions, run_compare

    options = CompareOptions(out=str(tmp_path / "c"), representation="jpeg")
    assert dataclasses.is_dataclass(options) and options.dataset == "fashion-mnist" and options.k == 1000
    with pytest.raises(PyrovaeError, match="unknown representation 'jpeg'"):
        run_compare(options)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.k = 5  # type: ignore[misc]
    assert not (tmp_path / "c").exists()  # refused before anything is written
