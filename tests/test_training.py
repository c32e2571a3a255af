"""The trainer: exact resume, NaN detection, KL warm-up, user-written programs, several models per process."""

from __future__ import annotations

import csv

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceMeanField_ELBO

from pyrovae import PyrovaeError, TensorData, build_vae, fit
from pyrovae.errors import NonFiniteLoss
from pyrovae.infer import LatentScale
from pyrovae.train import load_checkpoint

from .conftest import SMALL

FIT = dict(elbo="meanfield", batch_size=64, lr=3e-3, quiet=True, seed=7)


def _params(vae):
    return {k: v.detach().clone() for k, v in vae.state_dict().items()}


def _new_vae(splits):
    torch.manual_seed(0)
    return build_vae(splits.train.shape, "bernoulli", SMALL, pixel_mean=splits.train_pixel_mean)


@pytest.mark.parametrize("stop", ["epoch", "mid-epoch"])
def test_resume_equals_uninterrupted(tiny_splits, tmp_path, stop):
    a = _new_vae(tiny_splits)
    full = fit(a.model, a.guide, tiny_splits.train, epochs=3, val_data=tiny_splits.val, out=tmp_path / "a", **FIT)

    b = _new_vae(tiny_splits)
    if stop == "epoch":
        fit(b.model, b.guide, tiny_splits.train, epochs=1, val_data=tiny_splits.val, out=tmp_path / "b", **FIT)
    else:  # stop inside epoch 2 (8 steps per epoch), as Ctrl-C would
        part = fit(
            b.model,
            b.guide,
            tiny_splits.train,
            epochs=3,
            val_data=tiny_splits.val,
            out=tmp_path / "b",
            max_steps=11,
            **FIT,
        )
        assert part.interrupted and load_checkpoint(tmp_path / "b" / "checkpoint.pt")["batch"] == 3
    b = _new_vae(tiny_splits)  # a fresh process would rebuild the model from scratch
    torch.manual_seed(123)  # and its RNG would differ: resume must restore it
    rest = fit(
        b.model, b.guide, tiny_splits.train, epochs=3, val_data=tiny_splits.val, out=tmp_path / "b", resume=True, **FIT
    )

    pa, pb = _params(a), _params(b)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert [r["val_elbo"] for r in rest.history] == [r["val_elbo"] for r in full.history]
    rows = list(csv.DictReader(open(tmp_path / "b" / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert set(rows[0]) >= {"epoch", "train_elbo", "val_elbo", "seconds"}


def test_nan_loss_stops_with_epoch_and_batch_and_keeps_the_checkpoint(tiny_splits, tmp_path):
    vae = _new_vae(tiny_splits)
    calls = {"n": 0}
    steps_per_epoch = 8  # 500 images / 64

    def poisoned_model(x, num_data=None):
        calls["n"] += 1
        # the probe step is call 1; epoch 1 is calls 2-9; poison the 3rd batch of epoch 2
        if calls["n"] == 1 + steps_per_epoch + 3:
            x = x * float("nan")
        vae.model(x, num_data)

    with pytest.raises(NonFiniteLoss, match=r"epoch 2, batch 3; the last good checkpoint stays"):
        fit(poisoned_model, vae.guide, tiny_splits.train, epochs=3, out=tmp_path, **{**FIT, "elbo": "trace"})
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["params"].values())


def test_kl_warmup_scales_the_latent_sites_linearly(tiny_vae, tiny_splits):
    # With the same draws, the meanfield loss at beta is recon + beta*KL: linear in beta, exactly.
    x = tiny_splits.val.batch(torch.arange(40))
    elbo = TraceMeanField_ELBO()

    def loss(beta):
        pyro.set_rng_seed(11)
        with LatentScale(beta), torch.no_grad():
            return float(elbo.differentiable_loss(tiny_vae.model, tiny_vae.guide, x))

    l0, l1, lh = loss(0.0), loss(1.0), loss(0.25)
    assert lh == pytest.approx(0.75 * l0 + 0.25 * l1, rel=1e-5)
    assert l1 > l0  # the KL term is positive
    result = fit(tiny_vae.model, tiny_vae.guide, tiny_splits.train, epochs=3, warmup_epochs=2, **FIT)
    assert [r["beta"] for r in result.history] == [0.5, 1.0, 1.0]


def test_fit_trains_a_user_written_program():
    # A probabilistic PCA written by hand with pyro.param (no nn.Module): x = W z + b + 0.1 eps.
    g = torch.Generator().manual_seed(0)
    w_true = torch.randn(6, 2, generator=g)
    data = torch.randn(800, 2, generator=g) @ w_true.T + 0.1 * torch.randn(800, 6, generator=g)

    def model(x, num_data=None):
        w = pyro.param("w", 0.1 * torch.randn(6, 2, generator=torch.Generator().manual_seed(1)))
        b = pyro.param("b", torch.zeros(6))
        with pyro.plate("data", num_data or len(x), subsample=torch.arange(len(x))):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ w.T + b, 0.1).to_event(1), obs=x)

    def guide(x, num_data=None):
        a = pyro.param("a", torch.zeros(6, 2))
        s = pyro.param("s", torch.ones(2), constraint=dist.constraints.positive)
        with pyro.plate("data", num_data or len(x), subsample=torch.arange(len(x))):
            pyro.sample("z", dist.Normal(x @ a, s).to_event(1))

    result = fit(
        model, guide, TensorData(data), epochs=40, batch_size=100, lr=2e-2, val_data=data[:200], quiet=True, seed=0
    )
    first, last = result.history[0]["val_elbo"], result.history[-1]["val_elbo"]
    # exact log p(x) of the true model is about -6*log(0.1*sqrt(2 pi)) - ... ~ +3 per point; the untrained
    # model sits near -500. A fitted model must reach > -10 nats per point.
    assert last > -10 and last > first + 100, (first, last)
    assert pyro.param("s").min() > 0


