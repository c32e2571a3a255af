"""Lightning Fabric against pyrovae's own strategy/checkpoint layer: speed, exact resume, and lines of code.

The question (issue 14): would Fabric's strategy/precision/checkpoint-I/O layer remove code from
``pyrovae/train`` and ``pyrovae/distributed.py`` without losing exact resume or speed? Three measurements:

1. Seconds per epoch: pyrovae's ``fit`` vs the same epoch loop on Fabric (``Fabric.setup`` of module and
   optimiser, ``fabric.backward``, Fabric's collectives), on the same data, networks and Pyro loss
   (pyrovae's :class:`~pyrovae.train.program.Program`; only the layer around it differs). Interleaved as in
   ``train_speed.py``: one ``fit`` call, and after each of its epochs one Fabric epoch. One process, and
   (``--nproc 2``) two gloo processes, where Fabric joins the process group pyrovae set up and wraps the
   same loss module in its own DDP.
2. Exact resume, one process: 2 epochs straight against 1 epoch + save + (RNG scrambled, fresh model) load
   + 1 epoch; bit-identical parameters and optimiser state? For ``fit`` at an epoch boundary and mid-epoch;
   for Fabric's ``save``/``load`` with and without RNG states added by hand.
3. Lines: each function of the layer (by ``ast``), marked replaced by Fabric or not (and why), against the
   lines of glue the Fabric loop below needs (:class:`FabricLoop`, counted from its source).

Needs ``lightning-fabric`` (or ``lightning``), which is no dependency of pyrovae; without it the script
says so and exits.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import math
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyro
import torch
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results, markdown_table  # noqa: E402

from pyrovae import Pixels, fit, load_dataset, make_splits, synthetic  # noqa: E402
from pyrovae import distributed as ddp  # noqa: E402
from pyrovae.hostmem import keep_freed_memory  # noqa: E402
from pyrovae.infer import make_elbo  # noqa: E402
from pyrovae.infer.paramstore import fresh_param_store  # noqa: E402
from pyrovae.models.vae import VAE, vae_parts  # noqa: E402
from pyrovae.train import Callback, load_checkpoint  # noqa: E402
from pyrovae.train.program import Program  # noqa: E402

try:
    from lightning_fabric import Fabric
    from lightning_fabric.strategies import DDPStrategy
except ImportError:  # the lightning package ships the same under lightning.fabric
    try:
        from lightning.fabric import Fabric
        from lightning.fabric.strategies import DDPStrategy
    except ImportError:
        Fabric = DDPStrategy = None

ROOT = Path(__file__).resolve().parent.parent


def build(splits, arch: str, name: str) -> VAE:
    """A Bernoulli VAE as ``build_vae`` makes it, under its own param-store name (two live side by side)."""
    return VAE(*vae_parts(splits.train.shape, "bernoulli", arch, splits.train_pixel_mean.cpu()), name=name)


# ------------------------------------------------------------------------------------ the Fabric glue
class LossModule(nn.Module):
    """The networks, with the Pyro loss as ``forward``: what Fabric sets up (and, with several ranks, wraps in DDP)."""

    def __init__(self, owner: nn.Module, loss) -> None:
        super().__init__()
        self.owner, self.loss = owner, loss

    def forward(self, batch, beta: float) -> torch.Tensor:
        return self.loss(batch, beta)


class FabricLoop:
    """pyrovae's epoch loop on Fabric: what adopting it would take. Fabric sets up module and optimiser, runs
    backward, the collectives, save and load; the sharding of device-resident data, the stop/NaN agreement, the
    partial sums and the RNG states stay ours (Fabric has none of them)."""

    def __init__(self, fabric, vae: VAE, program: Program, data, batch_size: int, lr: float, seed: int) -> None:
        optimizer = torch.optim.Adam(vae.parameters(), lr=lr, foreach=True)
        self.module, self.optimizer = fabric.setup(LossModule(vae, program.loss), optimizer)
        self.fabric, self.program, self.data, self.batch_size, self.seed = fabric, program, data, batch_size, seed
        self.epoch = 0

    def train_epoch(self) -> float:
        """One epoch; the mean train ELBO over all ranks."""
        f, n = self.fabric, len(self.data)
        size, rank, device = f.world_size, f.global_rank, self.data.device
        if size > 1:  # the same order on every rank
            g = torch.Generator().manual_seed(ddp.mix_seed(self.seed, self.epoch))
            perm = torch.randperm(n, generator=g).to(device)
        else:
            perm = torch.randperm(n, device=device)
        global_batch = self.batch_size * size
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        first_bad = torch.full((), -1, dtype=torch.long, device=device)
        with self.program.hot():
            for b in range(-(-n // global_batch)):
                if size > 1:  # stop and fail together (as pyrovae's DataParallel polls every step on a CPU)
                    flags = f.all_reduce(torch.stack([torch.zeros_like(first_bad), first_bad]), reduce_op="max")
                    if int(flags[1]) >= 0:
                        raise FloatingPointError(f"non-finite loss at batch {int(flags[1])}")
                idx = perm[b * global_batch : (b + 1) * global_batch].tensor_split(size)[rank]
                self.optimizer.zero_grad(set_to_none=True)
                loss = self.module(self.data.batch(idx), 1.0)
                if size == 1:  # one CPU process reads each loss, as fit does
                    value = loss.item()
                    if not math.isfinite(value):
                        raise FloatingPointError(f"non-finite loss at batch {b}")
                    loss_sum += value * len(idx) / n
                else:
                    first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), b, first_bad)
                    loss_sum += loss.detach() * len(idx) / n
                f.backward(loss)
                self.optimizer.step()
        self.epoch += 1
        return -float(f.all_reduce(loss_sum, reduce_op="sum")) / n

    def state(self, rng: bool) -> dict:
        state = {"module": self.module, "optimizer": self.optimizer, "epoch": self.epoch}
        return {**state, "rng": pyro.util.get_rng_state()} if rng else state  # Fabric saves no RNG state

    def save(self, path: Path, rng: bool) -> None:
        self.fabric.save(path, self.state(rng))

    def load(self, path: Path, rng: bool) -> None:
        """Restore in place. numpy's RNG state is an ndarray, which torch's weights-only unpickler refuses unless
        allowed (pyrovae's ``load_weights`` allows it); Fabric's ``load`` passes no allow-list."""
        state = self.state(rng)
        with torch.serialization.safe_globals(_numpy_globals()):
            self.fabric.load(path, state)
        self.epoch = state["epoch"]
        if rng:
            pyro.util.set_rng_state(state["rng"])


# ------------------------------------------------------------------------------------------- glue ends
def _numpy_globals() -> list:
    from pyrovae.files import NUMPY_PICKLE_GLOBALS, _numpy_dtype_classes

    return [*NUMPY_PICKLE_GLOBALS.values(), *_numpy_dtype_classes()]


class NoFabric:
    """A pass-through stand-in for Fabric on one process: the same loop without Fabric's wrappers, to tell their
    cost apart from the loop's."""

    world_size, global_rank = 1, 0

    def setup(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple:
        return module, optimizer

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def all_reduce(self, t: torch.Tensor, reduce_op: str = "sum") -> torch.Tensor:
        return t


def make_fabric(size: int, precision: str = "32-true"):
    """Fabric on the CPU: one device, or DDP over the process group already up (gloo). ``precision="none"``: no
    Fabric at all (:class:`NoFabric`, one process)."""
    if precision == "none":
        return NoFabric()
    if size == 1:
        fabric = Fabric(accelerator="cpu", devices=1, precision=precision)
    else:  # as pyrovae's DDP: buffers are constants here, not re-broadcast at every forward
        new_torch = "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
        strategy = DDPStrategy(**({"forward_sync_buffers": False} if new_torch else {"broadcast_buffers": False}))
        fabric = Fabric(accelerator="cpu", devices=size, strategy=strategy, precision=precision)
    fabric.launch()  # joins the process group pyrovae's setup made (Fabric sees torchrun's variables)
    return fabric


def fabric_program(splits, arch: str, elbo: str, bs: int, fabric, lr: float, seed: int) -> FabricLoop:
    torch.manual_seed(seed)
    vae = build(splits, arch, "fabric")
    with fresh_param_store():
        program = Program(vae.model, vae.guide, splits.train, make_elbo(elbo), bs, None)
    return FabricLoop(fabric, vae, program, splits.train, bs, lr, seed)


# ---------------------------------------------------------------------------------------------- speed
class EpochClock(Callback):
    """Times each of ``fit``'s epochs (wall and CPU seconds, up to its end-of-epoch callbacks), then runs one epoch
    of each Fabric side, timed alike. CPU seconds (``time.process_time``) are what a framework's overhead costs,
    and barely move when other work shares the cores, where wall seconds can swing several-fold."""

    def __init__(self, loops: dict[str, FabricLoop], repeats: int) -> None:
        self.loops, self.repeats = loops, repeats
        self.times: dict[str, list[tuple[float, float]]] = {"pyrovae": [], **{f: [] for f in loops}}
        self.elbos: dict[str, float] = {}

    def mark(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self, side: str) -> None:
        self.times[side].append((time.perf_counter() - self.wall, time.process_time() - self.cpu))
        self.mark()

    def on_fit_start(self, loop) -> None:
        self.mark()

    def on_epoch_end(self, loop, row: dict[str, float]) -> None:
        self.lap("pyrovae")
        if row["epoch"] > self.repeats:  # the last pyrovae epoch closes the last pair
            return
        sides = list(self.loops)
        for f in sides if row["epoch"] % 2 else sides[::-1]:  # alternate their order
            self.elbos[f] = self.loops[f].train_epoch()
            self.lap(f)


def time_both(
    splits, arch: str, elbo: str, bs: int, repeats: int, precisions: list[str]
) -> tuple[dict[str, list[tuple[float, float]]], dict[str, float]]:
    """(wall, CPU) seconds of each epoch per side, interleaved: one ``fit`` call, and after each of its epochs one
    epoch of each Fabric side (one per precision). The first epoch of each side is warm-up. Also each side's
    train ELBO at epoch ``repeats``. Every rank runs this; each returns its own."""
    size = ddp.world().size
    clock = EpochClock(
        {f: fabric_program(splits, arch, elbo, bs, make_fabric(size, f), 1e-3, 0) for f in precisions}, repeats
    )
    torch.manual_seed(0)
    ours = build(splits, arch, "vae")
    res = fit(
        ours.model, ours.guide, splits.train, elbo=elbo, epochs=repeats + 1, batch_size=bs, seed=0, quiet=True,
        callbacks=[clock],
    )  # fmt: skip
    clock.elbos["pyrovae"] = res.history[repeats - 1]["train_elbo"]
    return {side: t[1:] for side, t in clock.times.items()}, clock.elbos


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, nproc: int, port: int, args: argparse.Namespace, out: str) -> None:
    """One of ``nproc`` gloo processes, with the variables torchrun would set (so both pyrovae and Fabric see them)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0", TORCHELASTIC_RUN_ID="fabric-bench",
    )  # fmt: skip
    torch.set_num_threads(1)
    ddp.setup(torch.device("cpu"))
    try:
        splits = load_splits(args, args.train_size)
        times = time_both(splits, args.arch, args.elbo, args.batch_size, args.repeats, ["32-true"])
        if rank == 0:
            torch.save(times, out)
    finally:
        ddp.teardown()


def time_ddp(nproc: int, args: argparse.Namespace) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Rank 0's epoch times with ``nproc`` gloo processes of one thread each (fresh processes)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.pt")
        mp.spawn(_worker, args=(nproc, _free_port(), args, out), nprocs=nproc, join=True)
        return torch.load(out)


def _paired(ours: list[float], theirs: list[float]) -> str:
    """Each Fabric epoch against the mean of the two pyrovae epochs around it: median (quartiles)."""
    paired = sorted(0.5 * (ours[i] + ours[i + 1]) / theirs[i] for i in range(min(len(ours) - 1, len(theirs))))
    q1, q3 = paired[len(paired) // 4], paired[(3 * len(paired)) // 4]
    return f"{statistics.median(paired):.3f} ({q1:.3f}–{q3:.3f})"


def speed_row(label: str, side: str, times: dict[str, list[tuple[float, float]]], elbos: dict[str, float]) -> list:
    """A table row: pyrovae against the Fabric ``side``; ratios > 1 mean pyrovae is slower."""
    wall = {s: [t[0] for t in times[s]] for s in ("pyrovae", side)}
    cpu = {s: [t[1] for t in times[s]] for s in ("pyrovae", side)}
    return (
        [label, "no Fabric (same loop)" if side == "none" else side]
        + [f"{statistics.median(cpu[s]):.3f} ({min(cpu[s]):.3f}–{max(cpu[s]):.3f})" for s in ("pyrovae", side)]
        + [f"**{_paired(cpu['pyrovae'], cpu[side])}**", _paired(wall["pyrovae"], wall[side])]
        + [f"{statistics.median(wall[s]):.2f}" for s in ("pyrovae", side)]
        + [_same_epoch(times, side)]
        + [f"{elbos['pyrovae']:.2f} / {elbos[side]:.2f}"]
    )


def _same_epoch(times: dict[str, list[tuple[float, float]]], side: str) -> str:
    """Fabric's CPU seconds over those of the same loop without Fabric, epoch by epoch (they run back to back)."""
    if "none" not in times or side == "none":
        return "–"
    ratios = sorted(f[1] / n[1] for f, n in zip(times[side], times["none"]))
    q1, q3 = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
    return f"{statistics.median(ratios):.3f} ({q1:.3f}–{q3:.3f})"


# --------------------------------------------------------------------------------------------- resume
def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _opt_same(a: dict, b: dict) -> bool:
    sa, sb = a["state"], b["state"]
    return sa.keys() == sb.keys() and all(_same(sa[k], sb[k]) for k in sa)


def resume_ours(splits, arch: str, elbo: str, bs: int, tmp: Path, mid: int) -> tuple[bool, bool]:
    """``fit`` 2 epochs straight vs stopped (after epoch 1, or ``mid`` steps into epoch 2) and resumed in a fresh state."""

    def run(out: Path, **kw):
        torch.manual_seed(0)
        vae = build(splits, arch, "vae")
        return fit(vae.model, vae.guide, splits.train, elbo=elbo, batch_size=bs, out=out, quiet=True, **kw)

    straight = run(tmp / "a", epochs=2, seed=0)
    steps = -(-len(splits.train) // bs)
    run(tmp / "b", seed=0, **({"epochs": 2, "max_steps": steps + mid} if mid else {"epochs": 1}))
    torch.manual_seed(12345)  # as a fresh process would: another RNG state, another initialisation
    resumed = run(tmp / "b", epochs=2, resume=True)
    opt = [load_checkpoint(tmp / d / "checkpoint.pt")["optimizer"] for d in ("a", "b")]
    return _same(straight.params, resumed.params), _opt_same(*opt)


def resume_fabric(splits, arch: str, elbo: str, bs: int, tmp: Path, rng: bool) -> tuple[bool, bool]:
    """Fabric loop 2 epochs straight vs 1 epoch + ``fabric.save``, then a fresh model + ``fabric.load`` + 1 epoch."""
    fabric = make_fabric(1)
    pyro.set_rng_seed(0)
    straight = fabric_program(splits, arch, elbo, bs, fabric, 1e-3, 0)
    straight.train_epoch(), straight.train_epoch()
    pyro.set_rng_seed(0)
    first = fabric_program(splits, arch, elbo, bs, fabric, 1e-3, 0)
    first.train_epoch()
    first.save(tmp / "fabric.ckpt", rng)
    pyro.set_rng_seed(12345)
    resumed = fabric_program(splits, arch, elbo, bs, fabric, 1e-3, 12345)
    resumed.load(tmp / "fabric.ckpt", rng)
    resumed.train_epoch()
    params = [dict(loop.module.named_parameters()) for loop in (straight, resumed)]
    return _same(*params), _opt_same(straight.optimizer.state_dict(), resumed.optimizer.state_dict())


# ------------------------------------------------------------------------------------------ file I/O
class _Foreign:
    """Unpickles to a call of ``os.getcwd``: stands for code planted in a checkpoint."""

    def __reduce__(self):
        return (os.getcwd, ())


def _outcome(load) -> str:
    try:
        load()
    except Exception as exc:  # what each side raises is the point here
        lines = len(str(exc).strip().splitlines())
        return f"refused: {type(exc).__name__}, {lines}-line message"
    return "loaded"


def _saving(save) -> str:
    """Where a save's temporary file goes and whether it is fsync'ed (both recorded by wrapping the calls)."""
    seen: dict[str, object] = {"dirs": [], "fsync": 0}
    mkstemp, fsync = tempfile.mkstemp, os.fsync

    def record_mkstemp(*a, **kw):
        seen["dirs"].append(kw.get("dir"))
        return mkstemp(*a, **kw)

    def record_fsync(fd):
        seen["fsync"] += 1
        return fsync(fd)

    tempfile.mkstemp, os.fsync = record_mkstemp, record_fsync
    try:
        save()
    finally:
        tempfile.mkstemp, os.fsync = mkstemp, fsync
    where = ", ".join("system temp dir" if d is None else "beside the target" for d in seen["dirs"]) or "none"
    return f"temporary file: {where}; fsync: {'yes' if seen['fsync'] else 'no'}"


def io_checks(tmp: Path) -> list[list[str]]:
    """Fabric's save/load against pyrovae's atomic_write/load_weights on the same states."""
    from pyrovae.files import atomic_write, load_weights

    fabric = make_fabric(1)
    state = {"w": torch.zeros(3), "rng": pyro.util.get_rng_state()}
    rows = [
        [
            "save a state",
            _saving(lambda: fabric.save(tmp / "f.ckpt", state)),
            _saving(lambda: atomic_write(tmp / "p.ckpt", lambda f: torch.save(state, f))),
        ],
        [
            "load it back (numpy's RNG state inside)",
            _outcome(lambda: fabric.load(tmp / "f.ckpt")),
            _outcome(lambda: load_weights(tmp / "p.ckpt")),
        ],
    ]
    torch.save({"w": torch.zeros(3), "x": _Foreign()}, tmp / "foreign.ckpt")
    rows.append(
        [
            "load a checkpoint that names a function",
            _outcome(lambda: fabric.load(tmp / "foreign.ckpt")),
            _outcome(lambda: load_weights(tmp / "foreign.ckpt")),
        ]
    )
    return rows


# ---------------------------------------------------------------------------------------------- lines
# what Fabric would do for each function of the layer: (replaced: True, False or that many of its lines; why)
LAYER = {
    "pyrovae/distributed.py": {
        "world": (True, "fabric.global_rank / world_size"),
        "launched": (True, "Fabric's cluster environments (once a Fabric exists)"),
        "env_rank": (True, "same"),
        "setup": (True, "fabric.launch() joins the group, picks gloo/NCCL and the rank's device"),
        "teardown": (
            False,
            "Fabric's API has no teardown; ours waits at a barrier so that no rank aborts another's gloo",
        ),
        "check_nproc": (False, "one-line errors for --nproc; Fabric raises its own exceptions"),
        "launch": (
            True,
            "Fabric(devices=N).launch() re-runs the script per rank (our wait for the Ctrl-C checkpoint aside)",
        ),
        "mix_seed": (False, "sharding of device-resident data: Fabric only shards DataLoaders"),
        "shared_seed": (False, "same (fabric.broadcast would shorten it by ~2 lines)"),
        "epoch_permutation": (False, "same"),
        "steps_per_epoch": (False, "same"),
        "shard": (False, "same"),
        "_comm_device": (True, "Fabric's collectives pick the device"),
        "all_sum": (True, "fabric.all_reduce"),
        "agree": (True, "fabric.all_reduce(reduce_op='max')"),
        "gather_to_first": (False, "Fabric gathers tensors only; the RNG states are objects"),
        "assert_same_params": (False, "no drift check in Fabric"),
        "GradSync": (False, "Fabric needs an nn.Module: pyro.param programs and loss_and_grads estimators have none"),
        "_ELBOLoss": (False, "Fabric too needs the loss as a module's forward (LossModule above)"),
        "data_parallel": (8, "choosing DDP vs all-reduce stays; its DDP(...) call (8 lines) becomes fabric.setup"),
    },
    "pyrovae/train/strategy.py": {
        "Strategy": (False, "the loop's interface to sharding and collectives; bodies would call Fabric"),
        "DataParallel": (False, "same"),
        "current_strategy": (False, "same"),
    },
    "pyrovae/train/state.py": {
        "load_checkpoint": (False, "one-line errors; fabric.load raises torch's UnpicklingError"),
        "load_training_checkpoint": (False, "key check"),
        "check_params": (False, "name/shape check with a one-line error; Fabric's strict load raises torch's"),
        "rng_state": (False, "Fabric saves no RNG state"),
        "set_rng_state": (False, "same"),
        "TrainState": (
            False,
            "perm, batch, partial sums, perm seed, every rank's RNG: not Fabric's; params are keyed by param-store "
            "name (pyro.param programs have no module for fabric.load to fill)",
        ),
    },
}


def function_lines(path: Path) -> dict[str, int]:
    """Lines (docstring included) of each top-level function and class of a module."""
    tree = ast.parse(path.read_text())
    return {
        node.name: node.end_lineno - node.lineno + 1
        for node in tree.body
        if isinstance(node, (ast.FunctionDef, ast.ClassDef))
    }


def lines_table() -> tuple[str, int, int, int]:
    rows, reasons, replaced_total, layer_total = [], [], 0, 0
    for rel, verdicts in LAYER.items():
        path = ROOT / rel
        lines = function_lines(path)
        file_total = len(path.read_text().splitlines())
        count = {name: lines[name] if v is True else int(v) for name, (v, _) in verdicts.items()}
        n_replaced = sum(count.values())
        replaced = [f"{n} ({count[n]}{'' if count[n] == lines[n] else f' of {lines[n]}'})" for n in count if count[n]]
        kept = [f"{n} ({lines[n]})" for n, (v, _) in verdicts.items() if v is False]
        rows.append([rel, file_total, n_replaced, ", ".join(replaced) or "–", ", ".join(kept)])
        replaced_total, layer_total = replaced_total + n_replaced, layer_total + file_total
        for name, (v, why) in verdicts.items():
            if why.startswith("same") and reasons:
                reasons[-1][1].append(name)
                reasons[-1][2] += why[4:]
            else:
                reasons.append(["kept" if v is False else "replaced" if v is True else "partly replaced", [name], why])
    fabric_only = sum(_lines(f) for f in (LossModule, make_fabric, FabricLoop.state, FabricLoop.save, FabricLoop.load))
    loop = _lines(FabricLoop.__init__) + _lines(FabricLoop.train_epoch)
    glue = f"glue: {fabric_only} Fabric-specific + {loop} of loop (see below)"
    table = markdown_table(
        ["file", "lines", "lines Fabric replaces", "replaced (lines)", "kept (lines)"],
        rows + [["total", layer_total, replaced_total, "", glue]],
    )
    table += "\n\n" + "\n".join(f"- {what}: {', '.join(names)}: {why}" for what, names, why in reasons)
    table += (
        f"\n- glue: {fabric_only} lines Fabric-specific (LossModule, make_fabric, FabricLoop.state/save/load in the "
        f"script), plus {loop} lines of FabricLoop.__init__/train_epoch, which mirror Loop.step/train_epoch (adopting "
        "Fabric would edit those, not add them)"
    )
    return table, layer_total, replaced_total, fabric_only


def _lines(obj) -> int:
    return len(inspect.getsourcelines(obj)[0])


# ----------------------------------------------------------------------------------------------- main
def load_splits(args: argparse.Namespace, train_size: int | None):
    if args.dataset == "synthetic":
        raw = synthetic(n_train=train_size or 6000)
    else:
        raw = load_dataset(args.dataset, args.data_dir)
    return make_splits(raw, Pixels("dynamic"), "cpu", val_size=1, train_size=train_size, seed=0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist", "synthetic"])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--train-size", type=int, default=10000)
    p.add_argument("--arch", default="iwae")
    p.add_argument("--elbo", default="meanfield", choices=["meanfield", "trace", "iwae"])
    p.add_argument("--batch-size", type=int, default=100, help="per process")
    p.add_argument("--repeats", type=int, default=9, help="timed epochs per side (one more is warm-up)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of the one-process row")
    p.add_argument("--nproc", type=int, default=[1, 2], nargs="+", help="process counts to time (gloo)")
    p.add_argument(
        "--precision",
        default=["32-true", "bf16-mixed", "none"],
        nargs="+",
        help="Fabric precisions timed in one process (several processes: 32-true only); none: the same loop "
        "without Fabric",
    )
    p.add_argument("--resume-size", type=int, default=1000, help="training images of the resume checks")
    args = p.parse_args()
    if Fabric is None:
        print("fabric_strategy: skipped, lightning-fabric is not installed (pip install lightning-fabric)")
        return
    import lightning_utilities  # noqa: F401  (Fabric's one dependency outside torch, for the record)
    from lightning_fabric import __version__ as fabric_version

    keep_freed_memory()  # as the CLI does for training
    torch.set_num_threads(args.threads)
    speed = []
    for nproc in args.nproc:
        if nproc == 1:
            splits = load_splits(args, args.train_size)
            times, elbos = time_both(splits, args.arch, args.elbo, args.batch_size, args.repeats, args.precision)
            label = f"1 × {torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''}"
        else:
            times, elbos = time_ddp(nproc, args)
            label = f"{nproc} × 1 thread, gloo DDP"
        for side in [s for s in times if s != "pyrovae"]:
            speed.append(speed_row(label, side, times, elbos))
            print(speed[-1], flush=True)

    small = load_splits(args, args.resume_size)
    resume = []
    with tempfile.TemporaryDirectory() as tmp:
        steps = -(-len(small.train) // args.batch_size)
        if steps < 2:
            p.error(f"--resume-size {args.resume_size} gives one step per epoch: nothing to stop in the middle of")
        for mid in (0, steps // 2):
            (Path(tmp) / str(mid)).mkdir()
            p_same, o_same = resume_ours(small, args.arch, args.elbo, args.batch_size, Path(tmp) / str(mid), mid)
            where = f"step {mid} of {steps} in epoch 2" if mid else "after epoch 1"
            resume.append(["pyrovae fit (checkpoint.pt)", where, "whole TrainState", p_same, o_same])
        for rng in (False, True):
            p_same, o_same = resume_fabric(small, args.arch, args.elbo, args.batch_size, Path(tmp), rng)
            saved = "module, optimizer, epoch" + (" + RNG states (by hand)" if rng else "")
            resume.append(["Fabric save/load", "after epoch 1", saved, p_same, o_same])
        io = io_checks(Path(tmp))
    resume = [[*row[:3], "**yes**" if row[3] else "no", "yes" if row[4] else "no"] for row in resume]
    lines, layer_total, replaced, glue = lines_table()

    tables = (
        markdown_table(
            [
                "processes",
                "Fabric precision",
                "pyrovae CPU s/epoch (range)",
                "Fabric CPU s/epoch (range)",
                "paired CPU ratio, median (quartiles)",
                "paired wall ratio, median (quartiles)",
                "pyrovae wall s/epoch",
                "Fabric wall s/epoch",
                "CPU: Fabric / same loop without it",
                f"train ELBO at epoch {args.repeats}: pyrovae / Fabric",
            ],
            speed,
        )  # fmt: skip
        + f"\n\nN train {args.train_size}, batch {args.batch_size} per process; ratios above 1: pyrovae slower.\n\nExact resume (2 epochs straight vs stopped, RNG scrambled, fresh model, resumed), "
        + f"N={args.resume_size}, batch {args.batch_size}, dynamic binarisation (draws from the RNG):\n\n"
        + markdown_table(
            ["trainer", "stopped", "state saved", "parameters bit-identical", "Adam state bit-identical"], resume
        )
        + "\n\nCheckpoint I/O, on the same states (recorded by wrapping tempfile.mkstemp and os.fsync):\n\n"
        + markdown_table(["", "Fabric save / load", "pyrovae atomic_write / load_weights"], io)
        + "\n\nLines of the layer (functions and classes by `ast`, docstrings included):\n\n"
        + lines
    )
    append_results(
        f"Lightning Fabric {fabric_version} vs pyrovae's strategy/checkpoint layer ({args.dataset}, {args.arch}, "
        f"{args.elbo}, cpu)",
        tables,
        "PYTHONPATH=.:FABRIC_SITE python bench/fabric_strategy.py " + " ".join(sys.argv[1:]),
        f"Both sides train the same networks on the same data with the same Pyro loss (pyrovae's Program); Fabric: "
        "`Fabric(accelerator='cpu', precision=...)`, `setup`, `backward`, `all_reduce`, `save`/`load` (FabricLoop "
        f"in the script). Interleaved: one fit call of {args.repeats}+1 epochs, and after each of its epochs one epoch "
        "per Fabric side (first epochs warm-up). Paired ratio: each Fabric epoch against the mean of the pyrovae "
        "epochs either side of it. CPU seconds (process_time) carry the verdict: on a shared box wall seconds swing "
        "several-fold with the other load, CPU seconds barely. With several processes, Fabric joins pyrovae's "
        "process group and wraps the same loss module in its own DDP; rank 0's times. FABRIC_SITE: "
        "lightning-fabric and lightning-utilities installed with `pip install --no-deps --target` (no torch "
        f"change). Fabric would replace {replaced} of the layer's {layer_total} lines and need {glue} lines of "
        "Fabric-specific glue.",
    )


if __name__ == "__main__":
    main()
