"""Data-parallel training over processes started by torchrun or by :func:`launch` (``pyrovae train --nproc``):
process group, sharding, gradient sync, and how a run of several workers ends (:func:`outcome`).

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
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .errors import PeerLost, PyrovaeError

DEFAULT_TIMEOUT = 300.0  # seconds a rank waits in a collective for the others before it gives up (a dead or hung peer)
# what pyrovae's own launcher (launch) tells its workers: its pid, and the folder for their one-line reports
GRACE = 10.0  # seconds the other workers get to stop on their own once one has failed
LAUNCHER_ENV, REPORTS_ENV = "PYROVAE_LAUNCHER", "PYROVAE_REPORTS"


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


def setup(device: torch.device, timeout: float = DEFAULT_TIMEOUT) -> torch.device:
    """Under torchrun with several processes: join the process group once and return this rank's device.

    CUDA ranks use ``cuda:LOCAL_RANK`` and NCCL; CPU ranks use gloo. Otherwise ``device`` comes back as is.
    A collective that waits more than ``timeout`` seconds for another rank (dead or hung) fails instead of
    waiting for ever. Under :func:`launch` the rendezvous store is the launcher's.
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
        backend, wait = "nccl" if device.type == "cuda" else "gloo", timedelta(seconds=timeout)
        with peer_failures(timeout):
            if under_launcher():  # the launcher holds the store (on a port it chose): every rank is its client
                size = int(os.environ["WORLD_SIZE"])
                store = dist.TCPStore(
                    os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), size, is_master=False, timeout=wait
                )
                dist.init_process_group(backend, store=store, rank=env_rank(), world_size=size, timeout=wait)
            else:
                dist.init_process_group(backend, timeout=wait)
    return device


def teardown(wait: bool = True) -> None:
    """Leave the process group (a no-op without one), after every rank got here: a rank that tears
    down while another still talks to it can abort the other's gloo threads. ``wait=False`` after a
    failure: no barrier, since a peer may be dead or stuck elsewhere."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


_PEER_SIGNS = ("connection closed", "connection reset", "broken pipe", "connection refused", "socket closed")


@contextmanager
def peer_failures(timeout: float = DEFAULT_TIMEOUT) -> Iterator[None]:
    """Turn a collective's failure for want of a peer (one died, or did not answer within ``timeout``
    seconds) into one :class:`PeerLost` line naming this rank; other errors pass unchanged."""
    try:
        yield
    except (RuntimeError, TimeoutError) as exc:  # dist.DistError and gloo's errors are RuntimeErrors
        if not launched():
            raise
        text = str(exc).lower()
        me = f"worker {env_rank()} (pid {os.getpid()})"
        if "timed out" in text or "timeout" in text or isinstance(exc, TimeoutError):
            raise PeerLost(f"{me} waited more than {timeout:g} s for another worker (one hung or died)") from None
        if isinstance(exc, dist.DistError) or any(sign in text for sign in _PEER_SIGNS):
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            reason = reason.rsplit("] ", 1)[-1].split(". ")[0][:160]  # gloo's start with their source line
            raise PeerLost(f"{me} lost contact with another worker ({reason})") from None
        raise


def check_nproc(nproc: int, device: torch.device) -> None:
    """Refuse a process count the machine cannot serve: below one, or more CUDA processes than GPUs."""
    if nproc < 1:
        raise PyrovaeError(f"--nproc must be at least 1, got {nproc}")
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise PyrovaeError(
            f"--nproc {nproc} on CUDA needs {nproc} GPUs, this machine has {torch.cuda.device_count()}; "
            "lower --nproc or use --device cpu"
        )


def under_launcher() -> bool:
    """Whether :func:`launch` (not torchrun) started this process: it then reports to the launcher, which holds
    the run folder's lock and the rendezvous store."""
    return launched() and LAUNCHER_ENV in os.environ


def report(message: str, line: str, code: int, lost: bool = False) -> bool:
    """Under :func:`launch`: leave this worker's error (its message, the line it would print, its exit code, and
    whether it lost a peer) for the launcher to tell once for all ranks; False elsewhere (the caller prints)."""
    folder = os.environ.get(REPORTS_ENV)
    if not under_launcher() or not folder:
        return False
    from .files import write_json

    write_json(Path(folder) / f"rank{env_rank()}.json", {"message": message, "line": line, "code": code, "lost": lost})
    return True


@dataclass(frozen=True)
class WorkerExit:
    """How one worker of :func:`launch` ended: its exit status (negative: the signal that killed it), its report
    (last line and exit code; None when it ended without one), whether the launcher killed it (it outlived a
    failed peer by more than the timeout), and when it ended among the workers (0: first)."""

    rank: int
    pid: int
    returncode: int
    report: dict | None = None
    killed: bool = False
    order: int = 0


@dataclass(frozen=True)
class Outcome:
    """What a data-parallel run amounts to: its exit code; ``cause``, when a worker was lost (died, hung, or
    lost its peers), what happened to it; else the workers' distinct error lines (none when rank 0 has said
    it all: done, or interrupted)."""

    code: int
    cause: str = ""
    lines: tuple[str, ...] = ()


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return "unknown"


