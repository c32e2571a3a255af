"""A run folder: rebuild data and model from ``config.json``, and load trained parameters.

A run's config is a flat dict of the ``pyrovae train`` options (see :data:`DEFAULTS`) plus
``config_version``; everything needed to rebuild the run lives there, so ``evaluate`` and ``--resume``
need nothing else. A saved config must be complete and well typed: nothing is filled from today's defaults.
"""

from __future__ import annotations

import json
import os
import platform
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyro
import torch

from .data import Pixels, Splits, load_dataset, make_splits, synthetic
from .errors import PyrovaeError
from .infer import check_alpha
from .models import VAE, build_vae
from .nets import ACTIVATIONS, PRESETS, Arch
from .paramstore import forget_module

DEFAULTS: dict[str, Any] = {
    "dataset": "fashion-mnist",
    "data_dir": None,
    "root": None,
    "download": False,
    "likelihood": "bernoulli",
    "sigma": None,
    "allow_nonbinary": False,
    "binarize": "dynamic",
    "dequantize": False,
    "arch": "iwae",
    "z_dim": None,
    "hidden": None,
    "activation": None,
    "elbo": "meanfield",
    "particles": None,
    "alpha": None,
    "epochs": 10,
    "batch_size": 100,
    "lr": 1e-3,
    "clip_norm": None,
    "lr_schedule": "none",
    "lr_gamma": 0.95,
    "warmup_epochs": 0.0,
    "val_size": None,  # data.default_val_size: 10% of the training images, at most 5000
    "train_size": None,
    "device": "auto",
    "seed": 0,
    "autocast": None,
}
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
CONFIG_VERSION = 1  # bump when a field is added, renamed or changes meaning
MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit
_STR, _BOOL, _INT, _NUM = (str,), (bool,), (int,), (int, float)
# each field: accepted types, whether null is allowed, and a check of the value (None: any)
CONFIG_FIELDS: dict[str, tuple[tuple[type, ...], bool, Any]] = {
    "dataset": (_STR, False, None),
    "data_dir": (_STR, True, None),
    "root": (_STR, True, None),
    "download": (_BOOL, False, None),
    "likelihood": (_STR, False, None),
    "sigma": (_NUM, True, lambda v: v > 0),
    "allow_nonbinary": (_BOOL, False, None),
    "binarize": (_STR, False, None),
    "dequantize": (_BOOL, False, None),
    "arch": (_STR, False, None),
    "z_dim": (_INT, True, lambda v: v >= 1),
    "hidden": (_STR, True, lambda v: re.fullmatch(r"[1-9]\d*(,[1-9]\d*)*", v) is not None),
    "activation": (_STR, True, None),
    "elbo": (_STR, False, None),
    "particles": (_INT, True, lambda v: v >= 1),
    "alpha": (_NUM, True, None),
    "epochs": (_INT, False, lambda v: v >= 1),
    "batch_size": (_INT, False, lambda v: v >= 1),
    "lr": (_NUM, False, lambda v: v > 0),
    "clip_norm": (_NUM, True, lambda v: v > 0),
    "lr_schedule": (_STR, False, None),
    "lr_gamma": (_NUM, False, lambda v: v > 0),
    "warmup_epochs": (_NUM, False, lambda v: v >= 0),
    "val_size": (_INT, True, lambda v: v >= 0),  # null: data.default_val_size
    "train_size": (_INT, True, lambda v: v >= 2),
    "device": (_STR, False, None),
    "seed": (_INT, False, lambda v: 0 <= v <= MAX_SEED),
    "autocast": (_STR, True, None),
}


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PyrovaeError("--device cuda asked for, but no CUDA device is available; use --device cpu or auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise PyrovaeError(f"unknown device {name!r}; choose auto, cpu or cuda")
    return torch.device(name)


def load_splits(cfg: dict[str, Any], device: torch.device) -> Splits:
    """The run's data: the named dataset (or ``synthetic``) with its pixel handling, on ``device``."""
    if cfg["dataset"] == "synthetic":
        raw = synthetic(seed=cfg["seed"])
    else:
        raw = load_dataset(cfg["dataset"], cfg.get("data_dir"), cfg.get("root"), cfg.get("download", False))
    pixels = Pixels(cfg["binarize"], cfg.get("dequantize", False))
    val_size = cfg["val_size"]
    if val_size is not None and cfg["dataset"] == "synthetic":
        val_size = min(val_size, len(raw.train_x) // 5)
    return make_splits(raw, pixels, device, val_size=val_size, train_size=cfg.get("train_size"), seed=cfg["seed"])


def arch_from_config(cfg: dict[str, Any]) -> Arch:
    """The network architecture a config asks for: a preset with ``z_dim``/``hidden``/``activation`` overrides."""
    arch = PRESETS.get(cfg["arch"])
    if arch is None:
        raise PyrovaeError(f"unknown arch {cfg['arch']!r}; choose one of {', '.join(PRESETS)}")
    if cfg.get("z_dim"):
        arch = replace(arch, z_dim=int(cfg["z_dim"]))
    if cfg.get("hidden"):
        arch = replace(arch, hidden=tuple(int(h) for h in str(cfg["hidden"]).split(",")))
    if cfg.get("activation"):
        if cfg["activation"] not in ACTIVATIONS:
            raise PyrovaeError(f"unknown activation {cfg['activation']!r}; choose one of {', '.join(ACTIVATIONS)}")
        arch = replace(arch, activation=cfg["activation"])
    return arch


def build_model(cfg: dict[str, Any], splits: Splits) -> VAE:
    """The run's VAE, on the data's device, checked against the data's support."""
    arch = arch_from_config(cfg)
    vae = build_vae(
        splits.train.shape,
        cfg["likelihood"],
        arch,
        pixel_mean=splits.train_pixel_mean.cpu(),
        sigma=cfg.get("sigma"),
    ).to(splits.train.device)
    if cfg.get("autocast"):
        if cfg["autocast"] not in AUTOCAST:
            raise PyrovaeError(f"unknown --autocast {cfg['autocast']!r}; choose one of {', '.join(AUTOCAST)}")
        vae.autocast = AUTOCAST[cfg["autocast"]]
    sample = splits.train.batch(torch.arange(min(1000, len(splits.train)), device=splits.train.device))
    vae.likelihood.check_support(sample, allow=cfg.get("allow_nonbinary", False))
    return vae


def check_config(cfg: Any, where: str = "the config") -> dict[str, Any]:
    """Refuse a run config with a missing or wrongly typed field (one line naming it); returns ``cfg``."""
    if not isinstance(cfg, dict):
        raise PyrovaeError(f"{where} is not a run config: it holds a JSON {type(cfg).__name__}, not an object")
    for key, (types, nullable, valid) in CONFIG_FIELDS.items():
        if key not in cfg:
            raise PyrovaeError(f"{where} lacks the field {key!r}: a run's config must be complete")
        value = cfg[key]
        if value is None and nullable:
            continue
        typed = isinstance(value, types) and (bool in types or not isinstance(value, bool))
        if not typed or (valid is not None and not valid(value)):
            expected = "/".join(t.__name__ for t in types) + (" or null" if nullable else "")
            raise PyrovaeError(f"{where}: field {key!r} is {value!r}, expected a valid {expected}")
    return cfg


def read_config(run_dir: str | Path) -> dict[str, Any]:
    """A run folder's ``config.json``, checked: complete, of this ``config_version``, and well typed."""
    path = Path(run_dir) / "config.json"
    if Path(run_dir).is_dir() and not os.access(run_dir, os.R_OK | os.X_OK):
        raise PyrovaeError(f"cannot read the run folder {run_dir}: permission denied")
    if not path.is_file():
        raise PyrovaeError(f"{run_dir} is not a run folder: no config.json (make one with 'pyrovae train --out')")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PyrovaeError(f"{path} is not valid JSON: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PyrovaeError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if isinstance(cfg, dict) and cfg.get("config_version") != CONFIG_VERSION:
        found = cfg.get("config_version", "none")
        raise PyrovaeError(
            f"{path} has config_version {found!r}; this pyrovae reads version {CONFIG_VERSION} (retrain the run)"
        )
    return check_config(cfg, str(path))


def train_vae(
    cfg: dict[str, Any],
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
    check_config(cfg)
    device = resolve_device(cfg["device"])
    pyro.set_rng_seed(cfg["seed"])
    splits = load_splits(cfg, device)
    vae = build_model(cfg, splits)
    logger = None
    if tensorboard is not None:
        from .tensorboard import TensorBoardLogger

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
    cfg: dict[str, Any],
    vae,
    splits: Splits,
    train,
    val,
    out: str | Path,
    *,
    resume: bool = False,
    quiet: bool = False,
    record: dict[str, Any] | None = None,
    on_first_checkpoint: Callable[[], None] | None = None,
    callback: Callable[[dict[str, float]], None] | None = None,
):
    """``fit`` with the optimisation settings of a run config; writes the config (plus data facts) with the run."""
    from . import __version__
    from .train import fit

    check_alpha(cfg["elbo"], cfg["alpha"])
    versions = {"pyrovae": __version__, "pyro": pyro.__version__, "torch": str(torch.__version__)}
    facts = {"data_source": splits.source, "n_train": len(splits.train), "n_val": len(val), **(record or {})}
    return fit(
        vae.model,
        vae.guide,
        train,
        elbo=cfg["elbo"],
        particles=cfg["particles"],
        alpha=cfg["alpha"],
        epochs=cfg["epochs"],
        batch_size=cfg["batch_size"],
        lr=cfg["lr"],
        clip_norm=cfg["clip_norm"],
        lr_schedule=cfg["lr_schedule"],
        lr_gamma=cfg["lr_gamma"],
        warmup_epochs=cfg["warmup_epochs"],
        val_data=val,
        out=out,
        resume=resume,
        seed=None if resume else cfg["seed"],
        config={
            **cfg,
            **facts,
            "config_version": CONFIG_VERSION,
            "versions": {**versions, "python": platform.python_version()},
        },
        quiet=quiet,
        on_first_checkpoint=on_first_checkpoint,
        callback=callback,
    )


def load_module_params(module: torch.nn.Module, name: str, run_dir: str | Path, device: torch.device) -> dict:
    """Copy parameters trained in a run folder into ``module``: those of ``pyro.module(name, module)`` and of
    ``pyro.module(f"{name}.{child}", module.child)`` alike."""
    from .train import check_params, load_training_checkpoint

    ckpt = Path(run_dir) / "checkpoint.pt"
    if not ckpt.is_file():
        raise PyrovaeError(f"{run_dir} has no checkpoint.pt: train it first")
    state = load_training_checkpoint(ckpt, map_location=device)
    own = dict(module.named_parameters())
    saved = {}
    for key, value in state["params"].items():  # "vae.decoder$$$net.0.weight" -> "decoder.net.0.weight"
        owner, _, param = key.partition("$$$")
        if owner == name or owner.startswith(name + "."):
            saved[".".join(filter(None, [owner[len(name) + 1 :], param]))] = value
    check_params(ckpt, saved, own)
    with torch.no_grad():
        for key, p in own.items():
            p.copy_(saved[key])
    return state


def load_run(run_dir: str | Path, device: str = "auto") -> tuple[dict[str, Any], Splits, VAE]:
    """Rebuild a trained run: its config, its data splits and its VAE with the checkpoint's parameters."""
    cfg = read_config(run_dir)
    dev = resolve_device(device)
    splits = load_splits(cfg, dev)
    vae = build_model(cfg, splits)
    load_module_params(vae, vae.name, run_dir, dev)
    forget_module(vae.name)  # the store's entries of this name are another model's
    return cfg, splits, vae