def test_a_second_model_in_one_process_trains(tiny_splits):
    # Stale param-store entries of the first model must not hijack the second (same module name "vae").
    first = _new_vae(tiny_splits)
    fit(first.model, first.guide, tiny_splits.train, epochs=2, **FIT)
    second = _new_vae(tiny_splits)
    before = _params(second)
    fit(second.model, second.guide, tiny_splits.train, epochs=2, **FIT)
    after = _params(second)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_fit_refuses_bad_settings(tiny_vae, tiny_splits, tmp_path):
    with pytest.raises(PyrovaeError, match="need epochs >= 1"):
        fit(tiny_vae.model, tiny_vae.guide, tiny_splits.train, epochs=0)
    with pytest.raises(PyrovaeError, match="unknown lr schedule"):
        fit(tiny_vae.model, tiny_vae.guide, tiny_splits.train, lr_schedule="warp")
    with pytest.raises(PyrovaeError, match="nothing to resume"):
        fit(tiny_vae.model, tiny_vae.guide, tiny_splits.train, out=tmp_path, resume=True)


def test_registration_is_skipped_only_inside_fits_hot_loop(tiny_vae, tiny_splits):
    # Outside fit the built-in programs register their parameters on every call, so Pyro's own SVI
    # (which collects param sites per step) still trains them; inside parameters_collected() they don't.
    from pyro.infer import SVI
    from pyro.optim import Adam

    from pyrovae.models.vae import parameters_collected

    x = tiny_splits.train.batch(torch.arange(20))

    def param_sites() -> int:
        with pyro.poutine.trace(param_only=True) as tr:
            tiny_vae.model(x)
            tiny_vae.guide(x)
        return len(tr.trace.nodes)

    assert param_sites() == len(list(tiny_vae.parameters()))
    with parameters_collected():
        assert param_sites() == 0
    assert param_sites() > 0  # restored on exit
    pyro.clear_param_store()
    before = [p.detach().clone() for p in tiny_vae.parameters()]
    svi = SVI(tiny_vae.model, tiny_vae.guide, Adam({"lr": 1e-2}), TraceMeanField_ELBO())
    svi.step(x)
    assert all(not torch.equal(a, b) for a, b in zip(before, tiny_vae.parameters()))
