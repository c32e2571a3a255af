"""Training into a run folder safely: the library half of ``pyrovae train`` and ``pyrovae train-masked``.

A run folder is written by one command at a time (its :class:`~pyrovae.files.RunLock`), never over a run
unless told to resume or overwrite it, and an overwritten run's results (evaluations, figures) are removed
only once the new run has written its first checkpoint. Under torchrun only global rank 0 touches the folder.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

from . import distributed
from .config import RunConfig
from .files import RunLock, check_run_folder, remove_derived
from .runs import resolve_device, train_vae
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
) -> tuple[RunConfig, FitResult]:
    """Train the run ``config()`` describes into ``out`` (a masked VAE with ``masked``); returns (config, result).

    ``config`` is called once the folder is locked, so that on ``resume`` it reads the saved run no other
    command can change any more; it raises to refuse the options. Data-parallel training (under torchrun)
    joins the process group here; ``masked`` runs train in one process."""
    check_run_folder(out, resume=resume, overwrite=overwrite)  # refuse before the lock makes the folder
    first = distributed.env_rank() == 0
    with RunLock(out) if first else nullcontext():
        folder = check_run_folder(out, resume=resume, overwrite=overwrite)  # again, now that it is ours
        cfg = config()
        # the old run (with overwrite) is replaced only once the new one has written its first checkpoint
        replaced = (lambda: remove_derived(folder)) if overwrite and first else None
        if masked:
            from .tasks.complete import train_masked

            _, _, result = train_masked(cfg, folder, resume=resume, quiet=quiet, on_first_checkpoint=replaced)
            return cfg, result
        try:
            distributed.setup(
                resolve_device(cfg.training.device)
            )  # under torchrun: join the process group, pick the GPU
            _, _, result = train_vae(
                cfg,
                folder,
                resume=resume,
                quiet=quiet,
                on_first_checkpoint=replaced,
                tensorboard=tensorboard if first else None,
            )
        finally:
            distributed.teardown()
    return cfg, result
