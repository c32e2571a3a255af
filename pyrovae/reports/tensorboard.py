"""A ``fit`` callback (a :class:`pyrovae.train.Callback`) that writes training to TensorBoard: the epoch's
scalars and, for a VAE, grids of prior samples and of reconstructions of fixed images. ``tensorboard`` is an optional extra
(``pip install 'pyrovae[tensorboard]'``); nothing else in pyrovae needs it.

    with TensorBoardLogger("runs/fm/tb", vae=vae, images=splits.val[:32]) as tb:
        fit(vae.model, vae.guide, splits.train, callback=tb)
"""

from __future__ import annotations

import math
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import torch

from .. import distributed as ddp
from ..errors import PyrovaeError
from ..train.callbacks import Callback

if TYPE_CHECKING:
    from ..train.loop import Loop

SCALARS = ("train_elbo", "val_elbo", "beta", "lr", "seconds")


def _summary_writer(log_dir: Path):
    """torch's SummaryWriter, or a one-line error when the optional ``tensorboard`` package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise PyrovaeError(
            "the TensorBoard callback needs the tensorboard package: pip install 'pyrovae[tensorboard]'"
        ) from None
    return SummaryWriter(log_dir=str(log_dir))


def image_grid(x: torch.Tensor, shape: tuple[int, ...] | None = None, nrow: int = 8) -> torch.Tensor:
    """A (C, H, W) grid in [0, 1] of a batch of images given as (B, C, H, W), (B, H, W) or flat (B, D) with ``shape``."""
    from torchvision.utils import make_grid

    x = x.detach().float().cpu()
    if shape is not None:
        x = x.reshape(len(x), *shape)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4:
        raise PyrovaeError(
            f"images for a grid must be (B, C, H, W), (B, H, W) or flat with a shape; got {tuple(x.shape)}"
        )
    return make_grid(x.clamp(0, 1), nrow=nrow, padding=1, pad_value=1.0)


class TensorBoardLogger(Callback):
    """Called once per epoch by :func:`pyrovae.fit` (``callback=`` or ``callbacks=``): scalars every epoch, image
    grids every ``image_every`` epochs when a ``vae`` (with ``sample`` and ``reconstruct``) is given. Only rank 0 writes."""

    def __init__(
        self,
        log_dir: str | Path,
        vae: torch.nn.Module | None = None,
        images: torch.Tensor | None = None,
        n_samples: int = 64,
        image_every: int = 1,
    ) -> None:
        if image_every < 1 or n_samples < 1:
            raise PyrovaeError(f"image_every and n_samples must be >= 1; got {image_every}, {n_samples}")
        self.vae, self.images, self.n_samples, self.image_every = vae, images, n_samples, image_every
        self.writer = _summary_writer(Path(log_dir)) if ddp.world().rank == 0 else None

    def on_epoch_end(self, loop: Loop, row: dict[str, float]) -> None:
        self(row)

    def __call__(self, row: dict[str, float]) -> None:
        """Write one epoch's metrics (``row`` as ``fit`` reports it)."""
        if self.writer is None:
            return
        epoch = int(row["epoch"])
        for name in SCALARS:
            value = row.get(name)
            if value is not None and not math.isnan(value):
                self.writer.add_scalar(name, value, epoch)
        if self.vae is not None and (epoch - 1) % self.image_every == 0:
            self._images(epoch)
        self.writer.flush()

    @torch.no_grad()
    def _images(self, epoch: int) -> None:
        vae = self.vae
        like = self.images if self.images is not None else next(vae.parameters())
        was_training = vae.training
        vae.eval()
        try:
            self.writer.add_image("samples", image_grid(vae.sample(self.n_samples, like)), epoch)
            if self.images is not None:
                pairs = torch.stack(
                    [self.images.float(), vae.reconstruct(self.images)], dim=1
                )  # data above its reconstruction
                self.writer.add_image("reconstructions", image_grid(pairs.flatten(0, 1), nrow=16), epoch)
        finally:
            vae.train(was_training)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def __enter__(self) -> TensorBoardLogger:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
