"""Data-parallel training over processes started by torchrun: process group, sharding, gradient sync.

How :func:`pyrovae.fit` uses it when a process group of several ranks is up (``torchrun`` or
``pyrovae train --nproc N``): every rank holds the whole dataset on its own device (``cuda:LOCAL_RANK``
with NCCL, the CPU with gloo) and takes a disjoint shard of each epoch's permutation, which all ranks
draw from the same generator seeded by (seed, epoch). ``--batch-size`` is per rank, so the global
batch is ``world size × batch``; every rank's loss keeps ``num_data=N``, so each is an unbiased
estimate of the full-data ELBO and so is their average, the averaged gradient.

Gradients are averaged by ``torch.nn.parallel.DistributedDataParallel`` wrapped around a small
module that owns the networks (the ``nn.Module`` a bound ``model``/``guide`` belongs to, such as the
built-in VAE) and whose ``forward`` is the Pyro ELBO: bucketed all-reduces overlap the backward pass.
DDP needs every trained parameter registered in a module it can see and a ``forward`` followed by
``backward``. A user's program built from ``pyro.param`` (plain tensors in Pyro's param store, no
module) or an estimator with no ``differentiable_loss`` (whose ``loss_and_grads`` runs backward
itself) gives neither, so there :class:`GradSync` all-reduces the flattened gradients instead.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .errors import PyrovaeError


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1


def world() -> World:
    """The current process group's rank and size, or rank 0 of 1 when none is up."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def launched() -> bool:
    """Whether torchrun (or another launcher setting its variables) started this process."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_rank() -> int:
    """The global rank torchrun gave this process (0 when not launched by it)."""
    return int(os.environ.get("RANK", "0"))


def setup(device: torch.device) -> torch.device:
    """Under torchrun with several processes: join the process group once and return this rank's device.

    CUDA ranks use ``cuda:LOCAL_RANK`` and NCCL; CPU ranks use gloo. Otherwise ``device`` comes back as is.
    """
    if not launched() or int(os.environ["WORLD_SIZE"]) < 2:
        return device
    local = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise PyrovaeError(
                f"process {local} on this node has no GPU: {torch.cuda.device_count()} visible; "
                "start at most that many processes per node, or use --device cpu"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def teardown() -> None:
    """Leave the process group (a no-op without one), after every rank got here: a rank that tears
    down while another still talks to it can abort the other's gloo threads."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def check_nproc(nproc: int, device: torch.device) -> None:
    """Refuse a process count the machine cannot serve: below one, or more CUDA processes than GPUs."""
    if nproc < 1:
        raise PyrovaeError(f"--nproc must be at least 1, got {nproc}")
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise PyrovaeError(
            f"--nproc {nproc} on CUDA needs {nproc} GPUs, this machine has {torch.cuda.device_count()}; "
            "lower --nproc or use --device cpu"
        )


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``python -m pyrovae ARGV`` as ``nproc`` processes under torchrun on this node; its exit code.

    ``--standalone`` picks a free rendezvous port, so several runs can share a machine. Each process
    gets ``OMP_NUM_THREADS`` = cores / nproc unless it is set already.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    proc = subprocess.Popen([*cmd, "-m", "pyrovae", *argv], env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:  # torchrun got the Ctrl-C too and stops its workers: wait for their checkpoint
        return proc.wait()


# --------------------------------------------------------------------------------- sharding, seeds
def mix_seed(*parts: int) -> int:
    """A 32-bit seed (what ``pyro.set_rng_seed`` takes) from several integers, mixed by numpy's SeedSequence."""
    return int(np.random.SeedSequence([int(p) % 2**63 for p in parts]).generate_state(1)[0])


def shared_seed(seed: int | None) -> int:
    """``seed``, or one drawn by rank 0 and sent to all, so that every rank draws the same permutations."""
    if seed is not None or world().size == 1:
        return seed if seed is not None else int(torch.randint(2**31, ()))
    value = torch.randint(2**31, (), dtype=torch.int64).to(_comm_device())
    dist.broadcast(value, 0)
    return int(value)


def epoch_permutation(n: int, seed: int, epoch: int, device: torch.device) -> torch.Tensor:
    """The epoch's order of the data, identical on every rank: a generator seeded by (seed, epoch)."""
    g = torch.Generator().manual_seed(mix_seed(seed, epoch))
    return torch.randperm(n, generator=g).to(device)


def steps_per_epoch(n: int, batch_size: int, size: int) -> int:
    """Steps of a global batch ``size × batch_size``; a last one too small to give each rank a datapoint joins the one before."""
    global_batch = batch_size * size
    steps = -(-n // global_batch)
    if steps > 1 and n - (steps - 1) * global_batch < size:
        steps -= 1
    return steps


def shard(perm: torch.Tensor, step: int, batch_size: int, w: World) -> torch.Tensor:
    """This rank's indices at ``step``: its part of the step's global batch (the last step takes the rest)."""
    global_batch = batch_size * w.size
    lo = step * global_batch
    hi = len(perm) if step == steps_per_epoch(len(perm), batch_size, w.size) - 1 else lo + global_batch
    return perm[lo:hi].tensor_split(w.size)[w.rank]


# ---------------------------------------------------------------------------------- collectives
def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_sum(x: torch.Tensor | float) -> torch.Tensor:
    """The sum over ranks (a float64 scalar on this rank's communication device)."""
    t = torch.as_tensor(x, dtype=torch.float64).to(_comm_device()).clone()
    dist.all_reduce(t)
    return t


def agree(stop: bool, first_bad: torch.Tensor) -> tuple[bool, int]:
    """Whether any rank wants to stop, and the latest first bad batch any rank saw (-1: none): all ranks act alike."""
    flags = torch.stack([torch.as_tensor(int(stop), device=first_bad.device), first_bad]).to(_comm_device())
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags[0]), int(flags[1])


def gather_to_first(obj: object) -> list | None:
    """Every rank's ``obj`` as a list on rank 0 (None on the others)."""
    out = [None] * world().size if world().rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def assert_same_params(params: Sequence[torch.Tensor], where: str) -> None:
    """Raise if the ranks' parameters have drifted apart (compares per-tensor sums in float64: cheap, one all-reduce)."""
    sums = torch.stack([p.detach().double().sum() for p in params]).to(_comm_device())
    both = torch.cat([sums, -sums])
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    if not torch.equal(both[: len(sums)], -both[len(sums) :]):
        raise PyrovaeError(f"the processes' parameters differ {where}: data-parallel training went out of step")


class GradSync:
    """The fallback when DDP cannot wrap the program: parameters broadcast from rank 0 once, gradients averaged."""

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        self.params = list(params)
        with torch.no_grad():
            flat = self._flat([p.detach() for p in self.params])
            dist.broadcast(flat, 0)
            self._unflatten(flat, [p.data for p in self.params])

    def _flat(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in tensors]).to(_comm_device())

    def _unflatten(self, flat: torch.Tensor, into: list[torch.Tensor]) -> None:
        for t, part in zip(into, flat.split([t.numel() for t in into])):
            t.copy_(part.view_as(t))

    def __call__(self) -> None:
        """Average the gradients over ranks, in place (one all-reduce of all of them)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = self._flat(grads)
        dist.all_reduce(flat)
        flat /= world().size
        for p, g in zip(self.params, grads):
            p.grad = g
        self._unflatten(flat, grads)


class _ELBOLoss(nn.Module):
    """The modules that own the trained parameters, with the Pyro ELBO as ``forward``: what DDP wraps."""

    def __init__(self, owners: list[nn.Module], loss: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.owners = nn.ModuleList(owners)
        self.loss = loss

    def forward(self, args: tuple[torch.Tensor, ...], beta: float) -> torch.Tensor:
        return self.loss(args, beta)


def data_parallel(
    loss: Callable[[tuple[torch.Tensor, ...], float], torch.Tensor],
    model: Callable,
    guide: Callable,
    params: Sequence[torch.Tensor],
    differentiable: bool,
    device: torch.device,
) -> tuple[Callable[[tuple[torch.Tensor, ...], float], torch.Tensor], GradSync | None, str]:
    """Make ``loss(args, beta)`` data-parallel: (loss to call, gradient sync to call after backward or None, mode).

    DDP when the trained parameters are exactly those of the ``nn.Module`` s that ``model`` and ``guide``
    belong to (bound methods or modules themselves) and the estimator is differentiable; else all-reduce.
    """
    owners: list[nn.Module] = []
    for fn in (model, guide):
        owner = fn if isinstance(fn, nn.Module) else getattr(fn, "__self__", None)
        if isinstance(owner, nn.Module) and all(owner is not o for o in owners):
            owners.append(owner)
    owned = {id(p) for o in owners for p in o.parameters() if p.requires_grad}
    if differentiable and owned and owned == {id(p) for p in params}:
        # buffers are constants here (no batch norm): synced once at construction, not at every forward
        new_torch = "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
        ddp = nn.parallel.DistributedDataParallel(
            _ELBOLoss(owners, loss),
            device_ids=[device.index if device.index is not None else torch.cuda.current_device()]
            if device.type == "cuda"
            else None,
            **({"forward_sync_buffers": False} if new_torch else {"broadcast_buffers": False}),
        )
        return ddp, None, "ddp"
    return loss, GradSync(params), "all-reduce"
