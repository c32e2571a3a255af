"""The contract between pyrovae and a Pyro program: the minibatch scale is pyrovae's job, not the program's.

A program written as Pyro's tutorials write them (``model(x)``, ``guide(x)``, a plain
``pyro.plate("data", x.shape[0])`` or, as Pyro's examples do, ``pyro.plate("data")`` without a size)
trains on minibatches under :class:`DataScale`, which scales the log-probability of every site inside
the data plate by N/B and leaves global sites outside it alone, exactly as a plate subsampled by Pyro
itself (``pyro.plate("data", N, subsample_size=B)``) would. Programs that take ``num_data`` or subsample
their own plate are scaled by Pyro and left alone here.

A plate declared without a size carries size -1 in its frame (Pyro's "any size"): every size here is read
from the sites' shapes (:func:`resolved_stack`), never from a declared frame. What cannot be scaled
correctly is refused before the first step (:func:`plan_scale`), never guessed.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample

from ..data import Call, batch_length
from ..errors import PyrovaeError

PARTICLE_PLATE = "num_particles_vectorized"  # Pyro's plate of vectorised particles: never the data plate

DATA_PLATE = "data"


def frame_size(frame, batch_shape: tuple[int, ...]) -> int:
    """The size a plate has at a site: the declared one, or for a plate declared without a size (-1) the
    site's batch size at the plate's dim (1 where the site broadcasts along it)."""
    if frame.size is not None and frame.size >= 0:
        return frame.size
    if frame.dim is None or len(batch_shape) < -frame.dim:
        return 1
    return batch_shape[frame.dim]


def resolved_stack(site: dict) -> tuple:
    """The site's plate frames with every size read from its shapes: an unsized plate's -1 replaced by the size
    the site has there, its full size the same (Pyro does not subsample a plate without a size)."""
    stack = site["cond_indep_stack"]
    if all(f.size is None or f.size >= 0 for f in stack):
        return stack
    shape = tuple(site["fn"].batch_shape)
    out = []
    for f in stack:
        if f.size is not None and f.size < 0:
            size = frame_size(f, shape)
            f = f._replace(size=size, full_size=size if f.full_size is None or f.full_size < 0 else f.full_size)
        out.append(f)
    return tuple(out)


def subsampled(frame) -> bool:
    """Whether Pyro itself subsamples the plate (and so scales its sites): a full size other than its size."""
    return frame.full_size is not None and frame.full_size >= 0 and frame.full_size != frame.size


class DataScale(Messenger):
    """Scale sample sites inside the plate named ``plate`` by ``num_data / F``, as if subsampled from all the data.

    F is the number of datapoints the plate stands for at the site: its full size where the program subsamples
    it (a plate of the batch's size with ``subsample_size``: Pyro scales by F / size, this by N / F), else its
    size (the declared one, or for a plate without a size ``batch_size`` when given, else the site's own size
    along the plate). The site's frame gets ``full_size=num_data``, as Pyro's subsampled plates record it, so
    that estimators that divide the scale back out per datapoint (IWAE, Rényi) see a subsampled plate.
    """

    def __init__(self, num_data: int, plate: str = DATA_PLATE, batch_size: int | None = None) -> None:
        super().__init__()
        self.num_data, self.plate, self.batch_size = int(num_data), plate, batch_size

    def _process_message(self, msg) -> None:
        if msg["type"] != "sample":
            return
        stack = msg["cond_indep_stack"]
        for i, f in enumerate(stack):
            if f.name == self.plate:
                size = f.size
                if size is None or size < 0:
                    size = self.batch_size or frame_size(f, tuple(msg["fn"].batch_shape))
                represented = f.full_size if subsampled(f) else size
                if represented != self.num_data:
                    msg["scale"] = msg["scale"] * (self.num_data / represented)
                    frame = f._replace(size=size, full_size=self.num_data)
                    msg["cond_indep_stack"] = stack[:i] + (frame,) + stack[i + 1 :]
                return


def sample_frames(*traces: Trace) -> list[tuple[str, tuple]]:
    """(site name, plate frames with sizes resolved) of every sample site of the traces, the plates' own
    subsample sites left out."""
    return [
        (name, resolved_stack(site))
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
    sized = [f.name for f in frames if batch_size in (f.size, f.full_size if subsampled(f) else f.size)]
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


@dataclass(frozen=True)
class SiteFrames:
    """A sample site's name, whether it is observed (and whether a ``pyro.factor``), and its resolved plate frames."""

    name: str
    observed: bool
    factor: bool
    stack: tuple
    enumerated: bool = False  # marked for enumeration (``infer={"enumerate": ...}``)

    @classmethod
    def of(cls, site: dict) -> SiteFrames:
        factor = isinstance(site["fn"], dist.Unit)
        enumerated = bool(site["infer"].get("enumerate")) and not site["is_observed"]
        return cls(site["name"], bool(site["is_observed"]), factor, resolved_stack(site), enumerated)


def site_frames(*traces: Trace) -> list[SiteFrames]:
    """:class:`SiteFrames` of every sample site of the traces, the plates' own subsample sites left out."""
    return [
        SiteFrames.of(site)
        for tr in traces
        for site in tr.nodes.values()
        if site["type"] == "sample" and not site_is_subsample(site)
    ]


class PlateRecorder(Messenger):
    """Records every sample site that passes as :class:`SiteFrames` (outermost, so it sees every plate)."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: list[SiteFrames] = []

    def _postprocess_message(self, msg) -> None:
        if msg["type"] == "sample" and not site_is_subsample(msg):
            self.sites.append(SiteFrames.of(msg))

    @property
    def frames(self) -> list:
        return [f for site in self.sites for f in site.stack]


def _describe(frames: list) -> str:
    sizes: dict[str, set[int]] = {}
    for f in frames:
        sizes.setdefault(f.name, set()).add(f.size)
    return ", ".join(f"{name!r} of size {'/'.join(map(str, sorted(s)))}" for name, s in sizes.items()) or "none"


def plan_scale(sites: list[SiteFrames], batch: int | None, num_data: int, plate: str | None = None) -> DataScale | None:
    """The :class:`DataScale` a minibatch of ``batch`` of ``num_data`` datapoints needs, given the sites of one run.

    None when nothing needs scaling: the batch is the whole data, or the program subsamples its data plate
    itself (``num_data`` or ``subsample=``), so that Pyro already scales it. Raises a one-line
    :class:`PyrovaeError` where a scale would be a guess: no plate holds the batch's datapoints, a site inside
    the data plate has no datapoint dim, or an observed site (other than a ``pyro.factor``) is outside it.
    """
    frames = [f for site in sites for f in site.stack if f.name != PARTICLE_PLATE]
    if plate is not None:
        find_data_plate(frames, batch, plate)  # an unknown name is refused even on the full batch
    if batch is None or batch >= num_data or not sites:
        return None
    name = find_data_plate(frames, batch, plate)
    fix = f"or train on the full batch (batch_size >= {num_data})"
    if name is None:
        raise PyrovaeError(
            f"cannot scale minibatches of {batch} of {num_data} datapoints: no plate holds the batch's {batch} "
            f"datapoints (plates: {_describe(frames)}); put the data's sites in pyro.plate(\"data\"), "
            f"name the plate with data_plate=, {fix}"
        )
    represented = {f.full_size if subsampled(f) else f.size for f in frames if f.name == name}
    if represented == {num_data}:
        return None  # the program subsamples its plate from all the data itself: Pyro scales it
    for site in sites:
        inside = [f for f in site.stack if f.name == name]
        if inside and (inside[0].full_size if subsampled(inside[0]) else inside[0].size) != batch:
            raise PyrovaeError(
                f"cannot scale minibatches of {batch} of {num_data} datapoints: site {site.name!r} has "
                f"{inside[0].size} along the data plate {name!r}, not one entry per datapoint of the batch; "
                f"give the plate the batch's size, {fix}"
            )
        if not inside and site.observed and not site.factor:
            raise PyrovaeError(
                f"cannot scale minibatches of {batch} of {num_data} datapoints: observed site {site.name!r} is "
                f"outside the data plate {name!r}, so its log-likelihood would count {batch} datapoints as if "
                f"they were all; put it inside the plate, {fix}"
            )
    return DataScale(num_data, name)


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
    """:func:`plan_scale` from one run of the guide and the replayed model on ``args``, off the RNG."""
    tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
    devices = [t.device for t in tensors if t.device.type == "cuda"]
    with off_rng(devices[0] if devices else "cpu"), torch.no_grad():
        guide_tr = poutine.trace(guide).get_trace(*args, **kwargs)
        model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(*args, **kwargs)
    return plan_scale(site_frames(model_tr, guide_tr), batch_length(Call(args, kwargs)), num_data, plate)
