"""Safe files: the atomic writer (fresh temp names, umask, full disk), loaders that never run planted code,
run-folder locks, stale temp files, complete and typed configs, and one-line errors for bad data files."""

from __future__ import annotations

import errno
import gzip
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from pyrovae.config import CONFIG_VERSION, RunConfig
from pyrovae.data import Pixels, load_dataset, make_splits, read_idx, synthetic, write_idx_folder
from pyrovae.errors import PyrovaeError, PyrovaeWarning
from pyrovae.files import (
    RunLock,
    atomic_write,
    load_plain_pickle,
    load_weights,
    remove_stale_temp_files,
    write_json,
)
from pyrovae.runs import check_config, read_config


class Planted:
    """An object whose unpickling runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---------------------------------------------------------------------------------------- the writer
def test_a_symlink_planted_at_a_temp_name_or_the_target_redirects_nothing(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    for name in (".eval.json.tmp", f".eval.json.{os.getpid()}.tmp", ".eval.nc.tmp"):
        (run / name).symlink_to(victim)
    (run / "eval.md").symlink_to(victim)
    write_json(run / "eval.json", {"a": 1})
    atomic_write(run / "eval.md", b"new")
    assert victim.read_text() == "precious"
    assert json.loads((run / "eval.json").read_text()) == {"a": 1}
    assert not (run / "eval.md").is_symlink() and (run / "eval.md").read_bytes() == b"new"


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_files_get_the_umasks_permissions(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_json(tmp_path / "x.json", [1])
    finally:
        os.umask(old)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == mode


@pytest.mark.parametrize(
    "failure",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0"),
    ],
)
def test_a_full_disk_is_one_line_and_keeps_the_old_file(tmp_path, failure):
    path = tmp_path / "checkpoint.pt"
    atomic_write(path, b"old contents")

    def write(f):
        f.write(b"half")
        raise failure

    with pytest.raises(PyrovaeError, match="No space left on device") as info:
        atomic_write(path, write)
    assert len(str(info.value).splitlines()) == 1
    assert path.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_stale_temp_files_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    dead = tmp_path / f".checkpoint.pt.{dead_pid()}.abc123.tmp"
    live = tmp_path / f".checkpoint.pt.{os.getppid()}.def456.tmp"
    other = tmp_path / "notes.tmp"
    for p in (dead, live, other):
        p.write_bytes(b"x")
    assert remove_stale_temp_files(tmp_path) == [dead]
    assert not dead.exists() and live.exists() and other.exists()


# ----------------------------------------------------------------------------------------- loading
def test_a_planted_checkpoint_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"params": {}, "x": Planted(marker)}, tmp_path / "checkpoint.pt")
    with pytest.raises(PyrovaeError, match="refusing to load .*posix.system|refusing to load .*system") as info:
        load_weights(tmp_path / "checkpoint.pt")
    assert len(str(info.value).splitlines()) == 1
    assert not marker.exists()


def test_a_checkpoint_with_numpy_rng_state_loads(tmp_path):
    state = {"rng": {"numpy": np.random.get_state(), "torch": torch.get_rng_state()}, "n": 3, "s": "x"}
    torch.save(state, tmp_path / "c.pt")
    back = load_weights(tmp_path / "c.pt")
    assert np.array_equal(back["rng"]["numpy"][1], state["rng"]["numpy"][1]) and back["s"] == "x"


def _cifar_batch(n: int, seed: int) -> dict:
    g = np.random.default_rng(seed)
    return {
        b"batch_label": b"training batch 1 of 5",
        b"labels": [int(v) for v in g.integers(0, 10, n)],
        b"data": g.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [b"img_%d.png" % i for i in range(n)],
    }


def write_cifar_folder(folder, n=20, planted=None):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate([*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]):
        with open(folder / name, "wb") as f:
            pickle.dump(Planted(planted) if planted and i == 0 else _cifar_batch(n, i), f, protocol=2)
    return folder


def test_a_real_format_cifar_folder_loads(tmp_path):
    raw = load_dataset("cifar10", write_cifar_folder(tmp_path / "c"))
    assert raw.train_x.shape == (100, 3, 32, 32) and raw.test_x.shape == (20, 3, 32, 32)
    assert torch.equal(raw.train_x[:20].reshape(20, -1), torch.from_numpy(_cifar_batch(20, 0)[b"data"]))


def test_a_planted_cifar_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    folder = write_cifar_folder(tmp_path / "c", planted=marker)
    with pytest.raises(PyrovaeError, match="refusing to read .*data_batch_1.*not allowed"):
        load_dataset("cifar10", folder)
    with pytest.raises(PyrovaeError, match="not a plain data pickle"):
        load_plain_pickle(folder / "data_batch_1")
    assert not marker.exists()


# ----------------------------------------------------------------------------------------- locking
def test_a_locked_run_folder_refuses_a_second_writer_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    with RunLock(run):
        assert (run / ".lock").read_text().strip() == str(os.getpid())
        with pytest.raises(PyrovaeError, match=rf"in use by another pyrovae command \(pid {os.getpid()}\)"):
            RunLock(run).__enter__()
    assert not (run / ".lock").exists() and not run.exists()  # made by the lock, left empty: removed


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text(f"{dead_pid()}\n")
    (run / "keep.txt").write_text("x")
    with RunLock(run):
        assert (run / ".lock").read_text().strip() == str(os.getpid())
    assert sorted(p.name for p in run.iterdir()) == ["keep.txt"]


# ------------------------------------------------------------------------------------------ configs
# the options of a version-1 config, as the previous release wrote them (flat, with config_version 1)
V1_OPTIONS = {
    "dataset": "fashion-mnist", "data_dir": None, "root": None, "download": False, "likelihood": "bernoulli",
    "sigma": None, "allow_nonbinary": False, "binarize": "dynamic", "dequantize": False, "arch": "iwae",
    "z_dim": None, "hidden": None, "activation": None, "elbo": "meanfield", "particles": None, "alpha": None,
    "epochs": 10, "batch_size": 100, "lr": 1e-3, "clip_norm": None, "lr_schedule": "none", "lr_gamma": 0.95,
    "warmup_epochs": 0.0, "val_size": None, "train_size": None, "device": "auto", "seed": 0, "autocast": None,
}  # fmt: skip


def _config(**changes):
    cfg = {**V1_OPTIONS, "config_version": 1, **changes}
    return {k: v for k, v in cfg.items() if v != "DROP"}


def _v2(section=None, **changes):
    cfg = RunConfig().to_dict()
    target = cfg[section] if section else cfg
    target.update(changes)
    for k in [k for k, v in target.items() if v == "DROP"]:
        del target[k]
    return cfg


@pytest.mark.parametrize(
    "cfg, message",
    [
        ([1, 2], "not a run config: it holds a JSON list"),
        (_config(hidden="abc"), "field 'hidden' is 'abc'"),
        (_config(lr="fast"), "field 'lr' is 'fast'"),
        (_config(hidden="DROP"), "lacks the field 'hidden'"),
        (_config(binarize="DROP"), "lacks the field 'binarize'"),
        (_config(epochs=True), "field 'epochs' is True"),
        (_config(seed=-1), "field 'seed' is -1"),
        (_config(val_size="10"), "field 'val_size' is '10'"),
        (_config(config_version="DROP"), "version 'none'"),
        (_config(config_version=7), "config_version 7"),
        (_v2("model", hidden="abc"), "field 'model.hidden' is 'abc'"),
        (_v2("training", lr="fast"), "field 'training.lr' is 'fast'"),
        (_v2("model", hidden="DROP"), "lacks the field 'model.hidden'"),
        (_v2("data", binarize="DROP"), "lacks the field 'data.binarize'"),
        (_v2("training", epochs=True), "field 'training.epochs' is True"),
        (_v2("training", seed=-1), "field 'training.seed' is -1"),
        (_v2("data", val_size="10"), "field 'data.val_size' is '10'"),
        (_v2("data", colour=True), "unknown field 'data.colour'"),
        (_v2(optimiser="adam"), "unknown field 'optimiser'"),
        (_v2(kind="flow"), "field 'kind' is 'flow'"),
        (_v2(version=CONFIG_VERSION + 1), f"config version {CONFIG_VERSION + 1}"),
        (_v2(training="DROP"), "lacks the field 'training'"),
    ],
)
def test_a_missing_or_mistyped_config_field_is_one_line(tmp_path, cfg, message):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    before = (tmp_path / "config.json").read_bytes()
    with pytest.raises(PyrovaeError) as info:
        read_config(tmp_path)
    assert message in str(info.value) and len(str(info.value).splitlines()) == 1
    assert (tmp_path / "config.json").read_bytes() == before


def test_a_complete_config_with_null_val_size_is_accepted():
    assert check_config(_config(val_size=None, hidden="400,200", sigma=0.1)).data.val_size is None
    assert check_config(_v2("data", val_size=None)).data.val_size is None


# ---------------------------------------------------------------------------------------- data files
@pytest.mark.parametrize("content", ["random", "truncated"])
def test_a_broken_gz_is_one_line(tmp_path, content):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    good = gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 100]) + bytes(100))
    path.write_bytes(os.urandom(200) if content == "random" else good[: len(good) // 2])
    with pytest.raises(PyrovaeError, match="is not a readable gzip file") as info:
        read_idx(path)
    assert len(str(info.value).splitlines()) == 1


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_an_explicit_data_dir_is_the_only_place_looked_in(tmp_path, monkeypatch, kind):
    monkeypatch.setenv("PYROVAE_DATA", str(write_idx_folder(synthetic(n_train=50, n_test=10), tmp_path / "env")))
    data_dir = tmp_path / "given"
    if kind == "file":
        data_dir.write_text("not a folder")
    with pytest.raises(PyrovaeError, match="does not exist" if kind == "missing" else "is a file, not a folder"):
        load_dataset("mnist", data_dir)
    assert load_dataset("mnist").source == str(tmp_path / "env")  # without --data-dir, $PYROVAE_DATA is used


def test_a_train_size_beyond_the_data_says_what_was_used():
    raw = synthetic(n_train=300, n_test=10)
    with pytest.warns(
        PyrovaeWarning,
        match="--train-size 1000 is more than synthetic holds: using all 300 images, 270 to train on and 30 held out",
    ):
        splits = make_splits(raw, Pixels("fixed"), train_size=1000, val_size=30)
    assert len(splits.train) == 270


@pytest.mark.parametrize("damage", ["random", "truncated"])
def test_a_damaged_checkpoint_is_one_line_and_not_called_planted(tmp_path, damage):
    torch.save({"w": torch.ones(1000)}, tmp_path / "c.pt")
    good = (tmp_path / "c.pt").read_bytes()
    for seed in range(30):  # random bytes fail in many ways inside torch's reader: each is one line
        bad = np.random.default_rng(seed).bytes(3000) if damage == "random" else good[: len(good) * seed // 30]
        (tmp_path / "c.pt").write_bytes(bad)
        with pytest.raises(PyrovaeError, match="cannot read checkpoint") as info:
            load_weights(tmp_path / "c.pt")
        assert len(str(info.value).splitlines()) == 1 and "refusing" not in str(info.value)
