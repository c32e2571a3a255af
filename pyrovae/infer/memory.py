"""The memory planner of the log p(x) estimators: bytes per (particle, datapoint) probed, chunk sizes planned.

One call of a program on k particles (or chains) x b datapoints is probed off the RNG; the sweep then runs the
most pairs per call that fit the budget (on a CPU at most ``CPU_CHUNK_MB``, where larger chunks only run slower).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .handlers import off_rng
from .program import _callable_on_subsets, _log_weights, _Program

DEFAULT_MEMORY_MB = 1024.0
CPU_CHUNK_MB = 64.0  # on a CPU larger chunks only cost cache misses: 1024 MB ran 1.5x slower than 64 here


class _AllocatedBytes(TorchDispatchMode):
    """Counts the bytes of every fresh tensor an op returns (views and in-place results excluded).

    The total allocated is an upper bound on the peak of live tensor memory: a CPU has no peak counter.
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.total += t.untyped_storage().nbytes()
        return out


def _probe_particles(prog: _Program, args: tuple, kwargs: dict, b: int, k0: int) -> float | None:
    """Peak bytes per (particle, datapoint) of ``k0`` vectorised particles on ``b`` datapoints, off the RNG; None
    when the program breaks under vectorised particles (a net that flattens the leading dims, say).

    On CUDA the allocator's peak; on a CPU the bytes allocated in all (an upper bound on the peak).
    """
    cuda = prog.device.type == "cuda"
    try:
        with off_rng(prog.device), torch.no_grad():
            if cuda:
                torch.cuda.synchronize(prog.device)
                torch.cuda.reset_peak_memory_stats(prog.device)
                base = torch.cuda.memory_allocated(prog.device)
                log_w = _log_weights(*prog.traces(args, kwargs, k0), prog, k0, b)
                used = torch.cuda.max_memory_allocated(prog.device) - base
            else:
                with _AllocatedBytes() as counter:
                    log_w = _log_weights(*prog.traces(args, kwargs, k0), prog, k0, b)
                used = counter.total
    except Exception:  # noqa: BLE001 - the program's shapes do not survive a particle dim
        return None
    if log_w.shape != (k0, b):
        return None
    return max(float(used), 64.0) / (k0 * b)


@dataclass
class Layout:
    """How a program can be swept: on subsets of its datapoints, with vectorised particles, at what bytes per pair."""

    subsets: bool  # it runs on a few of its datapoints (an amortised guide)
    vectorised: bool  # its shapes survive a particle (chain) dim
    per_pair: float  # bytes per (particle, datapoint) of one forward call


def probe_layout(prog: _Program, k: int, batch_size: int | None, fallback: str) -> Layout:
    """:class:`Layout` from probes on the first datapoints, off the RNG; warns with ``fallback`` (what then runs
    slower) when the program fails with a particle dim."""
    n = prog.n
    probe_b, subsets = n, False
    if batch_size is None or batch_size < n:
        subsets = _callable_on_subsets(prog)
        probe_b = min(n - 1, 8) if subsets else n
    k0 = min(8 if subsets else 2, k)
    per_pair = _probe_particles(prog, *prog.subset(0, probe_b), probe_b, k0) if k0 > 1 else None
    vectorised = k0 > 1 and per_pair is not None
    if k0 > 1 and not vectorised:
        warnings.warn(
            f"the program fails with a particle dim (does a net flatten its input's leading dims?): {fallback}, "
            "which is slower",
            stacklevel=4,
        )
    if per_pair is None:
        with off_rng(prog.device), torch.no_grad():  # one particle: its bytes per datapoint
            counter = _AllocatedBytes()
            with counter:
                prog.traces(*prog.subset(0, probe_b), None)
        per_pair = max(float(counter.total), 64.0) / probe_b
    return Layout(subsets, vectorised, per_pair)


def chunk_budget_mb(memory_mb: float | None, device: torch.device) -> float:
    """The memory a sweep's calls plan for: the user's budget (default 1024 MB), a ceiling, and on a CPU at
    most ``CPU_CHUNK_MB``, where larger chunks only run slower."""
    budget = memory_mb or DEFAULT_MEMORY_MB
    return min(budget, CPU_CHUNK_MB) if device.type == "cpu" else budget


def _plan(
    k: int,
    n: int,
    chunk_size: int | None,
    batch_size: int | None,
    memory_mb: float | None,
    bytes_per_pair: Callable,
) -> tuple[int, int]:
    """Particles per call and datapoints per call: the given ones, else the most that fit in ``memory_mb``."""
    if chunk_size is not None and batch_size is not None:
        return min(chunk_size, k), min(batch_size, n)
    pairs = max(1, int((memory_mb or DEFAULT_MEMORY_MB) * 2**20 / bytes_per_pair()))
    kc = min(k, chunk_size or (pairs if batch_size is None else max(1, pairs // batch_size)))
    b = min(n, batch_size or max(1, pairs // kc))
    return kc, b
