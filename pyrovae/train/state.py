"""``TrainState``: everything a training run needs to continue exactly where it stopped, saved and restored whole.

Its ``state_dict`` is the checkpoint (``checkpoint.pt``: the keys of :data:`CHECKPOINT_KEYS` and the RNG
states of every rank). The trained modules are saved whole under their role (``modules``: ``{"model":
vae.state_dict()}``, buffers included), so a module renamed in Pyro's param store still reads back; only
parameters that belong to no module (a bare ``pyro.param``) are kept by param-store name (``params``).
Checkpoints of earlier releases (every parameter by its ``owner$$$param`` name, no ``modules``) still load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyro
import torch

from ..errors import PyrovaeError
from ..files import load_weights
from .strategy import Strategy

CHECKPOINT_KEYS = ("epoch", "batch", "perm", "partial", "params", "optimizer", "history")


def load_checkpoint(path: Path, map_location: torch.device | str | None = None) -> dict:
    """A checkpoint's contents, loaded without running any code it might hold (see :func:`load_weights`)."""
    state = load_weights(path, map_location=map_location)
    if not isinstance(state, dict):
        raise PyrovaeError(f"{path} is not a pyrovae checkpoint: it holds a {type(state).__name__}, not a dict")
    return state


def load_training_checkpoint(path: Path, map_location: torch.device | str | None = None) -> dict:
    """A checkpoint written by :func:`fit`, with its keys checked (a one-line error when one is missing)."""
    state = load_checkpoint(path, map_location)
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing or not isinstance(state["params"], dict):
        raise PyrovaeError(f"{path} is not a pyrovae training checkpoint: it has no {(missing or ['params'])[0]!r}")
    return state


def check_epochs_left(out: Path | None, done: int, epochs: int) -> None:
    """Refuse to resume a run of ``done`` epochs for ``epochs`` in total unless that is more."""
    if epochs <= done:
        raise PyrovaeError(
            f"{out} has already trained {done} epochs; to continue it, ask for more "
            f"(--epochs {done + 1} or above), not {epochs}"
        )


def check_params(path: Path, saved: dict[str, Any], own: dict[str, torch.Tensor], strict: bool = False) -> None:
    """Refuse a checkpoint whose parameters do not match a model's, by name and by shape (``strict``: and
    none that the model lacks)."""
    if strict:
        extra = [name for name in saved if name not in own]
        if extra:
            raise PyrovaeError(
                f"checkpoint {path} does not match this model: it has {extra[0]}, which this model lacks"
            )
    for name, p in own.items():
        value = saved.get(name)
        if value is None:
            raise PyrovaeError(f"checkpoint {path} does not match this model: it has no {name}")
        if not isinstance(value, torch.Tensor) or value.shape != p.shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise PyrovaeError(
                f"checkpoint {path} does not match this model: {name} is {shape} there, {tuple(p.shape)} here "
                "(another architecture)"
            )


def module_tensors(modules: dict[str, torch.nn.Module]) -> set[int]:
    """The ids of every tensor (parameters and buffers) the modules' state_dicts hold."""
    return {id(t) for m in modules.values() for t in m.state_dict(keep_vars=True).values()}


