"""Callbacks: what happens around the loop's steps and epochs (files, progress, stopping), each replaceable.

:func:`pyrovae.fit` builds :func:`default_callbacks` (stop on a signal, NaN guard, progress bar, checkpoint,
metrics CSV); a callback passed in ``callbacks=`` takes the place of a default of its class, or joins
after them. Hooks get the running :class:`pyrovae.train.loop.Loop` (its ``state``, ``strategy``, ``stop``).
"""

from __future__ import annotations

import csv
import io
import math
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from ..errors import NonFiniteLoss
from ..files import atomic_write, remove_stale_temp_files, write_json
from .state import TrainState
from .strategy import Strategy

METRIC_COLUMNS = ["epoch", "train_elbo", "val_elbo", "seconds", "beta", "lr"]


class Loop(Protocol):
    """What a callback sees of the epoch loop (:class:`pyrovae.train.loop.Loop` is one): declared here, so that
    this module needs nothing from the loop's, which imports it."""

    state: TrainState
    strategy: Strategy
    callbacks: Callback
    stop: StopFlag
    epochs: int
    steps_per_epoch: int
    resumed: bool


class Callback:
    """A no-op for every hook; subclass and override those you need."""

    def on_fit_start(self, loop: Loop) -> None:
        """Before the first step (after a resume has restored the state)."""

    def on_step_end(self, loop: Loop) -> None:
        """After each optimiser step (keep it cheap: it runs in the hot loop)."""

    def on_nonfinite(self, loop: Loop, batch: int) -> None:
        """A loss of the current epoch, first at ``batch``, was NaN or infinite (raise to stop)."""

    def on_epoch_end(self, loop: Loop, row: dict[str, float]) -> None:
        """After each epoch, with its metrics (``METRIC_COLUMNS``); ``loop.state`` counts it done."""

    def on_interrupt(self, loop: Loop) -> None:
        """Training stops between two steps (Ctrl-C, SIGTERM, ``max_steps``) after at least one step."""

    def on_checkpoint(self, loop: Loop, path: Path) -> None:
        """Rank 0 has just written checkpoint ``path``."""

    def on_fit_end(self, loop: Loop) -> None:
        """Training finished or was interrupted (not after an exception)."""

    def teardown(self, loop: Loop) -> None:
        """Always last, exception or not: release what ``on_fit_start`` took."""


class CallbackList(Callback):
    """Calls each hook on every callback in order."""

    def __init__(self, callbacks: Sequence[Callback]) -> None:
        self.callbacks = list(callbacks)
        self._on_step = [c for c in self.callbacks if type(c).on_step_end is not Callback.on_step_end]

    def on_fit_start(self, loop: Loop) -> None:
        for c in self.callbacks:
            c.on_fit_start(loop)

    def on_step_end(self, loop: Loop) -> None:
        for c in self._on_step:
            c.on_step_end(loop)

    def on_nonfinite(self, loop: Loop, batch: int) -> None:
        for c in self.callbacks:
            c.on_nonfinite(loop, batch)

    def on_epoch_end(self, loop: Loop, row: dict[str, float]) -> None:
        for c in self.callbacks:
            c.on_epoch_end(loop, row)

    def on_interrupt(self, loop: Loop) -> None:
        for c in self.callbacks:
            c.on_interrupt(loop)

    def on_checkpoint(self, loop: Loop, path: Path) -> None:
        for c in self.callbacks:
            c.on_checkpoint(loop, path)

    def on_fit_end(self, loop: Loop) -> None:
        for c in self.callbacks:
            c.on_fit_end(loop)

    def teardown(self, loop: Loop) -> None:
        for c in self.callbacks:
            c.teardown(loop)


def merge_callbacks(defaults: Sequence[Callback], given: Sequence[Callback]) -> list[Callback]:
    """``defaults`` with each replaced in place by a given callback of its class; the other given ones after."""
    merged, extra = list(defaults), []
    for cb in given:
        i = next((i for i, d in enumerate(merged) if d in defaults and isinstance(cb, type(d))), None)
        if i is None:
            extra.append(cb)
        else:
            merged[i] = cb
    return merged + extra


# ------------------------------------------------------------------------------------ stopping
class StopFlag:
    """Set by SIGINT (Ctrl-C) or SIGTERM (a scheduler's stop) so that training stops between two steps.

    A second signal stops at once, except while a checkpoint is being written (``saving``): that write
    always finishes. Anything may set ``set`` to stop the loop at its next step.
    """

    def __init__(self) -> None:
        self.set = False
        self.saving = False
        self._signals = (signal.SIGINT, signal.SIGTERM)
        self._previous: dict = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self._signals}
        return self

    def _handle(self, signum, frame) -> None:
        if self.set and not self.saving:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous = {}


class StopOnSignal(Callback):
    """Ctrl-C or SIGTERM stops training between two steps (a checkpoint is saved) instead of killing it."""

    def on_fit_start(self, loop: Loop) -> None:
        loop.stop.__enter__()

    def teardown(self, loop: Loop) -> None:
        loop.stop.__exit__()


