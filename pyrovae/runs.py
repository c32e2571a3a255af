"""A run folder: rebuild data and model from ``config.json``, and load trained parameters.

A run's config is a flat dict of the ``pyrovae train`` options (see :data:`DEFAULTS`); everything
needed to rebuild the run lives there, so ``evaluate`` and ``--resume`` need nothing else.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyro
import torch

from .data import Pixels, Splits, load_dataset, make_splits, synthetic
from .errors import PyrovaeError
from .models import VAE, build_vae
from .nets import ACTIVATIONS, PRESETS

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
    "val_size": 5000,
    "train_size": None,
    "device": "auto",
    "seed": 0,
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
    val_size = min(cfg["val_size"], len(raw.train_x) // 5) if cfg["dataset"] == "synthetic" else cfg["val_size"]
    return make_splits(raw, pixels, device, val_size=val_size, train_size=cfg.get("train_size"), seed=cfg["seed"])


def build_model(cfg: dict[str, Any], splits: Splits) -> VAE:
    """The run's VAE, on the data's device, checked against the data's support."""
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
    vae = build_vae(
        splits.train.shape,
        cfg["likelihood"],
        arch,
        pixel_mean=splits.train_pixel_mean.cpu(),
        sigma=cfg.get("sigma"),
    ).to(splits.train.device)
    sample = splits.train.batch(torch.arange(min(1000, len(splits.train)), device=splits.train.device))
    vae.likelihood.check_support(sample, allow=cfg.get("allow_nonbinary", False))
    return vae


def read_config(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise PyrovaeError(f"{run_dir} is not a run folder: no config.json (make one with 'pyrovae train --out')")
    try:
        return {**DEFAULTS, **json.loads(path.read_text())}
    except json.JSONDecodeError as exc:
        raise PyrovaeError(f"{path} is not valid JSON: {exc}") from None


def load_run(run_dir: str | Path, device: str = "auto") -> tuple[dict[str, Any], Splits, VAE]:
    """Rebuild a trained run: its config, its data splits and its VAE with the checkpoint's parameters."""
    from .train import load_checkpoint

    cfg = read_config(run_dir)
    dev = resolve_device(device)
    splits = load_splits(cfg, dev)
    vae = build_model(cfg, splits)
    ckpt = Path(run_dir) / "checkpoint.pt"
    if not ckpt.is_file():
        raise PyrovaeError(f"{run_dir} has no checkpoint.pt: train it first")
    state = load_checkpoint(ckpt, map_location=dev)
    prefix = vae.name + "$$$"
    own = dict(vae.named_parameters())
    with torch.no_grad():
        for name, value in state["params"].items():
            if name.startswith(prefix) and name[len(prefix) :] in own:
                own[name[len(prefix) :]].copy_(value)
    pyro.clear_param_store()
    return cfg, splits, vae