def outcome(exits: Sequence[WorkerExit]) -> Outcome:
    """The run's outcome from its workers' ends. The cause, in this order: the first worker that died without a
    report (killed, or crashed); the workers' own errors (each distinct line once: bad input is the same on every
    rank); a worker that lost its peers; one the launcher had to kill. Exit code 1 for a lost worker, the
    workers' own for their errors, 130 when every failed worker was interrupted."""
    failed = sorted((e for e in exits if e.returncode != 0), key=lambda e: e.order)
    if not failed:
        return Outcome(0)
    silent = [e for e in failed if e.report is None and e.returncode != 130 and not e.killed]
    if silent:
        e = silent[0]
        if e.returncode < 0:
            what = f"was killed by signal {-e.returncode} ({_signal_name(-e.returncode)})"
        else:
            what = f"exited with code {e.returncode} without a word"
        return Outcome(1, f"worker {e.rank} (pid {e.pid}) {what}")
    reported = [e for e in failed if e.report is not None]
    own = [e for e in reported if not e.report.get("lost") and int(e.report.get("code", 1)) != 130]
    if own:  # an error of a worker's own (bad input, a NaN loss): each distinct line once
        lines = tuple(dict.fromkeys(str(e.report.get("line", "")) for e in own))
        return Outcome(int(own[0].report.get("code", 1)), lines=lines)
    lost = [e for e in reported if e.report.get("lost")]
    if lost:
        return Outcome(1, str(lost[0].report.get("message", "")))
    hung = [e for e in failed if e.killed]
    if hung:
        return Outcome(1, f"worker {hung[0].rank} (pid {hung[0].pid}) stopped responding")
    return Outcome(130, lines=tuple(dict.fromkeys(str(e.report.get("line", "")) for e in reported)))


@contextmanager
def _forwarded_signals(received: list[int]) -> Iterator[None]:
    """Record Ctrl-C and SIGTERM (to be passed on to the workers) instead of raising, while supervising."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {
        s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def launch(nproc: int, argv: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT) -> tuple[list[WorkerExit], str]:
    """Run ``python -m pyrovae ARGV`` as ``nproc`` workers on this node and supervise them: (how each ended, what
    the workers other than rank 0 printed).

    The launcher holds the rendezvous store, on a port the system picks, so several runs can share a machine.
    The workers run in their own session: a Ctrl-C or SIGTERM reaches them once, passed on by the launcher
    (and a launcher killed outright takes them with it: see ``pyrovae.__main__``). Rank 0 prints to this
    process's stdout and stderr; the others' output is collected, for a log. When a worker fails, the others
    get :data:`GRACE` seconds to stop on their own (a dead peer fails their next collective at once), then
    are killed (no checkpoint can be gathered without the lost worker; the last one written stays). Each worker gets
    ``OMP_NUM_THREADS`` = cores / nproc unless it is set already.
    """
    store = dist.TCPStore(
        "127.0.0.1", 0, nproc, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout)
    )
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    received: list[int] = []
    procs: list[subprocess.Popen] = []
    ended: dict[int, int] = {}
    killed: set[int] = set()
    with tempfile.TemporaryDirectory(prefix="pyrovae-launch-") as tmp, _forwarded_signals(received):
        env.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(store.port),
            WORLD_SIZE=str(nproc),
            LOCAL_WORLD_SIZE=str(nproc),
            GROUP_RANK="0",
            **{LAUNCHER_ENV: str(os.getpid()), REPORTS_ENV: tmp},
        )
        log = Path(tmp) / "workers.log"
        try:
            with open(log, "ab") as side:
                for rank in range(nproc):
                    if received:  # stopped while starting: the others would wait for the missing ranks
                        break
                    procs.append(
                        subprocess.Popen(
                            [sys.executable, "-m", "pyrovae", *argv],
                            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                            stdin=subprocess.DEVNULL,
                            stdout=None if rank == 0 else side,
                            stderr=None if rank == 0 else side,
                            start_new_session=True,
                        )
                    )
            if len(procs) < nproc:
                killed.update(range(len(procs)))
                for p in procs:
                    p.kill()
            sent, failed_at = 0, None
            while len(ended) < len(procs):
                for signum in received[sent:]:
                    for p in procs:
                        if p.poll() is None:
                            p.send_signal(signum)
                sent = len(received)
                for rank, p in enumerate(procs):
                    if rank not in ended and p.poll() is not None:
                        ended[rank] = len(ended)
                        if p.returncode != 0 and failed_at is None:
                            failed_at = time.monotonic()
                if failed_at is not None and time.monotonic() > failed_at + GRACE:
                    for rank, p in enumerate(procs):  # still there: hung, or waiting on the dead one
                        if p.poll() is None:
                            killed.add(rank)
                            p.kill()
                time.sleep(0.05)
        finally:  # an error of the launcher itself leaves no worker behind
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        exits = []
        for rank, p in enumerate(procs):
            path = Path(tmp) / f"rank{rank}.json"
            try:
                said = json.loads(path.read_text()) if path.is_file() else None
            except (OSError, ValueError):
                said = None
            exits.append(WorkerExit(rank, p.pid, p.returncode, said, rank in killed, ended.get(rank, len(procs))))
        text = log.read_text(errors="replace") if log.is_file() else ""
    del store
    return exits, text


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

    def forward(self, batch, beta: float) -> torch.Tensor:
        return self.loss(batch, beta)  # a batch as the dataset returns it (tensor, tuple or Call)


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
