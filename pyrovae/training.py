"""Training into a run folder safely: the library half of ``pyrovae train`` and ``pyrovae train-masked``.

A run folder is written by one command at a time (its :class:`~pyrovae.files.RunLock`), never over a run
unless told to resume or overwrite it, and an overwritten run's results (evaluations, figures) are removed
only once the new run has written its first checkpoint. Under torchrun only global rank 0 touches the folder;
under pyrovae's own launcher (:func:`train_parallel`) the launcher holds the lock for its workers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

from . import distributed
from .config import RunConfig
from .errors import PyrovaeError
from .files import RunLock, check_run_folder, remove_derived, remove_stale_temp_files
from .runs import build_for_training, load_module_state, resolve_device, train_vae
from .train import FitResult


def train_run(
    out: str,
    config: Callable[[], RunConfig],
    *,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    masked: bool = False,
    tensorboard: str | Path | None = None,
    timeout: float = distributed.DEFAULT_TIMEOUT,
) -> tuple[RunConfig, FitResult]:
    """Train the run ``config()`` describes into ``out`` (a masked VAE with ``masked``); returns (config, result).

    ``config`` is called once the folder is locked, so that on ``resume`` it reads the saved run no other
    command can change any more; it raises to refuse the options. Data-parallel training (under torchrun)
    joins the process group here, with ``timeout`` seconds for a collective to wait on a peer (a dead or
    hung one is then a one-line :class:`~pyrovae.errors.PeerLost`); ``masked`` runs train in one process."""
    check_run_folder(out, resume=resume, overwrite=overwrite)  # refuse before the lock makes the folder
    first = distributed.env_rank() == 0
    locking = first and not distributed.under_launcher()  # pyrovae's launcher holds the lock for its workers
    with RunLock(out) if locking else nullcontext():
        folder = check_run_folder(out, resume=resume, overwrite=overwrite)  # again, now that it is ours
        cfg = config()
        # the old run (with overwrite) is replaced only once the new one has written its first checkpoint
        replaced = (lambda: remove_derived(folder)) if overwrite and first else None
        if masked:
            from .tasks.complete import train_masked

            _, _, result = train_masked(cfg, folder, resume=resume, quiet=quiet, on_first_checkpoint=replaced)
            return cfg, result
        finished = False
        try:
            with distributed.peer_failures(timeout):
                # under torchrun: join the process group, pick the GPU
                distributed.setup(resolve_device(cfg.training.device), timeout)
                _, _, result = train_vae(
                    cfg,
                    folder,
                    resume=resume,
                    quiet=quiet,
                    on_first_checkpoint=replaced,
                    tensorboard=tensorboard if first else None,
                )
            finished = True
        finally:
            try:
                distributed.teardown(wait=finished)  # after a failure a peer may be dead: no barrier
            except KeyboardInterrupt:  # torchrun stopping the survivors of a lost worker: keep the error that says why
                if finished:
                    raise
    return cfg, result


def check_training(cfg: RunConfig, out: str | Path, *, resume: bool = False, nproc: int = 1) -> None:
    """Refuse, before any worker starts, what a training of ``cfg`` into ``out`` would refuse: the data (loaded,
    on the CPU, and checked against the model), too few datapoints for ``nproc`` processes, and on ``resume``
    a checkpoint that is missing, unreadable, of another model or already as long as asked."""
    from .train.state import check_epochs_left, load_training_checkpoint

    cpu = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, device="cpu"))
    _, splits, module = build_for_training(cpu, "vae")
    if len(splits.train) < nproc:
        raise PyrovaeError(f"{nproc} processes need at least {nproc} training datapoints, got {len(splits.train)}")
    if resume:
        path = Path(out) / "checkpoint.pt"
        if not path.is_file():
            raise PyrovaeError(f"nothing to resume: no checkpoint.pt in {out}")
        saved = load_training_checkpoint(path, map_location="cpu")
        check_epochs_left(Path(out), int(saved["epoch"]), cfg.training.epochs)
        load_module_state(module, path, resolve_device("cpu"))


def saved_progress(out: str | Path) -> tuple[int, int] | None:
    """How far the run in ``out`` has saved: (epochs done, batches of the next one), or None without a readable checkpoint."""
    from .train import load_checkpoint

    path = Path(out) / "checkpoint.pt"
    try:
        state = load_checkpoint(path) if path.is_file() else None
        return (int(state["epoch"]), int(state.get("batch", 0))) if state is not None else None
    except (PyrovaeError, KeyError, TypeError, ValueError):
        return None


def train_parallel(
    out: str,
    config: Callable[[], RunConfig],
    argv: Sequence[str],
    *,
    nproc: int,
    resume: bool = False,
    overwrite: bool = False,
    timeout: float = distributed.DEFAULT_TIMEOUT,
) -> tuple[RunConfig, distributed.Outcome, str]:
    """Train in ``nproc`` worker processes, each running ``python -m pyrovae ARGV``: (config, outcome, the output
    of workers other than rank 0).

    Checked once before any worker starts, as one process would be (options by ``config()``, the run folder,
    the data, the checkpoint on ``resume``); the launcher holds the run folder's lock while its workers train."""
    check_run_folder(out, resume=resume, overwrite=overwrite)
    with RunLock(out):
        check_run_folder(out, resume=resume, overwrite=overwrite)
        cfg = config()
        check_training(cfg, out, resume=resume, nproc=nproc)
        exits, log = distributed.launch(nproc, argv, timeout=timeout)
        remove_stale_temp_files(out)  # of a worker killed while it wrote the checkpoint (the last one stays)
    return cfg, distributed.outcome(exits), log
