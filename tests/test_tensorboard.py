"""The TensorBoard callback: what fit hands it per epoch ends up in the event file, images included."""

from __future__ import annotations

import math

import pytest
import torch

from pyrovae import fit
from pyrovae.errors import PyrovaeError
from pyrovae.reports.tensorboard import TensorBoardLogger, image_grid

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def _events(log_dir):
    acc = event_accumulator.EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_fit_writes_each_epochs_scalars_and_image_grids(tmp_path, tiny_splits, tiny_vae):
    images = tiny_splits.val.batch(torch.arange(6))
    with TensorBoardLogger(tmp_path / "tb", vae=tiny_vae, images=images, n_samples=10) as tb:
        result = fit(
            tiny_vae.model,
            tiny_vae.guide,
            tiny_splits.train,
            val_data=tiny_splits.val,
            epochs=3,
            batch_size=100,
            quiet=True,
            callback=tb,
        )
    acc = _events(tmp_path / "tb")
    train = acc.Scalars("train_elbo")
    assert [e.step for e in train] == [1, 2, 3]
    # the logged values are fit's own history (event files store float32)
    for event, row in zip(train, result.history, strict=True):
        assert math.isclose(event.value, row["train_elbo"], rel_tol=1e-6)
    assert [e.step for e in acc.Scalars("val_elbo")] == [1, 2, 3]
    samples, recon = acc.Images("samples"), acc.Images("reconstructions")
    assert [e.step for e in samples] == [1, 2, 3] and len(recon) == 3
    # 10 samples of 12x12 in rows of 8 with 1-pixel padding: 2 rows -> 27 high, 8 columns -> 105 wide
    assert (samples[0].height, samples[0].width) == (27, 105)
    # 6 images above-and-beside their reconstructions: 12 tiles, 16 to a row -> one row of 12
    assert (recon[0].height, recon[0].width) == (14, 157)


def test_images_every_n_epochs_and_no_vae_means_scalars_only(tmp_path, tiny_splits, tiny_vae):
    with TensorBoardLogger(tmp_path / "a", vae=tiny_vae, image_every=2) as tb:
        for epoch in (1, 2, 3):
            tb({"epoch": epoch, "train_elbo": -1.0 * epoch, "val_elbo": math.nan})
    acc = _events(tmp_path / "a")
    assert [e.step for e in acc.Images("samples")] == [1, 3]
    assert "val_elbo" not in acc.Tags()["scalars"]  # NaN (no validation split) is not plotted
    with TensorBoardLogger(tmp_path / "b") as tb:
        tb({"epoch": 1, "train_elbo": -2.0})
    assert _events(tmp_path / "b").Tags()["images"] == []


def test_image_grid_shapes_and_bad_input():
    flat = torch.rand(4, 2 * 3 * 5)
    assert image_grid(flat, shape=(2, 3, 5)).shape == (2, 3 + 2, 4 * 6 + 1)
    assert image_grid(torch.rand(3, 4, 4), nrow=3).shape == (3, 6, 16)  # grayscale (B, H, W) -> 3 channels
    with pytest.raises(PyrovaeError, match="must be"):
        image_grid(torch.rand(2, 3))


def test_train_command_writes_tensorboard_events(tmp_path):
    """`pyrovae train --tensorboard DIR`: the run's epochs in the event file, beside an ordinary run folder."""
    from pyrovae.cli import main

    args = ["train", "--dataset", "synthetic", "--hidden", "32", "--z-dim", "4", "--batch-size", "100", "--quiet"]
    assert main([*args, "--epochs", "2", "--out", str(tmp_path / "run"), "--tensorboard", str(tmp_path / "tb")]) == 0
    acc = _events(tmp_path / "tb")
    assert [e.step for e in acc.Scalars("val_elbo")] == [1, 2]
    assert len(acc.Images("reconstructions")) == 2
    assert (tmp_path / "run" / "checkpoint.pt").exists()
    assert "tensorboard" not in (tmp_path / "run" / "config.json").read_text()  # where to log is not the run's config
