"""The contract between pyrovae and a Pyro program: the minibatch scale is pyrovae's job, not the program's.

A program written as Pyro's tutorials write them (``model(x)``, ``guide(x)``, a plain
``pyro.plate("data", x.shape[0])``) trains on minibatches under :class:`DataScale`, which scales the
log-probability of every site inside the data plate by N/B and leaves global sites outside it alone,
exactly as a plate subsampled by Pyro itself (``pyro.plate("data", N, subsample_size=B)``) would.
Programs that take ``num_data`` or subsample their own plate are scaled by Pyro and left alone here.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable

import pyro.poutine as poutine
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample

from ..errors import PyrovaeError

PARTICLE_PLATE = "num_particles_vectorized"  # Pyro's plate of vectorised particles: never the data plate

DATA_PLATE = "data"


class DataScale(Messenger):
    """Scale sample sites inside the plate named ``plate`` by ``num_data / plate size``, as if subsampled.

    The site's plate frame gets ``full_size=num_data``, as Pyro's subsampled plates record it, so that
    estimators that divide the scale back out per datapoint (IWAE, Rényi) see a subsampled plate.
    A plate that is already subsampled (its full size differs from its size) is Pyro's to scale.
    """

    def __init__(self, num_data: int, plate: str = DATA_PLATE) -> None:
        super().__init__()
        self.num_data, self.plate = int(num_data), plate

    def _process_message(self, msg) -> None:
        if msg["type"] != "sample":
            return
        stack = msg["cond_indep_stack"]
        for i, f in enumerate(stack):
            if f.name == self.plate:
                if (f.full_size is None or f.full_size == f.size) and f.size != self.num_data:
                    msg["scale"] = msg["scale"] * (self.num_data / f.size)
                    msg["cond_indep_stack"] = stack[:i] + (f._replace(full_size=self.num_data),) + stack[i + 1 :]
                return


def sample_frames(*traces: Trace) -> list[tuple[str, tuple]]:
    """(site name, plate frames) of every sample site of the traces, the plates' own subsample sites left out."""
    return [
        (name, site["cond_indep_stack"])
        for tr in traces
        for name, site in tr.nodes.items()
        if site["type"] == "sample" and not site_is_subsample(site)
    ]


def find_data_plate(frames: Iterable, batch_size: int | None = None, name: str | None = None) -> str | None:
    """The data plate's name among plate ``frames``: ``name`` if given, else ``data``, else the plate of ``batch_size``.

    None when the program has no such plate (nothing is then scaled: every site is global).
    """
    frames = [f for f in frames if f.name != PARTICLE_PLATE]
    names = {f.name for f in frames}
    if name is not None:
        if name not in names:
            found = ", ".join(sorted(names)) or "none"
            raise PyrovaeError(f"the program has no plate named {name!r} (its plates: {found})")
        return name
    if DATA_PLATE in names:
        return DATA_PLATE
    sized = [f.name for f in frames if f.size == batch_size]
    return sized[0] if sized else None


def accepts(fn: Callable, keyword: str) -> bool:
    """Whether ``fn`` names ``keyword`` among its parameters (``**kwargs`` alone does not count: it may forward)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return False
    p = params.get(keyword)
    return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)


def bind_num_data(model: Callable, guide: Callable, n: int) -> tuple[Callable, Callable, dict[str, int]]:
    """Model, guide and keyword arguments that pass ``num_data=n`` only to the programs that take it.

    Both take it: the programs unchanged and ``{"num_data": n}`` (the built-in VAE's path, nothing added).
    """
    m, g = accepts(model, "num_data"), accepts(guide, "num_data")
    if m and g:
        return model, guide, {"num_data": n}
    return (
        functools.partial(model, num_data=n) if m else model,
        functools.partial(guide, num_data=n) if g else guide,
        {},
    )


class PlateRecorder(Messenger):
    """Records the plate frames of every sample site that passes (outermost, so it sees every plate)."""

    def __init__(self) -> None:
        super().__init__()
        self.frames: list = []

    def _postprocess_message(self, msg) -> None:
        if msg["type"] == "sample" and not site_is_subsample(msg):
            self.frames.extend(msg["cond_indep_stack"])


def scale_for(frames: list, batch: int | None, num_data: int, plate: str | None = None) -> DataScale | None:
    """The :class:`DataScale` a minibatch of ``batch`` datapoints needs, given the plate frames of one run.

    None when nothing needs scaling: the batch is the whole data, the program has no data plate, or it
    subsamples that plate itself (``num_data`` or ``subsample=``), so that Pyro already scales it.
    """
    name = find_data_plate(frames, batch, plate)
    if any(f.name == name and (f.full_size is None or f.full_size == f.size) and f.size != num_data for f in frames):
        return DataScale(num_data, name)
    return None


def off_rng(device: torch.device | str):
    """Draws inside do not move torch's RNG (the CPU's, and ``device``'s if CUDA): a probe or a side computation
    leaves the draws that follow as they would be without it."""
    device = torch.device(device)
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def minibatch_scale(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    num_data: int,
    plate: str | None = None,
) -> DataScale | None:
    """:func:`scale_for` from one run of the guide and the replayed model on ``args``, off the RNG."""
    devices = [t.device for t in args if isinstance(t, torch.Tensor) and t.device.type == "cuda"]
    with off_rng(devices[0] if devices else "cpu"), torch.no_grad():
        guide_tr = poutine.trace(guide).get_trace(*args, **kwargs)
        model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(*args, **kwargs)
    frames = [f for _, stack in sample_frames(model_tr, guide_tr) for f in stack]
    return scale_for(frames, _batch_size(args), num_data, plate)


def _batch_size(args: tuple) -> int | None:
    return next((len(t) for t in args if isinstance(t, torch.Tensor) and t.dim() > 0), None)
