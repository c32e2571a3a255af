"""The command line: training runs through every estimator, bad input gives one line and exit 2, Ctrl-C saves."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pyrovae.cli import main
from pyrovae.data import synthetic, write_idx_folder
from pyrovae.train import load_checkpoint

SMALL = ["--dataset", "synthetic", "--hidden", "32", "--z-dim", "4", "--batch-size", "100", "--quiet"]


def run_cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "pyrovae", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("elbo", ["trace", "meanfield", "iwae"])
def test_train_through_the_cli(tmp_path, elbo):
    out = tmp_path / elbo
    assert main(["train", *SMALL, "--elbo", elbo, "--epochs", "2", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert all(float(r["val_elbo"]) < 0 and float(r["seconds"]) > 0 for r in rows)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["training"]["elbo"] == elbo and cfg["data"]["dataset"] == "synthetic" and cfg["facts"]["n_train"] > 0
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 2


def test_idx_folder_through_the_cli(tmp_path):
    folder = write_idx_folder(synthetic(n_train=300, n_test=50, seed=0), tmp_path / "data")
    out = tmp_path / "run"
    args = ["train", "--dataset", "mnist", "--data-dir", str(folder), "--val-size", "50", "--hidden", "16"]
    assert main([*args, "--z-dim", "2", "--epochs", "1", "--quiet", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["facts"]["data_source"] == str(folder)


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--epochs", "0"], "expected a positive integer, got '0'"),
        (["train", "--elbo", "nope"], "invalid choice: 'nope'"),
        (["train", "--lr", "-1"], "expected a positive number"),
        (["train", "--dataset", "mnist", "--data-dir", "/nonexistent/x"], "--data-dir /nonexistent/x does not exist"),
        (["train", *SMALL, "--binarize", "none"], "needs binary pixels"),
        (["train", *SMALL, "--binarize", "fixed", "--dequantize"], "dequantisation applies to continuous pixels only"),
        (["train", *SMALL, "--elbo", "renyi"], "needs --alpha"),
        (["train", *SMALL, "--device", "tpu"], "unknown device 'tpu'"),
        (["bogus"], "invalid choice: 'bogus'"),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(tmp_path, args, message):
    env_free = [a if a != "/nonexistent/x" else str(tmp_path / "missing") for a in args]
    res = run_cli(*env_free, "--out", str(tmp_path / "o")) if args[0] == "train" else run_cli(*args)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert message.replace("/nonexistent/x", str(tmp_path / "missing")) in lines[0]
    assert not (tmp_path / "o" / "checkpoint.pt").exists()


def test_existing_run_is_not_overwritten_and_resume_checks_options(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--epochs", "1", "--out", str(out)]) == 0
    before = (out / "checkpoint.pt").read_bytes()
    res = run_cli("train", *SMALL, "--epochs", "1", "--out", str(out))
    assert res.returncode == 2 and "already holds a run; pass --resume" in res.stderr
    assert (out / "checkpoint.pt").read_bytes() == before
    res = run_cli("train", "--out", str(out), "--resume", "--lr", "0.5")
    assert res.returncode == 2 and "differ from it: lr" in res.stderr
    assert main(["train", "--out", str(out), "--resume", "--epochs", "2", "--quiet"]) == 0
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 2


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyrovae", "train", *SMALL, "--epochs", "100000", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    assert (out / "checkpoint.pt").exists(), "no checkpoint after 120 s"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "checkpoint saved" in err
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["epoch"] >= 1
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]  # no half-written files left
