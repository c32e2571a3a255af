"""CUDA: the same training on the GPU keeps data, parameters and metrics on the device (skipped without one)."""

from __future__ import annotations

import pytest
import torch

from pyrovae import Pixels, build_vae, fit, make_splits, synthetic

from .conftest import SMALL

pytestmark = pytest.mark.cuda


def test_training_on_cuda_stays_on_the_device():
    splits = make_splits(synthetic(n_train=700, n_test=100, shape=(1, 12, 12)), Pixels("dynamic"), "cuda", val_size=200)
    vae = build_vae(splits.train.shape, "bernoulli", SMALL, pixel_mean=splits.train_pixel_mean).cuda()
    before = fit(vae.model, vae.guide, splits.train, epochs=1, val_data=splits.val, quiet=True, seed=0).val_elbo
    result = fit(
        vae.model, vae.guide, splits.train, epochs=20, batch_size=50, lr=3e-3, val_data=splits.val, quiet=True, seed=0
    )
    assert all(p.is_cuda for p in vae.parameters())
    assert splits.train.batch(torch.arange(3, device="cuda")).is_cuda
    assert result.val_elbo > before + 3  # it learns on the GPU as on the CPU (see test_elbos for the margin)


@pytest.mark.parametrize("elbo", ["trace", "meanfield", "iwae"])
def test_every_main_estimator_runs_on_cuda(elbo):
    splits = make_splits(synthetic(n_train=300, n_test=50, shape=(1, 12, 12)), Pixels("dynamic"), "cuda", val_size=50)
    vae = build_vae(splits.train.shape, "bernoulli", SMALL, pixel_mean=splits.train_pixel_mean).cuda()
    result = fit(vae.model, vae.guide, splits.train, elbo=elbo, epochs=2, val_data=splits.val, quiet=True, seed=0)
    assert result.epochs_done == 2 and result.val_elbo < 0
