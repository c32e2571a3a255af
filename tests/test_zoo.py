"""``pyrovae zoo`` on tiny synthetic data: the leaderboard files, resuming an interrupted zoo, one-line refusals."""

from __future__ import annotations

import json
import math

import pytest

from pyrovae.cli import main
from pyrovae.tasks.zoo import ZooOptions, orderings, run_zoo

TINY = ["zoo", "--dataset", "synthetic", "--train-size", "200", "--epochs", "1", "--k", "40", "--n", "10", "--estimator", "is", "--quiet"]


def test_zoo_writes_the_leaderboard_and_adds_models(tmp_path, capsys):
    out = tmp_path / "zoo"
    assert main([*TINY, "--models", "gmm,vae", "--out", str(out)]) == 0
    assert "zoo of 2 models" in capsys.readouterr().out
    board = json.loads((out / "leaderboard.json").read_text())
    assert [r["model"] for r in board["rows"]] == ["vae", "gmm"]
    for r in board["rows"]:
        assert math.isfinite(r["log_likelihood"]) and r["log_likelihood"] >= r["elbo"]  # same K draws: Jensen
        assert r["estimator"] == "IS, K=40" and 0 <= r["khat_bad"] <= 1 and r["parameters"] > 0
    gmm = board["rows"][1]
    assert gmm["log_likelihood"] == pytest.approx(gmm["elbo"], abs=1e-4)  # an empty guide: IS is exact
    md = (out / "leaderboard.md").read_text()
    assert "| vae |" in md and "| gmm |" in md and (out / "leaderboard.png").stat().st_size > 0
    # the VAE's inference gap is split as `pyrovae gap` splits it; the two parts add up to log p̂(q*) − L[q]
    vae = board["rows"][0]
    assert vae["gap_family"] == "GaussianFamily" and vae["gap_n"] == 10 and "| vae | GaussianFamily | 10 | 500 |" in md
    assert vae["amortization_gap"] > -0.5 and math.isfinite(vae["approximation_gap"])
    # beside it, the same L[q*] under the row's own log p̂ of the same (first) images
    pts = json.loads((out / "vae" / "score.json").read_text())
    lp, gp = pts["points"]["log_likelihood"], pts["gap_points"]
    assert len(gp["elbo_qstar"]) == len(gp["approximation_gap_by_row_estimate"]) == 10
    for i in range(10):
        assert gp["approximation_gap_by_row_estimate"][i] == pytest.approx(lp[i] - gp["elbo_qstar"][i], abs=1e-9)
    assert set(vae["seconds"]) == {"train", "score", "gap"} and set(gmm["seconds"]) == {"train", "score"}
    assert all(v > 0 for v in vae["seconds"].values())  # each phase's wall time, for the full setting's run time
    trained = (out / "vae" / "checkpoint.pt").stat().st_mtime_ns
    # a zoo model's folder is a run folder for `pyrovae gap`; the mixture (no latent z) is refused in one line
    capsys.readouterr()
    assert main(["gap", str(out / "vae"), "--n", "3", "--steps", "5", "--k", "20", "--nuts-points", "0", "--quiet"]) == 0
    assert json.loads((out / "vae" / "gap.json").read_text())["family"] == "GaussianFamily"
    assert main(["gap", str(out / "gmm"), "--n", "3", "--nuts-points", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "one latent site 'z'; this model's guide samples no latent" in err[0]
    assert not (out / "gmm" / "gap.json").exists()
    # a second zoo in the same folder: scored rows are kept as they are, new models join the leaderboard
    assert main([*TINY, "--models", "vae,discrete", "--out", str(out)]) == 0
    board = json.loads((out / "leaderboard.json").read_text())
    assert [r["model"] for r in board["rows"]] == ["vae", "discrete", "gmm"]
    assert (out / "vae" / "checkpoint.pt").stat().st_mtime_ns == trained


def test_interrupted_zoo_resumes_where_it_stopped(tmp_path):
    out = tmp_path / "zoo"
    lines: list[str] = []

    def stop_after_first_epoch(line: str) -> None:
        lines.append(line)
        if line.startswith("vae: epoch 1/2"):
            raise KeyboardInterrupt

    opts = ZooOptions(str(out), models="vae", dataset="synthetic", train_size=200, epochs=2, k=20, n=5, estimator="is",
                      figures=False, log=stop_after_first_epoch)  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        run_zoo(opts)
    assert not (out / "vae" / "score.json").exists() and (out / "vae" / "checkpoint.pt").exists()
    lines.clear()
    opts.log = lines.append
    s = run_zoo(opts)
    assert "vae: resuming after epoch 1" in lines and "vae: epoch 2/2, " in " ".join(lines)
    assert not any(line.startswith("vae: epoch 1/2") for line in lines)  # epoch 1 was not trained again
    assert s["rows"][0]["epochs"] == 2


def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "zoo"
    assert main([*TINY, "--models", "vae,pythae", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown zoo model 'pythae'; choose all or some of vae" in err[0]
    assert not out.exists()
    assert main([*TINY, "--models", "gmm", "--out", str(out)]) == 0
    before = (out / "leaderboard.json").read_bytes()
    capsys.readouterr()
    assert main([*TINY, "--models", "gmm", "--k", "41", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a zoo with k = 40, not 41" in err[0]
    assert (out / "leaderboard.json").read_bytes() == before


def test_orderings_compare_the_named_rows():
    rows = [{"model": "vae", "log_likelihood": -100.0, "approximation_gap": 3.0,
             "points": {"log_likelihood": [-99.0, -101.0]}, "gap_points": {"approximation_gap": [2.0, 4.0]}},
            {"model": "flow", "log_likelihood": -99.0, "approximation_gap": 2.0,
             "gap_points": {"approximation_gap": [1.0, 3.1]}},
            {"model": "vampprior", "log_likelihood": -101.0,
             "points": {"log_likelihood": [-100.5, -101.5]}},
            {"model": "hvae", "log_likelihood": -98.0}]  # fmt: skip
    checks = {c["claim"]: c for c in orderings(rows)}
    vamp = checks["VampPrior ≥ standard prior"]
    assert vamp["holds"] is False and vamp["difference"] == -1.0
    assert vamp["difference_se"] == pytest.approx(0.5)  # differences -1.5 and -0.5: sd 0.707, over sqrt(2)
    assert vamp["verdict"] == "within noise"  # |-1.0| is not beyond 2 s.e.
    flow = checks["flow guide's approximation gap < diagonal Gaussian's"]  # paired over the gap's own images
    assert flow["holds"] is True and flow["difference"] == -1.0
    assert flow["difference_se"] == pytest.approx(0.05) and flow["verdict"] == "yes"  # differences -1.0, -0.9
    layers = checks["two stochastic layers ≥ one"]
    assert layers["difference_se"] is None and layers["verdict"] == "yes"  # no per-image numbers: the sign alone
    assert len(checks) == 3  # the others need rows that are not here
    del rows[1]["approximation_gap"]  # a flow row scored before the split existed: no claim, not a wrong one
    assert len(orderings(rows)) == 2


def test_zoo_scores_by_ais_and_keeps_is_beside_it(tmp_path):
    # --estimator ais: the VAE's row is AIS with the IS number and k̂ kept; the mixture (no continuous latent) keeps
    # its exact IS number and its label says why AIS did not run. AIS and IS of the same images agree within a few
    # nats on this tiny, barely trained model (both estimate the same log p; IS K=40 is biased low by its gap).
    out = tmp_path / "zoo"
    assert main([*TINY, "--models", "gmm,vae", "--estimator", "ais", "--out", str(out)]) == 0
    rows = {r["model"]: r for r in json.loads((out / "leaderboard.json").read_text())["rows"]}
    vae = rows["vae"]
    assert vae["estimator"].startswith("AIS, ") and 0 < vae["ais_acceptance"] < 1
    assert math.isfinite(vae["log_likelihood"]) and abs(vae["log_likelihood"] - vae["is_log_likelihood"]) < 5
    assert "AIS refused" in rows["gmm"]["estimator"] and rows["gmm"]["estimator"].startswith("IS, K=40")
