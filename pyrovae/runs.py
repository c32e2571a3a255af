"""A run folder: rebuild data and model from ``config.json``, and load trained parameters.

A run's config is a :class:`pyrovae.config.RunConfig` (kind, data, model, training); everything needed to
rebuild the run lives there, so ``evaluate`` and ``--resume`` need nothing else. A saved config must be
complete and well typed: nothing is filled from today's defaults. :data:`BUILDERS` holds, per kind, how a
config becomes its data splits and its model; :func:`load_run` dispatches on it. A checkpoint keeps each
trained module's ``state_dict`` under its role (``model``), so it reads back whatever the module's name.
A zoo model's folder (``pyrovae zoo``'s ``OUT/NAME``) has the zoo's config instead: :func:`load_model` reads both.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyro
import torch

from .config import CONFIG_VERSION, MAX_SEED, ModelConfig, RunConfig  # noqa: F401  (MAX_SEED: read from here by the CLI)
from .data import Pixels, Splits, load_dataset, make_splits, synthetic
from .errors import PyrovaeError
from .infer import check_alpha
from .infer.paramstore import forget_module
from .models.vae import VAE, build_vae
from .models.zoo import ENTRIES, ZooData
from .nn.nets import ACTIVATIONS, PRESETS, Arch

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PyrovaeError("--device cuda asked for, but no CUDA device is available; use --device cpu or auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise PyrovaeError(f"unknown device {name!r}; choose auto, cpu or cuda")
    return torch.device(name)


def load_splits(cfg: RunConfig, device: torch.device) -> Splits:
    """The run's data: the named dataset (or ``synthetic``) with its pixel handling, on ``device``."""
    d, seed = cfg.data, cfg.training.seed
    raw = synthetic(seed=seed) if d.dataset == "synthetic" else load_dataset(d.dataset, d.data_dir, d.root, d.download)
    pixels = Pixels(d.binarize, d.dequantize)
    val_size = d.val_size
    if cfg.kind == "semisupervised":
        val_size = 0  # M2 uses every training image (its labelled ones among them)
    elif val_size is not None and d.dataset == "synthetic":
        val_size = min(val_size, len(raw.train_x) // 5)
    return make_splits(raw, pixels, device, val_size=val_size, train_size=d.train_size, seed=seed)


def arch_from_config(model: ModelConfig) -> Arch:
    """The network architecture a model config asks for: a preset with ``z_dim``/``hidden``/``activation`` overrides."""
    arch = PRESETS.get(model.arch)
    if arch is None:
        raise PyrovaeError(f"unknown arch {model.arch!r}; choose one of {', '.join(PRESETS)}")
    if model.z_dim:
        arch = replace(arch, z_dim=int(model.z_dim))
    if model.hidden:
        arch = replace(arch, hidden=tuple(int(h) for h in model.hidden))
    if model.activation:
        if model.activation not in ACTIVATIONS:
            raise PyrovaeError(f"unknown activation {model.activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        arch = replace(arch, activation=model.activation)
    return arch


def check_support(module: torch.nn.Module, cfg: RunConfig, splits: Splits) -> None:
    """Refuse data outside the decoder's support (non-binary pixels for a Bernoulli decoder, unless allowed)."""
    sample = splits.train.batch(torch.arange(min(1000, len(splits.train)), device=splits.train.device))
    module.likelihood.check_support(sample, allow=cfg.data.allow_nonbinary)


def set_autocast(vae: VAE, autocast: str | None) -> None:
    """Run ``vae``'s networks in mixed precision (``bf16`` or ``fp16``), or in full precision (None)."""
    if autocast and autocast not in AUTOCAST:
        raise PyrovaeError(f"unknown --autocast {autocast!r}; choose one of {', '.join(AUTOCAST)}")
    vae.autocast = AUTOCAST[autocast] if autocast else None


def build_model(cfg: RunConfig, splits: Splits) -> VAE:
    """The run's VAE, on the data's device, checked against the data's support."""
    m = cfg.model
    vae = build_vae(
        splits.train.shape, m.likelihood, arch_from_config(m), pixel_mean=splits.train_pixel_mean.cpu(), sigma=m.sigma
    ).to(splits.train.device)
    set_autocast(vae, m.autocast)
    check_support(vae, cfg, splits)
    return vae


def build_masked_model(cfg: RunConfig, splits: Splits) -> torch.nn.Module:
    """The run's masked VAE on the data's device, checked against the data's support."""
    from .models.masked import build_masked_vae

    m = cfg.model
    vae = build_masked_vae(
        splits.train.shape, m.likelihood, arch_from_config(m), pixel_mean=splits.train_pixel_mean.cpu(), sigma=m.sigma
    ).to(splits.train.device)
    set_autocast(vae, m.autocast)  # networks in mixed precision, as in build_model
    check_support(vae, cfg, splits)
    return vae


def _mixture(cfg: RunConfig, splits: Splits) -> torch.nn.Module:
    from .models.gmm import GMM

    m = cfg.model
    return GMM(m.k, splits.train.shape, covariance=m.covariance, family=m.family).to(splits.train.device)


def _m2(cfg: RunConfig, splits: Splits) -> torch.nn.Module:
    from .models.m2 import M2

    m = cfg.model
    m2 = M2(splits.train.shape, m.likelihood, m.hidden, m.z_dim, m.classes).to(splits.train.device)
    check_support(m2, cfg, splits)
    return m2


@dataclass(frozen=True)
class Builder:
    """How a run of one kind is rebuilt: its data splits, its (untrained) model, the file its weights are in."""

    splits: Callable[[RunConfig, torch.device], Splits]
    model: Callable[[RunConfig, Splits], torch.nn.Module]
    weights: str = "checkpoint.pt"


BUILDERS: dict[str, Builder] = {
    "vae": Builder(load_splits, build_model),
    "masked": Builder(load_splits, build_masked_model),
    "gmm": Builder(load_splits, _mixture),
    "semisupervised": Builder(load_splits, _m2, weights="m2.pt"),
}


def check_config(cfg: Any, where: str = "the config") -> RunConfig:
    """A run config from its JSON form (nested, or the flat version 1 of earlier releases), checked: a
    missing, unknown or wrongly typed field is a one-line error naming it."""
    return cfg if isinstance(cfg, RunConfig) else RunConfig.from_dict(cfg, where)


def read_config(run_dir: str | Path) -> RunConfig:
    """A run folder's ``config.json``, checked: complete, of a version this pyrovae reads, and well typed."""
    path = Path(run_dir) / "config.json"
    if Path(run_dir).is_dir() and not os.access(run_dir, os.R_OK | os.X_OK):
        raise PyrovaeError(f"cannot read the run folder {run_dir}: permission denied")
    if not path.is_file():
        raise PyrovaeError(f"{run_dir} is not a run folder: no config.json (make one with 'pyrovae train --out')")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise PyrovaeError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    return RunConfig.from_json(text, str(path))


def record_config(cfg: RunConfig, facts: dict[str, Any]) -> RunConfig:
    """``cfg`` with what a run found (``facts``) and the library versions it ran with, as written with the run."""
    from . import __version__

    versions = {"pyrovae": __version__, "pyro": pyro.__version__, "torch": str(torch.__version__)}
    versions["python"] = platform.python_version()
    return replace(cfg, facts={**cfg.facts, **facts, "versions": versions}, version=CONFIG_VERSION)


def build_for_training(cfg: Any, kind: str) -> tuple[RunConfig, Splits, torch.nn.Module]:
    """A checked config of ``kind``, its data splits on its device and a freshly seeded model, ready to fit."""
    cfg = check_config(cfg)
    if cfg.kind != kind:
        raise PyrovaeError(f"this trains a run of kind {kind!r}, not {cfg.kind!r}")
    device = resolve_device(cfg.training.device)
    pyro.set_rng_seed(cfg.training.seed)
    builder = BUILDERS[cfg.kind]
    splits = builder.splits(cfg, device)
    return cfg, splits, builder.model(cfg, splits)


def train_vae(
    cfg: RunConfig,
    out: str | Path,
    *,
    resume: bool = False,
    quiet: bool = False,
    on_first_checkpoint: Callable[[], None] | None = None,
    tensorboard: str | Path | None = None,
):
    """Train (or resume) the VAE a config describes into run folder ``out``; returns (splits, vae, FitResult).

    ``out`` is left as it was until the first checkpoint is written; ``on_first_checkpoint`` runs then.
    ``tensorboard``: a folder for TensorBoard event files (scalars, sample and reconstruction grids)."""
    cfg, splits, vae = build_for_training(cfg, "vae")
    logger = None
    if tensorboard is not None:
        from .reports.tensorboard import TensorBoardLogger

        images = splits.val.batch(torch.arange(min(16, len(splits.val)), device=splits.val.device))
        logger = TensorBoardLogger(tensorboard, vae=vae, images=images)
    try:
        result = fit_from_config(
            cfg,
            vae,
            splits,
            splits.train,
            splits.val,
            out,
            resume=resume,
            quiet=quiet,
            on_first_checkpoint=on_first_checkpoint,
            callback=logger,
        )
    finally:
        if logger is not None:
            logger.close()
    return splits, vae, result


def fit_from_config(
    cfg: RunConfig,
    module: torch.nn.Module,
    splits: Splits,
    train,
    val,
    out: str | Path,
    *,
    resume: bool = False,
    quiet: bool = False,
    on_first_checkpoint: Callable[[], None] | None = None,
    callback: Callable[[dict[str, float]], None] | None = None,
):
    """``fit`` of ``module.model``/``module.guide`` with the training settings of a run config; writes the
    config (plus data facts) with the run, and the module's state_dict in each checkpoint (role ``model``)."""
    from .train import fit

    t = cfg.training
    check_alpha(t.elbo, t.alpha)
    facts = {"data_source": splits.source, "n_train": len(splits.train), "n_val": len(val)}
    return fit(
        module.model,
        module.guide,
        train,
        elbo=t.elbo,
        particles=t.particles,
        alpha=t.alpha,
        epochs=t.epochs,
        batch_size=t.batch_size,
        lr=t.lr,
        clip_norm=t.clip_norm,
        lr_schedule=t.lr_schedule,
        lr_gamma=t.lr_gamma,
        warmup_epochs=t.warmup_epochs,
        val_data=val,
        out=out,
        resume=resume,
        seed=None if resume else t.seed,
        config=record_config(cfg, facts).to_dict(),
        quiet=quiet,
        on_first_checkpoint=on_first_checkpoint,
        callback=callback,
        modules={"model": module},
    )


def load_module_state(
    module: torch.nn.Module, path: str | Path, device: torch.device, role: str = "model", name: str | None = None
) -> dict:
    """Copy a module trained in a run (its ``state_dict`` under ``role`` in checkpoint ``path``) into ``module``,
    buffers included; returns the checkpoint. A checkpoint of an earlier release, whose parameters are named as
    in Pyro's param store (``f"{name}$$$param"`` and ``f"{name}.{child}$$$param"``; ``name``: the module's
    ``name``), is converted; it held no buffers, so the module keeps its own."""
    from .train import load_checkpoint
    from .train.state import check_params, load_modules

    path = Path(path)
    if not path.is_file():
        raise PyrovaeError(f"{path.parent} has no {path.name}: train it first")
    state = load_checkpoint(path, map_location=device)
    if "modules" in state:
        load_modules(path, state["modules"], {role: module})
        return state
    if not isinstance(state.get("params"), dict):
        raise PyrovaeError(f"{path} is not a pyrovae checkpoint: it has neither 'modules' nor 'params'")
    name = name or getattr(module, "name", role)
    own = dict(module.named_parameters())
    saved = {}
    for key, value in state["params"].items():  # "vae.decoder$$$net.0.weight" -> "decoder.net.0.weight"
        owner, _, param = key.partition("$$$")
        if owner == name or owner.startswith(name + "."):
            saved[".".join(filter(None, [owner[len(name) + 1 :], param]))] = value
    check_params(path, saved, own)
    with torch.no_grad():
        for key, p in own.items():
            p.copy_(saved[key])
    return state


def load_run(run_dir: str | Path, device: str = "auto") -> tuple[RunConfig, Splits, torch.nn.Module]:
    """Rebuild a trained run of any kind: its config, its data splits and its model with the trained state."""
    cfg = read_config(run_dir)
    dev = resolve_device(device)
    builder = BUILDERS[cfg.kind]
    splits = builder.splits(cfg, dev)
    module = _with_trained_state(builder.model(cfg, splits), Path(run_dir) / builder.weights, dev)
    return cfg, splits, module


def _with_trained_state(module: torch.nn.Module, path: Path, device: torch.device) -> torch.nn.Module:
    """``module`` with the state trained into checkpoint ``path``, its name forgotten by Pyro's param store."""
    load_module_state(module, path, device)
    if getattr(module, "name", None):
        forget_module(module.name)  # the store's entries of this name are another model's
    return module


# ------------------------------------------------------------------------------------------------- zoo folders
def zoo_splits(
    dataset: str,
    train_size: int | None,
    seed: int,
    device: torch.device,
    data_dir: str | None = None,
    root: str | None = None,
    download: bool = False,
) -> Splits:
    """The zoo's data: dynamically binarised training images, the split and seed every zoo model shares."""
    raw = synthetic() if dataset == "synthetic" else load_dataset(dataset, data_dir, root, download)
    return make_splits(raw, Pixels("dynamic"), device, train_size=train_size, seed=seed)


def build_zoo_module(name: str, splits: Splits) -> torch.nn.Module:
    """Zoo model ``name`` as it starts training: built from the training images' shape, pixel means, first 2000
    images (VampPrior's pseudo-inputs, the mixture's start) and number of classes."""
    train = splits.train
    sample = train.batch(torch.arange(min(len(train), 2000), device=train.device))
    data = ZooData(train.shape, splits.train_pixel_mean, sample, int(train.labels.max()) + 1)
    return ENTRIES[name].build(data).to(train.device)


def is_zoo_folder(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` is a zoo model's folder (its config.json says kind zoo)."""
    try:
        cfg = json.loads((Path(run_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and cfg.get("kind") == "zoo"


def load_zoo_model(run_dir: str | Path, device: str = "auto") -> tuple[Splits, torch.nn.Module]:
    """A zoo model's folder back as the zoo trained it: its data splits and its module with the trained state."""
    cfg = json.loads((Path(run_dir) / "config.json").read_text())
    name = cfg.get("model")
    if name not in ENTRIES:
        raise PyrovaeError(f"{run_dir} holds zoo model {name!r}, which this pyrovae does not know")
    dev = resolve_device(device)
    splits = zoo_splits(cfg["dataset"], cfg.get("train_size"), int(cfg.get("seed", 0)), dev)
    module = _with_trained_state(build_zoo_module(name, splits), Path(run_dir) / "checkpoint.pt", dev)
    return splits, module.eval()


def load_model(run_dir: str | Path, device: str = "auto") -> tuple[Splits, torch.nn.Module]:
    """The data splits and trained module of a run folder of any kind, a zoo model's folder included."""
    if is_zoo_folder(run_dir):
        return load_zoo_model(run_dir, device)
    _, splits, module = load_run(run_dir, device)
    return splits, module