def module_states(modules: dict[str, torch.nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    """Each module's state_dict (parameters and buffers), detached copies, by role."""
    return {role: {k: v.detach().clone() for k, v in m.state_dict().items()} for role, m in modules.items()}


def load_modules(path: Path, saved: Any, modules: dict[str, torch.nn.Module]) -> None:
    """Copy a checkpoint's module states into ``modules`` in place (the optimiser keeps its tensors); a role,
    key or shape that does not match is a one-line error."""
    for role, module in modules.items():
        state = saved.get(role) if isinstance(saved, dict) else None
        if not isinstance(state, dict):
            raise PyrovaeError(f"checkpoint {path} does not match this model: it has no module {role!r}")
        check_params(path, state, module.state_dict(), strict=True)
        module.load_state_dict(state)


def rng_state() -> dict:
    """Python's, numpy's and torch's RNG states (and every GPU's)."""
    state = pyro.util.get_rng_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    pyro.util.set_rng_state({k: v for k, v in state.items() if k != "cuda"})
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class TrainState:
    """Parameters by name, optimiser, scheduler, epoch, position within the epoch and its partial loss sums."""

    params: dict[str, torch.Tensor]  # the unconstrained leaves the optimiser steps, by param-store name
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    epoch: int = 0  # epochs done
    batch: int = 0  # steps done in the current epoch
    perm: torch.Tensor | None = None  # the current epoch's order of the data; None between epochs
    loss_sum: torch.Tensor | None = None  # the epoch's loss so far (float64), each batch weighted by its share of N
    first_bad: torch.Tensor | None = None  # the epoch's first batch with a non-finite loss (-1: none)
    history: list[dict[str, float]] = field(default_factory=list)
    perm_seed: int | None = None  # seeds the shared permutations of data-parallel ranks
    config: dict | None = None  # the run's config, kept with the checkpoint
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)  # saved whole by role (buffers too)

    def begin_epoch(self, perm: torch.Tensor) -> None:
        """Start an epoch over ``perm``, its sums at zero."""
        self.perm, self.batch = perm, 0
        self._reset_sums(torch.zeros((), device=perm.device, dtype=torch.float64))

    def end_epoch(self) -> None:
        """Count the epoch done: the next starts from a fresh permutation."""
        self.epoch, self.batch, self.perm, self.loss_sum = self.epoch + 1, 0, None, None

    def _reset_sums(self, loss_sum: torch.Tensor) -> None:
        self.loss_sum = loss_sum
        self.first_bad = torch.full((), -1, device=loss_sum.device, dtype=torch.long)

    def partial(self) -> float:
        """This rank's loss sum of the epoch so far (reads the device)."""
        return float(self.loss_sum) if self.loss_sum is not None else 0.0

    def state_dict(self, strategy: Strategy) -> dict | None:
        """The checkpoint: every rank calls this (it gathers RNG states and sums); rank 0 gets it, others None."""
        rng = strategy.gather(rng_state())  # every rank's: exact resume
        partial = strategy.sum(self.partial())
        if strategy.rank != 0:
            return None
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "perm": self.perm,
            "partial": partial,
            "modules": module_states(self.modules),
            "params": {name: p.detach().clone() for name, p in self._loose().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "rng": rng[0],
            "rng_ranks": rng if strategy.size > 1 else None,
            "world_size": strategy.size,
            "perm_seed": self.perm_seed,
            "history": self.history,
            "config": self.config,
        }

    def _loose(self) -> dict[str, torch.Tensor]:
        """The parameters that belong to none of ``modules`` (a bare ``pyro.param``), by param-store name."""
        owned = module_tensors(self.modules)
        return {name: p for name, p in self.params.items() if id(p) not in owned}

    def load_state_dict(self, state: dict, strategy: Strategy, device: torch.device, path: Path) -> int:
        """Continue from checkpoint ``state`` (read from ``path``); returns the number of processes that wrote it.

        The RNG states come back only when as many processes resume as saved (then the resume is bit-exact).
        """
        loose = self.params  # a checkpoint of an earlier release: every parameter by param-store name
        if "modules" in state:
            load_modules(path, state["modules"], self.modules)
            loose = self._loose()
        check_params(path, state["params"], loose)
        with torch.no_grad():
            for name, p in loose.items():
                p.copy_(state["params"][name])
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler is not None and state.get("scheduler"):
                self.scheduler.load_state_dict(state["scheduler"])
        except (ValueError, KeyError, TypeError) as exc:
            raise PyrovaeError(f"checkpoint {path} does not match this model's optimiser: {exc}") from None
        self.epoch, self.batch, self.history = state["epoch"], state["batch"], state["history"]
        self.perm = state["perm"].to(device) if state["perm"] is not None else None
        partial = state["partial"] if strategy.rank == 0 else 0.0  # rank 0 holds the sum
        self._reset_sums(torch.tensor(partial, device=device, dtype=torch.float64))
        self.perm_seed, saved_world = state.get("perm_seed"), state.get("world_size", 1)
        if self.batch and saved_world != strategy.size:
            raise PyrovaeError(f"{path} stopped mid-epoch with {saved_world} processes: resume it with as many")
        if saved_world == strategy.size:
            set_rng_state(state["rng"] if strategy.size == 1 else state["rng_ranks"][strategy.rank])
        self.config = self.config or state.get("config")
        return saved_world
