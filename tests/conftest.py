"""Shared fixtures: small synthetic data and a small VAE, so the suite runs in minutes on a CPU."""

from __future__ import annotations

import pyro
import pytest
import torch

from pyrovae import Pixels, build_vae, make_splits, synthetic
from pyrovae.nn.nets import Arch

SMALL = Arch("mlp", (64,), "tanh", 8, logit_bias=True)


@pytest.fixture(autouse=True)
def _fresh_pyro():
    """Each test starts from a clean param store and a fixed seed."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_splits():
    raw = synthetic(n_train=700, n_test=200, shape=(1, 12, 12), seed=0)
    return make_splits(raw, Pixels("dynamic"), "cpu", val_size=200, seed=0)


@pytest.fixture
def tiny_vae(tiny_splits):
    torch.manual_seed(0)
    return build_vae(tiny_splits.train.shape, "bernoulli", SMALL, pixel_mean=tiny_splits.train_pixel_mean)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
