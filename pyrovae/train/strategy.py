"""How the work of an epoch is split over processes: :class:`Strategy` (one process) and :class:`DataParallel`.

A strategy owns the sharding (permutation, each rank's indices) and the collectives (sums, the agreement
to stop or fail together, gathering checkpoint state); the loop itself never asks for a rank or a size.
The process group and the collectives themselves live in :mod:`pyrovae.distributed`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pyro
import torch

from .. import distributed as ddp
from ..errors import PyrovaeError

Loss = Callable[[tuple[torch.Tensor, ...], float], torch.Tensor]


class Strategy:
    """One process: the whole epoch, no collectives."""

    rank, size, mode = 0, 1, ""
    world = ddp.World()

    def check(self, n: int) -> None:
        """Refuse a dataset too small to give every rank a datapoint."""
        if n < self.size:
            raise PyrovaeError(f"{self.size} processes need at least {self.size} training datapoints, got {n}")

    def steps_per_epoch(self, n: int, batch_size: int) -> int:
        return ddp.steps_per_epoch(n, batch_size, self.size)

    def permutation(self, n: int, seed: int | None, epoch: int, device: torch.device) -> torch.Tensor:
        """The epoch's order of the data (from the global RNG)."""
        return torch.randperm(n, device=device)

    def shard(self, perm: torch.Tensor, step: int, batch_size: int) -> torch.Tensor:
        """This rank's indices at ``step``."""
        return ddp.shard(perm, step, batch_size, self.world)

    def split(self, indices: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of ``indices`` (for evaluation: every datapoint once over all ranks)."""
        return indices.tensor_split(self.size)[self.rank]

    def seed(self, perm_seed: int | None, saved_size: int, resumed: bool, epoch: int) -> int | None:
        """The seed of the shared permutations; each rank's own draws seeded apart (unless resumed exactly)."""
        if self.size > 1 or saved_size != self.size:
            perm_seed = ddp.shared_seed(perm_seed)  # the same permutations on every rank
            if saved_size != self.size or not resumed:  # but each rank its own sample draws (binarisation, z)
                pyro.set_rng_seed(ddp.mix_seed(perm_seed, self.rank, epoch))
        return perm_seed

    def wrap(
        self,
        loss: Loss,
        model: Callable,
        guide: Callable,
        params: Sequence[torch.Tensor],
        differentiable: bool,
        device: torch.device,
    ) -> tuple[Loss, Callable[[], None] | None]:
        """The loss to call each step and the gradient sync to call after backward (None: none needed)."""
        return loss, None

    def poll(self, stop: bool, first_bad: torch.Tensor, check: bool) -> tuple[bool, int]:
        """Before a step: whether to stop now, and a first bad batch to fail on (-1: none; one process checks after the loss)."""
        return stop, -1

    def first_bad(self, first_bad: torch.Tensor) -> int:
        """The epoch's first batch with a non-finite loss on any rank (-1: none)."""
        return int(first_bad)

    def total(self, loss_sum: torch.Tensor) -> float:
        """The epoch's loss sum over all ranks."""
        return float(loss_sum)

    def sum(self, value: float) -> float:
        return value

    def gather(self, obj: object) -> list | None:
        """Every rank's ``obj`` on rank 0 (None on the others)."""
        return [obj]

    def check_in_step(self, params: Sequence[torch.Tensor], where: str) -> None:
        """Raise if the ranks' parameters drifted apart (nothing to compare with one process)."""


class DataParallel(Strategy):
    """Several ranks of a ``torch.distributed`` process group: each trains on its shard, gradients averaged.

    DDP around the networks where it can, else an all-reduce of the gradients (see :mod:`pyrovae.distributed`).
    """

    def __init__(self, world: ddp.World) -> None:
        self.world, self.rank, self.size = world, world.rank, world.size

    def permutation(self, n: int, seed: int | None, epoch: int, device: torch.device) -> torch.Tensor:
        return ddp.epoch_permutation(n, seed, epoch, device)  # the same on every rank

    def wrap(self, loss, model, guide, params, differentiable, device):
        loss, sync, self.mode = ddp.data_parallel(loss, model, guide, params, differentiable, device)
        return loss, sync

    def poll(self, stop: bool, first_bad: torch.Tensor, check: bool) -> tuple[bool, int]:
        # every rank stops at the same step, and fails together
        return ddp.agree(stop, first_bad) if check else (False, -1)

    def first_bad(self, first_bad: torch.Tensor) -> int:
        return ddp.agree(False, first_bad)[1]

    def total(self, loss_sum: torch.Tensor) -> float:
        return float(ddp.all_sum(loss_sum))

    def sum(self, value: float) -> float:
        return float(ddp.all_sum(value))

    def gather(self, obj: object) -> list | None:
        return ddp.gather_to_first(obj)

    def check_in_step(self, params: Sequence[torch.Tensor], where: str) -> None:
        ddp.assert_same_params(params, where)


def current_strategy() -> Strategy:
    """Data-parallel when a process group of several ranks is up (torchrun), else one process."""
    world = ddp.world()
    return DataParallel(world) if world.size > 1 else Strategy()
