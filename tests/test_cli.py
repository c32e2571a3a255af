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


def _options(parser) -> dict[str, object]:
    """A parser's optional arguments by option string."""
    return {s: a for a in parser._actions for s in a.option_strings if s.startswith("--")}


def _subparsers() -> dict[str, object]:
    import argparse

    from pyrovae.cli import build_parser

    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_training_command_has_every_training_option():
    # train and train-masked build the same run config: each must accept every option of the shared groups,
    # with the same type and choices (train-masked lacked --lr-schedule, --lr-gamma, --warmup-epochs, --autocast)
    import argparse

    from pyrovae.cli.options import add_data_options, add_model_options, add_run_options, add_training_options

    groups = argparse.ArgumentParser()
    for add in (add_data_options, add_model_options, add_training_options):
        add(groups)
    add_run_options(groups, "runs/x")
    shared = _options(groups)
    assert {"--lr-schedule", "--lr-gamma", "--warmup-epochs", "--autocast", "--clip-norm", "--val-size"} <= set(shared)
    commands = _subparsers()
    for name in ("train", "train-masked"):
        options = _options(commands[name])
        assert set(shared) <= set(options), (name, set(shared) - set(options))
        for flag, action in shared.items():
            assert (options[flag].type, options[flag].choices) == (action.type, action.choices), (name, flag)


def test_data_options_share_their_choices_across_commands():
    commands = _subparsers()
    for flag in ("--dataset", "--binarize"):
        having = {name: _options(p)[flag] for name, p in commands.items() if flag in _options(p)}
        assert len(having) >= 3, (flag, sorted(having))  # train, train-masked and compare/semisupervised
        choices = {name: tuple(a.choices) for name, a in having.items()}
        assert len(set(choices.values())) == 1 and None not in choices.values(), choices
    assert {"compare", "semisupervised"} <= {n for n, p in commands.items() if "--dataset" in _options(p)}
    # commands outside the training config keep their own defaults for the shared options
    compare = commands["compare"].parse_args([])
    assert compare.dataset == "fashion-mnist" and compare.download is False
    assert commands["semisupervised"].parse_args([]).binarize == "dynamic"


def test_library_modules_do_not_import_the_cli():
    # the CLI is a layer on top: importing any library module must not pull in pyrovae.cli (no import cycle)
    import pkgutil

    import pyrovae

    names = [
        m.name for m in pkgutil.walk_packages(pyrovae.__path__, "pyrovae.") if not m.name.startswith("pyrovae.cli")
    ]
    names = [n for n in names if n != "pyrovae.__main__"]
    assert "pyrovae.tasks.evaluate" in names and "pyrovae.tasks.compare" in names
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "    assert 'pyrovae.cli' not in sys.modules, name\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_library_code_knows_nothing_of_argparse():
    from pathlib import Path

    import pyrovae

    root = Path(pyrovae.__file__).parent
    offenders = [
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if "cli" not in p.relative_to(root).parts and "argparse" in p.read_text()
    ]
    assert offenders == []
