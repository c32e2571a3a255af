"""Missing pixels: masks, the masked likelihood (exact), SNIS completion against a baseline, and the CLI."""

from __future__ import annotations

import json
import math

import pyro
import pyro.poutine as poutine
import pytest
import torch
import torch.nn.functional as F
from pyro.infer import Trace_ELBO

from pyrovae import fit
from pyrovae.cli import main
from pyrovae.models.masked import MaskedImageData, build_masked_vae, make_masks
from pyrovae.tasks.complete import (
    baseline_log_likelihood,
    completion_log_likelihood,
    observed_log_weights,
    sample_completions,
)
from pyrovae.train import load_checkpoint

from .conftest import SMALL

TINY = ["--dataset", "synthetic", "--hidden", "32", "--z-dim", "4", "--batch-size", "100", "--quiet"]


@pytest.fixture
def masked_vae(tiny_splits):
    torch.manual_seed(0)
    return build_masked_vae(tiny_splits.train.shape, "bernoulli", SMALL, pixel_mean=tiny_splits.train_pixel_mean)


def test_masks():
    shape = (2, 10, 8)
    top = make_masks(5, shape, "top-half")
    assert top.shape == (5, *shape) and top.dtype == torch.bool
    assert not top[:, :, :5].any() and top[:, :, 5:].all()
    g = torch.Generator().manual_seed(0)
    rand = make_masks(400, shape, "random", 0.3, generator=g)
    assert torch.equal(rand[:, 0], rand[:, 1])  # a missing pixel misses all its channels
    n = rand[:, 0].numel()
    assert abs((~rand[:, 0]).float().mean().item() - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n)  # binomial, 4 sd
    mix = make_masks(200, shape, "mix", 0.3, generator=g)
    is_top = (mix == top[:1]).flatten(1).all(1)
    assert 0 < int(is_top.sum()) < 200  # both kinds occur


def test_fixed_masks_are_fixed_and_training_masks_fresh(tiny_splits):
    fixed = MaskedImageData(tiny_splits.test, "random", 0.5, fixed_seed=3)
    idx = torch.arange(50)
    (x1, m1), (x2, m2) = fixed.batch(idx), fixed.batch(idx)
    assert torch.equal(x1, x2) and torch.equal(m1, m2)
    train = MaskedImageData(tiny_splits.train, "random", 0.5)
    assert not torch.equal(train.batch(idx)[1], train.batch(idx)[1])


def test_missing_pixels_do_not_enter_the_likelihood(masked_vae, tiny_splits):
    """Exact: the loss is bit-identical whatever the missing pixels hold (flipped, NaN), and the
    observed site's log-prob is the sum over observed pixels only."""
    x, m = MaskedImageData(tiny_splits.test, "random", 0.5, fixed_seed=1).batch(torch.arange(64))
    flipped = torch.where(m, x, 1 - x)
    nan = torch.where(m, x, torch.nan)
    losses, grads = [], []
    for xs in (x, flipped, nan):
        pyro.set_rng_seed(7)
        masked_vae.zero_grad()
        loss = Trace_ELBO().differentiable_loss(masked_vae.model, masked_vae.guide, xs, m)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in masked_vae.parameters() if p.grad is not None]))
    assert losses[0] == losses[1] == losses[2]
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])

    guide_tr = poutine.trace(masked_vae.guide).get_trace(x, m)
    model_tr = poutine.trace(poutine.replay(masked_vae.model, trace=guide_tr)).get_trace(x, m)
    z = guide_tr.nodes["z"]["value"]
    bce = -F.binary_cross_entropy_with_logits(masked_vae.decoder(z), x, reduction="none")
    site = model_tr.nodes["x"]["fn"].log_prob(x)
    assert torch.allclose(site, (bce * m).flatten(1).sum(1), rtol=1e-6, atol=1e-4)
    assert not torch.allclose(site, bce.flatten(1).sum(1), atol=1.0)  # the mask took pixels out
    # the completion code's log-weights are the Pyro programs' log p(x_obs, z) - log q(z)
    model_tr.compute_log_prob()
    guide_tr.compute_log_prob()
    log_w = model_tr.nodes["x"]["log_prob"] + model_tr.nodes["z"]["log_prob"] - guide_tr.nodes["z"]["log_prob"]
    ours, lp_miss = observed_log_weights(masked_vae, x, m, z)
    assert torch.allclose(ours, log_w, rtol=1e-6, atol=1e-3)
    assert torch.allclose(lp_miss, (bce * ~m).flatten(1).sum(1), rtol=1e-6, atol=1e-4)


def test_completion_beats_the_mean_pixel_baseline(masked_vae, tiny_splits):
    """After a short training on mixed masks, SNIS log p(x_miss | x_obs) beats the per-pixel training
    mean on 200 test images: the mean paired difference exceeds 3 standard errors (over images)."""
    pyro.set_rng_seed(0)
    train = MaskedImageData(tiny_splits.train, "mix", 0.5)
    fit(masked_vae.model, masked_vae.guide, train, epochs=30, batch_size=50, lr=3e-3, quiet=True, seed=0)
    train_x = tiny_splits.train.batch(torch.arange(len(tiny_splits.train)))
    for kind in ("top-half", "random"):
        x, m = MaskedImageData(tiny_splits.test, kind, 0.5, fixed_seed=5).batch(torch.arange(200))
        res = completion_log_likelihood(masked_vae, x, m, k=500)
        diff = (res.log_p_missing - baseline_log_likelihood(train_x, x, m, binary=True)).double()
        sem = diff.std() / math.sqrt(len(diff))
        assert diff.mean() > 3 * sem, (kind, diff.mean(), sem)
        assert res.bias.abs().mean() < 0.1 * diff.mean()  # the SNIS bias is small against the effect
        assert bool((res.ess >= 1).all() & (res.ess <= 500 + 1e-3).all())
    draws = sample_completions(masked_vae, x[:4], m[:4], num=3, k=200)
    assert draws.shape == (3, 4, *x.shape[1:])
    assert torch.equal(torch.where(m[:4], draws, 0), torch.where(m[:4], x[:4], 0).expand_as(draws))
    assert bool(((draws == 0) | (draws == 1)).all())


