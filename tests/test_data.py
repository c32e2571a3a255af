"""Data: idx and CIFAR readers, the look-up order, pixel handling and splits."""

from __future__ import annotations

import dataclasses
import os
import pickle

import numpy as np
import pytest
import torch

from pyrovae import Pixels, PyrovaeError, load_dataset, make_splits, synthetic
from pyrovae.data import ImageData, default_val_size, read_idx, write_idx_folder


def _listing(folder):
    return sorted((p.relative_to(folder), p.stat().st_mtime_ns) for p in folder.rglob("*"))


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_round_trip_and_nothing_written(tmp_path, gz, monkeypatch):
    monkeypatch.delenv("PYROVAE_DATA", raising=False)
    raw = synthetic(n_train=50, n_test=20, seed=3)
    folder = write_idx_folder(raw, tmp_path / "fm", gz=gz)
    before = _listing(tmp_path)
    got = load_dataset("fashion-mnist", data_dir=folder, root=tmp_path / "root")
    assert torch.equal(got.train_x, raw.train_x) and torch.equal(got.test_y, raw.test_y)
    assert got.train_x.shape == (50, 1, 28, 28) and got.train_x.dtype == torch.uint8
    assert _listing(tmp_path) == before  # never writes into a source folder (nor creates the root)


def test_lookup_order_data_dir_then_env_then_root(tmp_path, monkeypatch):
    a = write_idx_folder(synthetic(n_train=10, n_test=5, seed=1), tmp_path / "a")
    write_idx_folder(synthetic(n_train=12, n_test=5, seed=2), tmp_path / "b" / "FashionMNIST" / "raw")
    monkeypatch.setenv("PYROVAE_DATA", str(tmp_path / "b"))  # torchvision-style root layout
    assert len(load_dataset("fashion-mnist", data_dir=a).train_x) == 10
    assert len(load_dataset("fashion-mnist").train_x) == 12
    monkeypatch.delenv("PYROVAE_DATA")
    assert len(load_dataset("fashion-mnist", root=tmp_path / "b").train_x) == 12


def test_missing_data_names_every_place_and_how_to_supply_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PYROVAE_DATA", str(tmp_path / "env"))
    with pytest.raises(PyrovaeError) as err:
        load_dataset("mnist", root=tmp_path / "root")
    msg = str(err.value)
    assert "\n" not in msg
    for place in ("env", "root", "/usr/share/datasets/mnist", "--data-dir", "PYROVAE_DATA", "--download"):
        assert place in msg
    (tmp_path / "dd").mkdir()  # an explicit --data-dir is the only place looked in
    with pytest.raises(PyrovaeError, match=r"mnist not found in --data-dir .*dd: expected the four MNIST"):
        load_dataset("mnist", data_dir=tmp_path / "dd", root=tmp_path / "root")
    with pytest.raises(PyrovaeError, match="unknown dataset 'svhn'"):
        load_dataset("svhn")


def test_bad_idx_files_are_refused(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x00\x00\x09\x01" + b"\x00" * 8)
    with pytest.raises(PyrovaeError, match="not an idx file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + (100).to_bytes(4, "big") + b"\x00" * 10)
    with pytest.raises(PyrovaeError, match="truncated"):
        read_idx(tmp_path / "short")


def test_cifar_batches_are_read_from_a_torchvision_root(tmp_path, monkeypatch):
    monkeypatch.delenv("PYROVAE_DATA", raising=False)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, 20)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    got = load_dataset("cifar10", root=tmp_path)
    assert got.train_x.shape == (100, 3, 32, 32) and got.test_x.shape == (20, 3, 32, 32)
    with open(folder / "test_batch", "rb") as f:
        first = pickle.load(f)[b"data"][0]
    assert torch.equal(got.test_x[0].reshape(-1), torch.from_numpy(first))  # channel-major, as CIFAR stores it


def test_pixel_handling():
    u8 = torch.tensor([[[[0, 64, 128, 255]]]], dtype=torch.uint8).expand(4000, 1, 1, 4).contiguous()
    train = ImageData(u8, None, Pixels("dynamic"))
    idx = torch.arange(4000)
    a, b = train.batch(idx), train.batch(idx)
    assert set(a.unique().tolist()) <= {0.0, 1.0} and not torch.equal(a, b)  # a fresh draw each time
    # mean of 4000 Bernoulli(p) draws: SE <= 0.008, tolerance 0.04 (5 SE)
    assert torch.allclose(a.mean(0).flatten(), torch.tensor([0, 64, 128, 255]) / 255.0, atol=0.04)
    val = ImageData(u8, None, Pixels("dynamic"), fixed_seed=1)
    assert torch.equal(val.batch(idx), val.batch(idx))  # evaluation splits are drawn once
    fixed = ImageData(u8, None, Pixels("fixed")).batch(idx[:1]).flatten().tolist()
    assert fixed == [0.0, 0.0, 1.0, 1.0]
    deq = ImageData(u8, None, Pixels("none", dequantize=True)).batch(idx)
    lo = torch.tensor([0, 64, 128, 255]) / 256.0
    assert ((deq >= lo) & (deq < lo + 1 / 256)).all()
    with pytest.raises(PyrovaeError, match="with --binarize none"):
        Pixels("dynamic", dequantize=True)


def test_splits_are_seeded_disjoint_and_sized():
    raw = synthetic(n_train=300, n_test=50, shape=(1, 8, 8), seed=0)
    s1 = make_splits(raw, Pixels("fixed"), val_size=60, seed=4)
    s2 = make_splits(raw, Pixels("fixed"), val_size=60, seed=4)
    assert len(s1.train) == 240 and len(s1.val) == 60 and len(s1.test) == 50
    assert torch.equal(s1.val.all(), s2.val.all())
    small = make_splits(raw, Pixels("none"), val_size=20, train_size=100, seed=4)
    assert len(small.train) == 80 and len(small.val) == 20
    with pytest.raises(PyrovaeError, match="--val-size must be between 0 and 99"):
        make_splits(raw, Pixels("none"), val_size=100, train_size=100)


def test_default_validation_split_is_a_tenth_capped_at_5000():
    raw = synthetic(n_train=300, n_test=10, shape=(1, 4, 4), seed=0)
    assert len(make_splits(raw, Pixels("fixed"), train_size=120).val) == 12
    assert len(make_splits(raw, Pixels("fixed")).val) == 30
    big = dataclasses.replace(
        raw, train_x=torch.zeros(60000, 1, 2, 2, dtype=torch.uint8), train_y=torch.zeros(60000, dtype=torch.long)
    )
    assert [default_val_size(n) for n in (3000, 49999, 50000, 60000)] == [300, 4999, 5000, 5000]
    assert len(make_splits(big, Pixels("fixed")).val) == 5000


@pytest.mark.skipif(not os.environ.get("PYROVAE_DATA"), reason="PYROVAE_DATA is not set (point it at the shared data)")
def test_shared_fashion_mnist_loads():
    data = load_dataset("fashion-mnist")
    assert data.train_x.shape == (60000, 1, 28, 28) and data.test_x.shape == (10000, 1, 28, 28)
    assert data.train_y.unique().tolist() == list(range(10))
    # Fashion-MNIST's mean training intensity is 72.94 (of 255): a check that pixels were read in order
    assert abs(data.train_x.float().mean().item() - 72.94) < 0.05
