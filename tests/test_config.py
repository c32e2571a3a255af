"""The typed run config (JSON round trip, version 1 converted) and checkpoints keyed by module state_dicts."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyrovae.cli import main
from pyrovae.config import (
    CONFIG_VERSION,
    KINDS,
    DataConfig,
    LabelsConfig,
    M2Config,
    MaskConfig,
    MixtureConfig,
    ModelConfig,
    RunConfig,
    TrainingConfig,
)
from pyrovae.errors import PyrovaeError
from pyrovae.models.vae import VAE, vae_parts
from pyrovae.runs import load_module_state, load_run, read_config
from pyrovae.tasks.compare import fit_mixture, load_mixture
from pyrovae.train import fit, load_checkpoint

from .conftest import SMALL

FIT = dict(elbo="meanfield", batch_size=64, lr=3e-3, quiet=True, seed=7)
TINY = ["--dataset", "synthetic", "--train-size", "300", "--hidden", "16", "--z-dim", "2", "--quiet"]

EXAMPLES = {
    "vae": RunConfig(
        data=DataConfig(dataset="mnist", data_dir="d", val_size=0, train_size=500),
        model=ModelConfig(likelihood="gaussian-fixed", sigma=0.1, hidden=(400, 200), z_dim=8, autocast="bf16"),
        training=TrainingConfig(elbo="iwae", particles=5, epochs=3, lr=2e-3, clip_norm=1.0, seed=4),
        facts={"n_train": 500, "versions": {"torch": "2"}},
    ),
    "masked": RunConfig(kind="masked", model=ModelConfig(arch="mlp"), extra=MaskConfig("random", 0.3)),
    "gmm": RunConfig(kind="gmm", model=MixtureConfig(20, "bernoulli", "diag"), training=TrainingConfig(batch_size=256)),
    "semisupervised": RunConfig(
        kind="semisupervised", model=M2Config(hidden=(16, 8), alpha_scale=0.1), extra=LabelsConfig(20, 10)
    ),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_config_of_each_kind_round_trips_through_nested_json(kind):
    cfg = EXAMPLES[kind]
    assert cfg.kind == kind
    assert RunConfig.from_json(cfg.to_json()) == cfg and hash(RunConfig.from_json(cfg.to_json())) == hash(cfg)
    raw = json.loads(cfg.to_json())
    assert raw["version"] == CONFIG_VERSION and raw["kind"] == kind
    assert set(raw) == {"version", "kind", "data", "model", "training", "facts"} | ({"extra"} if cfg.extra else set())
    assert raw["training"]["seed"] == cfg.training.seed and raw["data"]["dataset"] == cfg.data.dataset
    assert RunConfig.from_json(cfg.to_json()) != cfg.replace(training={"seed": cfg.training.seed + 1})


def test_a_kind_with_the_wrong_sections_is_refused():
    with pytest.raises(PyrovaeError, match="a masked run's extra section is MaskConfig"):
        RunConfig(kind="masked")
    with pytest.raises(PyrovaeError, match="a gmm run's model section is a MixtureConfig"):
        RunConfig(kind="gmm")
    with pytest.raises(PyrovaeError, match="unknown run kind 'flow'"):
        RunConfig(kind="flow")


def _to_v1(run, cfg: RunConfig) -> None:
    """Rewrite a run folder as the previous release wrote it: a flat config_version-1 config, and every
    parameter in the checkpoint by its param-store name (``vae.encoder$$$net.0.weight``), no ``modules``."""
    flat = {**{f: getattr(s, f) for s in (cfg.data, cfg.model, cfg.training) for f in s.__dataclass_fields__}}
    flat["hidden"] = ",".join(map(str, flat["hidden"]))
    old = {**flat, **cfg.facts, "config_version": 1}
    (run / "config.json").write_text(json.dumps(old, indent=2))
    state = load_checkpoint(run / "checkpoint.pt")
    module = state.pop("modules")["model"]
    state["params"] = {f"vae.{k.split('.', 1)[0]}$$${k.split('.', 1)[1]}": v for k, v in module.items()}
    state["config"] = old
    torch.save(state, run / "checkpoint.pt")


def test_a_run_of_the_previous_release_evaluates_and_resumes(tmp_path, capsys):
    new, old = tmp_path / "new", tmp_path / "old"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(new)]) == 0
    shutil.copytree(new, old)
    cfg = read_config(new)
    _to_v1(old, cfg)
    assert "modules" not in load_checkpoint(old / "checkpoint.pt") and "version" not in read_config_raw(old)
    assert read_config(old).replace(facts={}) == cfg.replace(facts={})  # converted: the same settings
    assert read_config(old).facts["n_train"] == cfg.facts["n_train"]
    _, _, a = load_run(new, "cpu")
    _, _, b = load_run(old, "cpu")
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    for run in (new, old):
        assert main(["evaluate", str(run), "--k", "5", "--n", "20", "--no-figures", "--quiet"]) == 0
        assert json.loads((run / "eval.json").read_text())["log_likelihood"] < 0  # (evaluate draws unseeded)
    # resuming the old run continues it exactly as the new one, and rewrites it in today's format
    for run in (new, old):
        assert main(["train", "--out", str(run), "--resume", "--epochs", "2", "--quiet"]) == 0
    a, b = (load_checkpoint(run / "checkpoint.pt") for run in (new, old))
    assert a["modules"]["model"].keys() == b["modules"]["model"].keys()
    assert all(torch.equal(v, b["modules"]["model"][k]) for k, v in a["modules"]["model"].items())
    assert read_config_raw(old)["version"] == CONFIG_VERSION
    capsys.readouterr()


def read_config_raw(run) -> dict:
    return json.loads((run / "config.json").read_text())


def test_a_v1_checkpoint_of_another_architecture_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(run)]) == 0
    cfg = read_config(run)
    _to_v1(run, cfg)
    raw = read_config_raw(run)
    (run / "config.json").write_text(json.dumps({**raw, "hidden": "32"}))
    assert main(["evaluate", str(run), "--k", "5", "--n", "10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is (16, 784) there, (32, 784) here (another architecture)" in err[0], err


def _vae(splits, name: str = "vae") -> VAE:
    torch.manual_seed(0)
    return VAE(*vae_parts(splits.train.shape, "bernoulli", SMALL, splits.train_pixel_mean), name=name)


def test_a_module_renamed_in_the_param_store_reads_back_and_resumes_exactly(tiny_splits, tmp_path):
    a = _vae(tiny_splits)
    full = fit(a.model, a.guide, tiny_splits.train, epochs=2, out=tmp_path / "a", **FIT)
    b = _vae(tiny_splits)
    fit(b.model, b.guide, tiny_splits.train, epochs=2, out=tmp_path / "b", max_steps=11, **FIT)
    # a later version names the module otherwise in Pyro's store: the checkpoint is keyed by role, not name
    other = _vae(tiny_splits, name="renamed")
    assert not any(k.startswith("renamed") for k in load_checkpoint(tmp_path / "b" / "checkpoint.pt")["params"])
    torch.manual_seed(123)  # another RNG: the checkpoint restores it
    resumed = fit(other.model, other.guide, tiny_splits.train, epochs=2, out=tmp_path / "b", resume=True, **FIT)
    assert all(k.startswith("renamed.") for k in resumed.params)
    assert [r["train_elbo"] for r in resumed.history] == [r["train_elbo"] for r in full.history]
    for (k, p), q in zip(a.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(p, q), k
    # and the trained run loads into a module of any name
    loaded = _vae(tiny_splits, name="elsewhere")
    load_module_state(loaded, tmp_path / "a" / "checkpoint.pt", torch.device("cpu"))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), loaded.parameters(), strict=True))


def test_a_checkpoint_that_does_not_fit_the_module_is_one_line(tiny_splits, tmp_path):
    a = _vae(tiny_splits)
    fit(a.model, a.guide, tiny_splits.train, epochs=1, out=tmp_path, **FIT)
    path = tmp_path / "checkpoint.pt"
    wider = VAE(*vae_parts(tiny_splits.train.shape, "bernoulli", dataclasses.replace(SMALL, hidden=(32,))))
    with pytest.raises(PyrovaeError) as info:
        load_module_state(wider, path, torch.device("cpu"))
    assert "(64, 144) there, (32, 144) here (another architecture)" in str(info.value)
    assert len(str(info.value).splitlines()) == 1
    state = load_checkpoint(path)
    state["modules"]["model"]["decoder.extra"] = torch.zeros(2)
    torch.save(state, path)
    with pytest.raises(PyrovaeError, match="it has decoder.extra, which this model lacks"):
        load_module_state(_vae(tiny_splits), path, torch.device("cpu"))
    with pytest.raises(PyrovaeError, match="it has no module 'guide'"):
        load_module_state(_vae(tiny_splits), path, torch.device("cpu"), role="guide")


def test_the_mixture_buffers_come_back_from_its_checkpoint(tiny_splits, tmp_path):
    torch.manual_seed(0)
    gmm, _ = fit_mixture(tiny_splits.train, 3, "gaussian", "diag", 2, tmp_path, seed=0, quiet=True)
    assert not torch.equal(gmm.scale, torch.ones_like(gmm.scale))  # k-means scales: a buffer, not ones
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "config.json", "metrics.csv"]
    assert "scale" in load_checkpoint(tmp_path / "checkpoint.pt")["modules"]["model"]
    cfg = read_config(tmp_path)
    assert cfg.kind == "gmm" and cfg.model == MixtureConfig(3, "gaussian", "diag") and cfg.training.epochs == 2
    again, _ = load_mixture(tmp_path, "gaussian", tiny_splits.train)
    for (k, v), w in zip(gmm.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(v, w), k
    with pytest.raises(PyrovaeError, match="holds no bernoulli mixture"):
        load_mixture(tmp_path, "bernoulli", tiny_splits.train)
    # a mixture folder of the previous release: flat config, the whole state_dict in model.pt
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(tmp_path / "metrics.csv", old)
    flat = {"model": "gmm", "k": 3, "family": "gaussian", "covariance": "diag", "epochs": 2, "seed": 0}
    (old / "config.json").write_text(json.dumps(flat))
    torch.save(gmm.state_dict(), old / "model.pt")
    again, _ = load_mixture(old, "gaussian", tiny_splits.train)
    for (k, v), w in zip(gmm.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(v, w), k


def test_a_v1_masked_config_converts_to_a_masked_run():
    from pyrovae.config import from_v1

    from .test_io import V1_OPTIONS

    cfg = from_v1({**V1_OPTIONS, "config_version": 1, "masked": True, "mask": "random", "mask_rate": 0.4, "n_val": 5})
    assert cfg.kind == "masked" and cfg.extra == MaskConfig("random", 0.4) and cfg.facts == {"n_val": 5}
    assert cfg.model == ModelConfig() and cfg.training == TrainingConfig() and cfg.data == DataConfig()
    plain = from_v1({**V1_OPTIONS, "config_version": 1, "hidden": "400,200", "lr": 1})
    assert plain.kind == "vae" and plain.extra is None and plain.model.hidden == (400, 200)
    assert plain.training.lr == 1.0 and isinstance(plain.training.lr, float)


class Shifted(nn.Module):
    """A module with a buffer, trained beside a bare ``pyro.param`` that belongs to no module."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(144, 1)
        self.register_buffer("offset", torch.full((), 0.25))

    def model(self, x: torch.Tensor) -> None:
        pyro.module("shifted", self)
        shift = pyro.param("shift", torch.zeros(()))
        with pyro.plate("data", len(x)):
            loc = self.net(x.flatten(1)).squeeze(-1) + shift + self.offset
            pyro.sample("y", dist.Normal(loc, 1.0), obs=x.flatten(1).mean(-1))

    def guide(self, x: torch.Tensor) -> None:
        pass


def test_a_bare_param_beside_a_module_is_checkpointed_by_name_and_resumes_exactly(tiny_splits, tmp_path):
    torch.manual_seed(0)
    a = Shifted()
    full = fit(a.model, a.guide, tiny_splits.train, epochs=2, out=tmp_path / "a", **FIT)
    saved = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    assert set(saved["params"]) == {"shift"}  # no module's: by param-store name
    assert set(saved["modules"]["model"]) == {"net.weight", "net.bias", "offset"}  # the buffer too
    torch.manual_seed(0)
    b = Shifted()
    fit(b.model, b.guide, tiny_splits.train, epochs=2, out=tmp_path / "b", max_steps=11, **FIT)
    torch.manual_seed(0)
    c = Shifted()
    with torch.no_grad():
        c.offset.fill_(9.0)  # restored from the checkpoint
    resumed = fit(c.model, c.guide, tiny_splits.train, epochs=2, out=tmp_path / "b", resume=True, **FIT)
    assert float(c.offset) == 0.25
    assert resumed.params.keys() == full.params.keys()
    assert all(torch.equal(resumed.params[k], full.params[k]) for k in full.params)
    assert [r["train_elbo"] for r in resumed.history] == [r["train_elbo"] for r in full.history]