def test_cli_train_masked_and_complete(tmp_path, capsys):
    run = tmp_path / "masked"
    assert main(["train-masked", *TINY, "--epochs", "1", "--mask", "random", "--rate", "0.4", "--out", str(run)]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["kind"] == "masked" and cfg["extra"] == {"mask": "random", "rate": 0.4}
    assert main(["complete", str(run), "--k", "50", "--n", "20", "--show", "3", "--completions", "2"]) == 0
    s = json.loads((run / "complete.json").read_text())
    assert s["n"] == 20 and s["k"] == 50 and s["missing_per_image"] == 14 * 28  # top half of 28 rows
    assert math.isfinite(s["log_p_missing"]) and math.isfinite(s["baseline_log_p_missing"])
    assert (run / "complete.md").read_text().startswith("# Completion") and (run / "completions.png").stat().st_size
    capsys.readouterr()

    plain = tmp_path / "plain"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(plain)]) == 0
    capsys.readouterr()
    for args, message in (
        (["complete", str(plain)], "was not trained by 'pyrovae train-masked'"),
        (["complete", str(tmp_path / "nope")], "no run folder"),
    ):
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]
    with pytest.raises(SystemExit) as exc:
        main(["complete", str(run), "--rate", "1.5"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "expected a missing rate in (0, 1)" in err[0]


def test_cli_train_masked_takes_the_schedule_warmup_and_autocast_options_of_train(tmp_path, capsys):
    # the four training options train-masked lacked: recorded in its config and acted on in training
    import csv

    from pyrovae.tasks.complete import load_masked_run

    run = tmp_path / "masked"
    schedule = ["--lr", "0.01", "--lr-schedule", "exponential", "--lr-gamma", "0.5", "--warmup-epochs", "2"]
    assert main(["train-masked", *TINY, "--epochs", "2", *schedule, "--autocast", "bf16", "--out", str(run)]) == 0
    cfg = json.loads((run / "config.json").read_text())
    t = cfg["training"]
    assert (t["lr_schedule"], t["lr_gamma"], t["warmup_epochs"], cfg["model"]["autocast"]) == (
        "exponential",
        0.5,
        2.0,
        "bf16",
    )
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert float(rows[1]["lr"]) == pytest.approx(0.5 * float(rows[0]["lr"]))  # the exponential schedule ran
    assert float(rows[0]["beta"]) < 1.0  # KL warm-up ran
    assert load_masked_run(run, "cpu")[2].autocast == torch.bfloat16
    capsys.readouterr()


def test_cli_train_masked_resume_equals_uninterrupted(tmp_path, capsys):
    # 2 epochs in one go, and 1 epoch then --resume to 2: the same parameters, bitwise (the checkpoint holds the
    # RNG state, so the masks and binarisations drawn in epoch 2 are the same)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    args = ["train-masked", *TINY, "--mask", "random", "--rate", "0.4"]
    assert main([*args, "--epochs", "2", "--out", str(whole)]) == 0
    assert main([*args, "--epochs", "1", "--out", str(cut)]) == 0
    capsys.readouterr()
    for extra, message in (
        ([], "already holds a run; pass --resume"),
        (["--resume", "--mask", "top-half"], "differ from it: mask"),
        (["--resume", "--rate", "0.3"], "differ from it: rate"),
        (["--resume", "--overwrite"], "exclude each other"),
    ):
        assert main(["train-masked", "--out", str(cut), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert main(["train", "--out", str(cut), "--resume", "--epochs", "2"]) == 2
    assert "continue it with 'pyrovae train-masked --resume'" in capsys.readouterr().err
    first = load_checkpoint(cut / "checkpoint.pt")["history"]
    assert main(["train-masked", "--out", str(cut), "--resume", "--epochs", "2", "--quiet"]) == 0
    a, b = load_checkpoint(whole / "checkpoint.pt"), load_checkpoint(cut / "checkpoint.pt")
    assert b["history"][:1] == first  # epoch 1 was kept (its timing too), not trained again
    assert a["epoch"] == b["epoch"] == 2
    assert a["params"].keys() == b["params"].keys()
    assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
    ma, mb = a["modules"]["model"], b["modules"]["model"]  # the masked VAE's parameters, by module key
    assert ma.keys() == mb.keys() and len(ma) > 0
    assert all(torch.equal(ma[k], mb[k]) for k in ma)

    plain = tmp_path / "plain"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(plain)]) == 0
    capsys.readouterr()
    assert main(["train-masked", "--out", str(plain), "--resume", "--epochs", "2"]) == 2
    assert "was not trained by 'pyrovae train-masked'" in capsys.readouterr().err