class NaNGuard(Callback):
    """Stops training with a one-line :class:`NonFiniteLoss` when a loss is NaN or infinite."""

    def __init__(self, checkpoint: Path | None = None) -> None:
        self.checkpoint = checkpoint

    def on_nonfinite(self, loop: Loop, batch: int) -> None:
        ckpt = self.checkpoint
        kept = f"; the last good checkpoint stays in {ckpt}" if ckpt is not None and ckpt.exists() else ""
        raise NonFiniteLoss(
            f"the loss became NaN or infinite at epoch {loop.state.epoch + 1}, batch {batch + 1}{kept}; "
            "try a lower --lr or --clip-norm"
        )


# ------------------------------------------------------------------------------------------ files
def write_metrics(path: Path, history: list[dict[str, float]]) -> None:
    """``metrics.csv``: one row per epoch of ``history``, atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write(path, buf.getvalue().encode())


class Checkpoint(Callback):
    """``out/checkpoint.pt`` (the whole :class:`TrainState`, atomically) after every epoch and on a stop, and
    ``config.json`` with the first; nothing in ``out`` changes before that first checkpoint."""

    def __init__(self, out: Path) -> None:
        self.out, self.path, self.saves = out, out / "checkpoint.pt", 0

    def on_fit_start(self, loop: Loop) -> None:
        if loop.strategy.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            remove_stale_temp_files(self.out)  # of writers killed mid-write

    def on_epoch_end(self, loop: Loop, row: dict[str, float]) -> None:
        self.save(loop)

    def on_interrupt(self, loop: Loop) -> None:
        self.save(loop)

    def save(self, loop: Loop) -> None:
        """Every rank calls this (the state gathers from all); rank 0 writes."""
        loop.stop.saving = True  # a second Ctrl-C now must not cut the write
        try:
            state = loop.state.state_dict(loop.strategy)
            if state is not None:
                atomic_write(self.path, lambda f: torch.save(state, f))
                if self.saves == 0 and loop.state.config is not None:
                    write_json(self.out / "config.json", loop.state.config)
                loop.callbacks.on_checkpoint(loop, self.path)
        finally:
            loop.stop.saving = False
        self.saves += 1


class MetricsCSV(Callback):
    """``out/metrics.csv``, rewritten from the history with every checkpoint (so it follows the checkpoint,
    even when a kill left it one epoch behind)."""

    def __init__(self, out: Path) -> None:
        self.path = out / "metrics.csv"

    def on_fit_start(self, loop: Loop) -> None:
        if loop.resumed and loop.strategy.rank == 0:
            write_metrics(self.path, loop.state.history)

    def on_checkpoint(self, loop: Loop, path: Path) -> None:
        write_metrics(self.path, loop.state.history)


class OnFirstCheckpoint(Callback):
    """Calls ``fn()`` once, after the first checkpoint (and its config and metrics) is written."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn, self.done = fn, False

    def on_checkpoint(self, loop: Loop, path: Path) -> None:
        if not self.done:
            self.done = True
            self.fn()


class EpochFunction(Callback):
    """A plain callable ``fn(row)`` called after every epoch with its metrics: ``fit``'s ``callback=``."""

    def __init__(self, fn: Callable[[dict[str, float]], None]) -> None:
        self.fn = fn

    def on_epoch_end(self, loop: Loop, row: dict[str, float]) -> None:
        self.fn(row)


class ProgressBar(Callback):
    """A tqdm bar over the steps (on a terminal) and one line per epoch on stderr, unless ``quiet`` or not rank 0."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet, self.bar = quiet, None

    def on_fit_start(self, loop: Loop) -> None:
        self.quiet = self.quiet or loop.strategy.rank != 0
        self.bar = tqdm(
            total=(loop.epochs - loop.state.epoch) * loop.steps_per_epoch - loop.state.batch,
            disable=self.quiet or not sys.stderr.isatty(),
            unit="step",
            dynamic_ncols=True,
        )

    def on_step_end(self, loop: Loop) -> None:
        self.bar.update()

    def on_epoch_end(self, loop: Loop, row: dict[str, float]) -> None:
        if not self.quiet:
            val = "" if math.isnan(row["val_elbo"]) else f"val ELBO {row['val_elbo']:.2f}  "  # no validation data
            msg = f"epoch {int(row['epoch'])}/{loop.epochs}  train ELBO {row['train_elbo']:.2f}  {val}{row['seconds']:.1f}s"
            self.bar.write(msg, file=sys.stderr)

    def teardown(self, loop: Loop) -> None:
        if self.bar is not None:
            self.bar.close()


def default_callbacks(
    out: Path | None,
    quiet: bool = False,
    on_first_checkpoint: Callable[[], None] | None = None,
) -> list[Callback]:
    """What ``fit`` does around its loop unless told otherwise: stop on a signal, fail on NaN, a progress
    bar, and with ``out`` a checkpoint, ``metrics.csv`` and ``on_first_checkpoint``."""
    callbacks: list[Callback] = [StopOnSignal(), NaNGuard(out / "checkpoint.pt" if out is not None else None)]
    callbacks.append(ProgressBar(quiet))
    if out is not None:
        callbacks += [Checkpoint(out), MetricsCSV(out)]
        if on_first_checkpoint is not None:
            callbacks.append(OnFirstCheckpoint(on_first_checkpoint))
    return callbacks
