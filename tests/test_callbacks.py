"""The trainer's parts: callbacks a user adds or swaps, the TrainState as the checkpoint, the trained parameters
returned by fit, and a param store left as the caller had it."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from pyrovae import build_vae, fit
from pyrovae.train import Callback, Checkpoint, TrainState, load_training_checkpoint
from pyrovae.train.strategy import Strategy

from .conftest import SMALL

FIT = dict(elbo="meanfield", batch_size=64, lr=3e-3, quiet=True, seed=7)


def _new_vae(splits):
    torch.manual_seed(0)
    return build_vae(splits.train.shape, "bernoulli", SMALL, pixel_mean=splits.train_pixel_mean)


class Recorder(Callback):
    def __init__(self) -> None:
        self.events: list[str] = []
        self.rows: list[dict[str, float]] = []
        self.steps = 0

    def on_fit_start(self, loop) -> None:
        self.events.append("start")

    def on_step_end(self, loop) -> None:
        self.steps += 1

    def on_epoch_end(self, loop, row) -> None:
        self.events.append("epoch")
        self.rows.append(dict(row))

    def on_fit_end(self, loop) -> None:
        self.events.append("end")

    def teardown(self, loop) -> None:
        self.events.append("teardown")


def test_a_user_callback_sees_every_epoch_and_every_step(tiny_splits):
    vae, rec = _new_vae(tiny_splits), Recorder()
    result = fit(vae.model, vae.guide, tiny_splits.train, epochs=3, val_data=tiny_splits.val, callbacks=[rec], **FIT)
    assert rec.events == ["start", "epoch", "epoch", "epoch", "end", "teardown"]
    assert rec.rows == result.history and [r["epoch"] for r in rec.rows] == [1, 2, 3]
    assert set(rec.rows[0]) == {"epoch", "train_elbo", "val_elbo", "seconds", "beta", "lr"}
    assert rec.steps == 3 * -(-len(tiny_splits.train) // FIT["batch_size"])


def test_a_plain_callable_and_a_callback_both_run(tiny_splits):
    vae, rec, seen = _new_vae(tiny_splits), Recorder(), []
    fit(vae.model, vae.guide, tiny_splits.train, epochs=2, callback=seen.append, callbacks=[rec], **FIT)
    assert [r["epoch"] for r in seen] == [1, 2] and rec.rows == seen


def test_replacing_the_checkpoint_callback_means_nothing_is_written(tiny_splits, tmp_path):
    class NoFiles(Checkpoint):
        def on_fit_start(self, loop) -> None:
            pass

        def save(self, loop) -> None:
            self.saves += 1

    vae, out = _new_vae(tiny_splits), tmp_path / "run"
    mine = NoFiles(out)
    result = fit(vae.model, vae.guide, tiny_splits.train, epochs=2, out=out, config={"a": 1}, callbacks=[mine], **FIT)
    assert result.epochs_done == 2 and mine.saves == 2
    assert not out.exists()


def test_a_callback_can_stop_training_and_the_checkpoint_is_kept(tiny_splits, tmp_path):
    class StopAfterFive(Callback):
        def on_step_end(self, loop) -> None:
            if loop.steps == 5:
                loop.stop.set = True

    vae = _new_vae(tiny_splits)
    result = fit(vae.model, vae.guide, tiny_splits.train, epochs=3, out=tmp_path, callbacks=[StopAfterFive()], **FIT)
    saved = load_training_checkpoint(tmp_path / "checkpoint.pt")
    assert result.interrupted and (saved["epoch"], saved["batch"]) == (0, 5)


def test_train_state_restored_mid_epoch_continues_bit_identically(tiny_splits, tmp_path):
    a = _new_vae(tiny_splits)
    full = fit(a.model, a.guide, tiny_splits.train, epochs=2, out=tmp_path / "a", **FIT)
    b = _new_vae(tiny_splits)
    fit(b.model, b.guide, tiny_splits.train, epochs=2, out=tmp_path / "b", max_steps=11, **FIT)  # 8 steps per epoch
    saved = load_training_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert (saved["epoch"], saved["batch"]) == (1, 3)

    # the state round-trips whole: a fresh state loaded from the checkpoint gives the same checkpoint back
    fresh = _new_vae(tiny_splits)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    params = dict(fresh.named_parameters())
    state = TrainState(params, torch.optim.Adam(list(params.values()), lr=FIT["lr"]), modules={"model": fresh})
    state.load_state_dict(saved, Strategy(), torch.device("cpu"), tmp_path / "b" / "checkpoint.pt")
    again = state.state_dict(Strategy())
    for key in ("epoch", "batch", "partial", "history", "world_size", "perm_seed"):
        assert again[key] == saved[key], key
    assert torch.equal(again["perm"], saved["perm"])
    assert again["params"].keys() == saved["params"].keys()
    assert all(torch.equal(again["params"][k], v) for k, v in saved["params"].items())
    module = saved["modules"]["model"]
    assert again["modules"]["model"].keys() == module.keys() and len(module) == len(params)
    assert all(torch.equal(again["modules"]["model"][k], v) for k, v in module.items())
    assert any(v.abs().sum() > 0 for v in module.values())  # trained values, not the zeros the state began with

    c = _new_vae(tiny_splits)
    torch.manual_seed(123)  # another RNG: the checkpoint restores it
    resumed = fit(c.model, c.guide, tiny_splits.train, epochs=2, out=tmp_path / "b", resume=True, **FIT)
    assert resumed.params.keys() == full.params.keys()
    assert all(torch.equal(resumed.params[k], full.params[k]) for k in full.params)
    assert [r["train_elbo"] for r in resumed.history] == [r["train_elbo"] for r in full.history]


def test_fit_returns_the_trained_parameters(tiny_splits):
    vae = _new_vae(tiny_splits)
    result = fit(vae.model, vae.guide, tiny_splits.train, epochs=1, **FIT)
    own = dict(vae.named_parameters())
    assert len(result.params) == len(own)
    for name, value in result.params.items():  # "vae.decoder$$$net.0.weight" is decoder.net.0.weight
        owner, _, param = name.partition("$$$")
        assert torch.equal(value, own[".".join(filter(None, [owner[len("vae.") :], param]))]), name

    def model(x):
        loc = pyro.param("loc", torch.zeros(3))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)

    def guide(x):
        pyro.param("s", torch.ones(3), constraint=dist.constraints.positive)

    result = fit(model, guide, torch.randn(50, 3) + 2, epochs=3, batch_size=10, lr=0.1, quiet=True, seed=0)
    assert set(result.params) == {"loc", "s"}
    assert torch.equal(result.params["loc"], pyro.param("loc").detach())
    assert torch.equal(result.params["s"], pyro.param("s").detach()) and (result.params["s"] > 0).all()
    assert (result.params["loc"] > 0.5).all()  # trained towards the data's mean


def test_fit_keeps_the_callers_other_parameters(tiny_splits):
    mine = pyro.param("mine", torch.arange(3.0))
    vae = _new_vae(tiny_splits)
    fit(vae.model, vae.guide, tiny_splits.train, epochs=1, **FIT)
    assert pyro.param("mine") is mine


def test_the_progress_line_names_val_elbo_only_when_there_is_validation_data(tiny_splits, capsys):
    # a fit without val_data (the GMM in pyrovae compare) has no validation ELBO: its line must not say "nan"
    for val, wanted in ((None, False), (tiny_splits.val, True)):
        vae = _new_vae(tiny_splits)
        fit(vae.model, vae.guide, tiny_splits.train, epochs=1, val_data=val, **{**FIT, "quiet": False})
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith("epoch 1/1  train ELBO -") and "nan" not in line
        assert ("val ELBO -" in line) == wanted, line
