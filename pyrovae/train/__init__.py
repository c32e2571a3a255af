"""Training: ``fit`` any Pyro model/guide pair on a device-resident dataset.

One concept per module: ``state`` (:class:`TrainState`, the checkpoint), ``program`` (the model/guide
pair's loss and parameters), ``strategy`` (one process or data-parallel: sharding and collectives),
``callbacks`` (checkpoint, metrics CSV, progress bar, NaN guard, Ctrl-C stop), ``loop`` (``fit`` and the
epoch loop), ``validation`` (``evaluate_elbo``).

Data-parallel: when a ``torch.distributed`` process group of several ranks is up (torchrun), each
rank trains on its shard of every epoch and gradients are averaged; see :mod:`pyrovae.distributed`.
Plain DDP rather than PyTorch Lightning Fabric (measured by ``bench/fabric_strategy.py``: no faster, not
exact on resume without this state, 64 of ~540 lines saved): the loop resumes bit-exactly mid-epoch from its own
state (permutation, partial sums, every rank's RNG) and Pyro's param store stays the home of parameters.
"""

from ..files import atomic_write, write_json
from .callbacks import (
    METRIC_COLUMNS,
    Callback,
    Checkpoint,
    EpochFunction,
    MetricsCSV,
    NaNGuard,
    OnFirstCheckpoint,
    ProgressBar,
    StopFlag,
    StopOnSignal,
    default_callbacks,
    write_metrics,
)
from .loop import LR_SCHEDULES, FitResult, Loop, fit
from .state import CHECKPOINT_KEYS, TrainState, check_params, load_checkpoint, load_training_checkpoint
from .strategy import DataParallel, Strategy, current_strategy
from .validation import evaluate_elbo

_StopFlag = StopFlag  # the name tests and older code know

__all__ = [
    "CHECKPOINT_KEYS",
    "LR_SCHEDULES",
    "METRIC_COLUMNS",
    "Callback",
    "Checkpoint",
    "DataParallel",
    "EpochFunction",
    "FitResult",
    "Loop",
    "MetricsCSV",
    "NaNGuard",
    "OnFirstCheckpoint",
    "ProgressBar",
    "StopFlag",
    "StopOnSignal",
    "Strategy",
    "TrainState",
    "atomic_write",
    "check_params",
    "current_strategy",
    "default_callbacks",
    "evaluate_elbo",
    "fit",
    "load_checkpoint",
    "load_training_checkpoint",
    "write_json",
    "write_metrics",
]
