"""Datasets as device-resident tensors: one uint8 tensor per split, batched by a permutation on the device.

Finding data: an explicit ``--data-dir`` is the only place looked in; without it ``$PYROVAE_DATA``, then the
torchvision root (``root``), then Debian's system folder, then (only when asked) a torchvision download into
the root. Nothing is ever written into a folder the data was read from.
"""

from __future__ import annotations

import gzip
import os
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
import torch

from .errors import PyrovaeError, PyrovaeWarning
from .files import atomic_write, load_plain_pickle

DEFAULT_ROOT = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pyrovae" / "data"
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
BINARIZE = ("none", "dynamic", "fixed")
MAX_DEFAULT_VAL = 5000  # the default validation split: 10% of the training images, at most this many


@dataclass(frozen=True)
class DatasetSpec:
    """How a named dataset is stored: its torchvision class, folder names and image shape."""

    torchvision_class: str
    folders: tuple[str, ...]  # sub-folders of a root that may hold the files
    shape: tuple[int, int, int]
    system_dir: str | None = None


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec("MNIST", ("MNIST/raw", "MNIST", "mnist"), (1, 28, 28), "/usr/share/datasets/mnist"),
    "fashion-mnist": DatasetSpec(
        "FashionMNIST",
        ("FashionMNIST/raw", "FashionMNIST", "fashion-mnist"),
        (1, 28, 28),
        "/usr/share/datasets/fashion-mnist",
    ),
    "cifar10": DatasetSpec("CIFAR10", ("cifar-10-batches-py", "CIFAR10/cifar-10-batches-py"), (3, 32, 32)),
}


@dataclass
class RawDataset:
    """A dataset as read from disk: uint8 images (N, C, H, W) and int64 labels, on the CPU."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    source: str


# --------------------------------------------------------------------------------------------- files
def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: str | Path) -> np.ndarray:
    """Read one MNIST-format idx file (gzipped or not) into a numpy array."""
    path = Path(path)
    try:
        with _open(path) as f:
            data = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise PyrovaeError(f"{path} is not a readable gzip file ({exc or 'it ends early'})") from None
    except OSError as exc:
        raise PyrovaeError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise PyrovaeError(f"{path} is not an idx file of unsigned bytes (bad magic number)")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(dims)):
        raise PyrovaeError(f"{path} is truncated: header says {dims}, file holds {len(data) - offset} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _idx_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / (stem + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _has_idx(folder: Path) -> bool:
    return all(_idx_file(folder, stem) is not None for stem in IDX_FILES.values())


def _has_cifar(folder: Path) -> bool:
    return (folder / "test_batch").is_file() and all((folder / f"data_batch_{i}").is_file() for i in range(1, 6))


def _read_idx_folder(name: str, folder: Path) -> RawDataset:
    arrays = {key: read_idx(_idx_file(folder, stem)) for key, stem in IDX_FILES.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise PyrovaeError(f"{folder}: {split} images {images.shape} and labels {labels.shape} do not match")
    return RawDataset(
        name,
        torch.from_numpy(arrays["train_images"].copy()).unsqueeze(1),
        torch.from_numpy(arrays["train_labels"].astype(np.int64)),
        torch.from_numpy(arrays["test_images"].copy()).unsqueeze(1),
        torch.from_numpy(arrays["test_labels"].astype(np.int64)),
        str(folder),
    )


def _read_cifar_folder(name: str, folder: Path) -> RawDataset:
    def load(files: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for file in files:
            batch = load_plain_pickle(folder / file)  # never runs code a planted pickle might hold
            data = batch.get(b"data") if isinstance(batch, dict) else None
            labels = batch.get(b"labels") if isinstance(batch, dict) else None
            if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.size % 3072 or labels is None:
                raise PyrovaeError(f"{folder / file} is not a CIFAR-10 batch (a dict of uint8 data and labels)")
            xs.append(data.reshape(-1, 3, 32, 32))
            try:
                ys.append(np.asarray(labels, dtype=np.int64).reshape(len(xs[-1])))
            except (TypeError, ValueError):
                raise PyrovaeError(f"{folder / file}: its labels do not match its {len(xs[-1])} images") from None
        return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))

    train_x, train_y = load([f"data_batch_{i}" for i in range(1, 6)])
    test_x, test_y = load(["test_batch"])
    return RawDataset(name, train_x, train_y, test_x, test_y, str(folder))


def _candidates(spec: DatasetSpec, base: Path) -> list[Path]:
    return [base] + [base / sub for sub in spec.folders]


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    root: str | Path | None = None,
    download: bool = False,
) -> RawDataset:
    """Find and read a named dataset (see the module docstring for the look-up order)."""
    if name not in DATASETS:
        raise PyrovaeError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    spec = DATASETS[name]
    is_cifar = name == "cifar10"
    found = _has_cifar if is_cifar else _has_idx
    read = _read_cifar_folder if is_cifar else _read_idx_folder
    root = Path(root) if root else DEFAULT_ROOT
    places: list[tuple[str, Path]] = []
    if data_dir is not None:  # an explicitly named place is the only place looked in
        data_dir = Path(data_dir)
        if not data_dir.exists():
            raise PyrovaeError(f"--data-dir {data_dir} does not exist")
        if not data_dir.is_dir():
            raise PyrovaeError(f"--data-dir {data_dir} is a file, not a folder")
        for folder in _candidates(spec, data_dir):
            if folder.is_dir() and found(folder):
                return read(name, folder)
        raise PyrovaeError(
            f"{name} not found in --data-dir {data_dir}: expected "
            + ("the cifar-10-batches-py files" if is_cifar else "the four MNIST-format idx files, gzipped or not")
        )
    if os.environ.get("PYROVAE_DATA"):
        places.append(("$PYROVAE_DATA", Path(os.environ["PYROVAE_DATA"])))
    places.append(("torchvision root", root))
    if spec.system_dir:
        places.append(("system folder", Path(spec.system_dir)))
    looked: list[str] = []
    for _, base in places:
        for folder in _candidates(spec, base):
            looked.append(str(folder))
            if folder.is_dir() and found(folder):
                return read(name, folder)
    if download:
        _download(spec, root)
        for folder in _candidates(spec, root):
            if folder.is_dir() and found(folder):
                return read(name, folder)
    raise PyrovaeError(
        f"{name} not found; looked in {', '.join(dict.fromkeys(looked))}. "
        f"Supply it with --data-dir DIR (a folder of the four MNIST-format idx files, gzipped or not"
        f"{'; for cifar10 the cifar-10-batches-py folder' if is_cifar else ''}), "
        f"set PYROVAE_DATA, or pass --download to fetch it into {root}"
    )


def _download(spec: DatasetSpec, root: Path) -> None:
    import torchvision

    cls = getattr(torchvision.datasets, spec.torchvision_class)
    root.mkdir(parents=True, exist_ok=True)
    try:
        for train in (True, False):
            cls(str(root), train=train, download=True)
    except Exception as exc:  # network errors come in many types
        raise PyrovaeError(f"could not download {spec.torchvision_class} into {root}: {exc}".splitlines()[0]) from None


# ----------------------------------------------------------------------------------------- synthetic
def synthetic(
    n_train: int = 2000,
    n_test: int = 500,
    shape: tuple[int, int, int] = (1, 28, 28),
    n_classes: int = 10,
    seed: int = 0,
) -> RawDataset:
    """Images with the shape and dtype of a real dataset: noisy random prototypes, one per class."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = shape
    # Smooth prototypes: low-resolution noise upsampled, so neighbouring pixels correlate as in real images.
    coarse = torch.rand(n_classes, c, max(h // 4, 1), max(w // 4, 1), generator=g)
    protos = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    protos = (protos - protos.amin()) / (protos.amax() - protos.amin())

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(n_classes, (n,), generator=g)
        intensity = 0.6 + 0.4 * torch.rand(n, 1, 1, 1, generator=g)
        x = protos[y] * intensity + 0.1 * torch.randn(n, c, h, w, generator=g)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8), y

    train_x, train_y = draw(n_train)
    test_x, test_y = draw(n_test)
    return RawDataset("synthetic", train_x, train_y, test_x, test_y, "synthetic")


def write_idx_folder(data: RawDataset, folder: str | Path, gz: bool = True) -> Path:
    """Write a dataset as the four MNIST-format idx files (for tests of the idx reader and CLI)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_images": data.train_x[:, 0].numpy(),
        "train_labels": data.train_y.numpy().astype(np.uint8),
        "test_images": data.test_x[:, 0].numpy(),
        "test_labels": data.test_y.numpy().astype(np.uint8),
    }
    for key, stem in IDX_FILES.items():
        arr = np.ascontiguousarray(arrays[key], dtype=np.uint8)
        header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
        raw = header + arr.tobytes()
        atomic_write(folder / (stem + (".gz" if gz else "")), gzip.compress(raw, mtime=0) if gz else raw)
    return folder


# ------------------------------------------------------------------------------------------- pixels
@dataclass(frozen=True)
class Pixels:
    """How uint8 pixels become model inputs.

    binarize: ``none`` (x/255 in [0, 1]), ``dynamic`` (a fresh Bernoulli(x/255) draw each time a
    training batch is drawn; evaluation splits are drawn once with a fixed seed), or ``fixed``
    (threshold 0.5 once). dequantize: x = (pixel + u)/256 with u ~ U(0, 1), for densities on [0, 1].
    """

    binarize: str = "none"
    dequantize: bool = False

    def __post_init__(self) -> None:
        if self.binarize not in BINARIZE:
            raise PyrovaeError(f"unknown binarisation {self.binarize!r}; choose one of {', '.join(BINARIZE)}")
        if self.dequantize and self.binarize != "none":
            raise PyrovaeError("dequantisation applies to continuous pixels only: use it with --binarize none")

    @property
    def binary(self) -> bool:
        return self.binarize != "none"

    def prepare(self, u8: torch.Tensor) -> torch.Tensor:
        """What is stored on the device: the raw uint8 pixels, or the fixed 0/1 threshold."""
        return (u8 > 127).to(torch.uint8) if self.binarize == "fixed" else u8

    def __call__(self, stored: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Turn stored uint8 values into float inputs (random draws use ``generator`` or the global RNG)."""
        x = stored.float()
        if self.binarize == "fixed":
            return x
        if self.binarize == "dynamic":  # u < p is a Bernoulli(p) draw, 4x faster than torch.bernoulli on a CPU
            u = torch.rand(x.shape, device=x.device, generator=generator)
            return u.lt_(x.div_(255.0)).to(x.dtype)
        if self.dequantize:
            u = torch.rand(x.shape, device=x.device, generator=generator)
            return x.add_(u).div_(256.0)
        return x.div_(255.0)


# -------------------------------------------------------------------------------------- device data
class Call(NamedTuple):
    """A batch that is called as ``model(*args, **kwargs)``: positional and keyword data arguments."""

    args: tuple
    kwargs: dict


Batch = torch.Tensor | tuple | Call


def as_call(batch: Batch) -> tuple[tuple, dict]:
    """The positional and keyword arguments a program is called with for ``batch``."""
    if isinstance(batch, Call):
        return tuple(batch.args), dict(batch.kwargs)
    if isinstance(batch, tuple):
        return batch, {}
    return (batch,), {}


def batch_length(batch: Batch) -> int | None:
    """The number of datapoints in ``batch``: the first dim of its first tensor (None without one)."""
    args, kwargs = as_call(batch)
    return next((len(t) for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.dim() > 0), None)


class Dataset(Protocol):
    """What :func:`pyrovae.fit` trains on: a length, and a batch for a tensor of indices."""

    def __len__(self) -> int: ...

    def batch(self, idx: torch.Tensor) -> Batch: ...


class TensorData:
    """Plain tensors (already on their device) as a dataset: ``TensorData(xs, ys)`` calls ``model(xs_b, ys_b)``,
    ``TensorData(xs, ys=ys)`` calls ``model(xs_b, ys=ys_b)``; every tensor is indexed along its first dim."""

    def __init__(self, *tensors: torch.Tensor, **named: torch.Tensor) -> None:
        every = (*tensors, *named.values())
        if not every or any(not isinstance(t, torch.Tensor) or t.dim() == 0 for t in every):
            raise PyrovaeError("TensorData needs one or more tensors, each with a first dim of datapoints")
        if any(len(t) != len(every[0]) for t in every):
            sizes = ", ".join(str(len(t)) for t in every)
            raise PyrovaeError(f"TensorData needs tensors of equal length along their first dim, got {sizes}")
        self.tensors, self.named = tensors, named

    def __len__(self) -> int:
        return len(self.tensors[0]) if self.tensors else len(next(iter(self.named.values())))

    @property
    def device(self) -> torch.device:
        return (self.tensors[0] if self.tensors else next(iter(self.named.values()))).device

    def batch(self, idx: torch.Tensor) -> Batch:
        out = tuple(t[idx] for t in self.tensors)
        if self.named:
            return Call(out, {key: t[idx] for key, t in self.named.items()})
        return out[0] if len(out) == 1 else out


class NoData:
    """The "dataset" of a program whose data is closed over (``model()``, ``guide()``): one step per epoch,
    called with no arguments, nothing scaled."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)

    def __len__(self) -> int:
        return 1

    def batch(self, idx: torch.Tensor) -> Batch:
        return Call((), {})


class ImageData:
    """One split on one device: uint8 pixels stored once, turned into floats batch by batch.

    A training split draws fresh randomness (dynamic binarisation, dequantisation noise) per batch;
    an evaluation split (``fixed_seed`` given) is drawn once so that every evaluation sees the same data.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None,
        pixels: Pixels,
        device: torch.device | str = "cpu",
        fixed_seed: int | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise PyrovaeError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        self.pixels = pixels
        self.device = torch.device(device)
        self.shape = tuple(images.shape[1:])
        self.labels = labels.to(self.device) if labels is not None else None
        stored = pixels.prepare(images.to(self.device))
        self._fixed: torch.Tensor | None = None
        if fixed_seed is not None:
            g = torch.Generator(device=self.device).manual_seed(fixed_seed)
            self._fixed = pixels(stored, generator=g)
            self._stored = None
        else:
            self._stored = stored

    def __len__(self) -> int:
        return len(self._fixed if self._fixed is not None else self._stored)

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        if self._fixed is not None:
            return self._fixed[idx]
        return self.pixels(self._stored[idx])

    def all(self) -> torch.Tensor:
        """The whole split as floats (a fresh draw for a training split)."""
        return self.batch(torch.arange(len(self), device=self.device))

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """The split in order, in batches (for evaluation)."""
        for start in range(0, len(self), batch_size):
            yield self.batch(torch.arange(start, min(start + batch_size, len(self)), device=self.device))


@dataclass
class Splits:
    """Train / validation / test splits of one dataset, on one device, with one pixel handling."""

    train: ImageData
    val: ImageData
    test: ImageData
    pixels: Pixels
    name: str
    source: str
    train_pixel_mean: torch.Tensor  # per-pixel mean intensity of the training images in [0, 1]


def default_val_size(n_train: int) -> int:
    """The validation images held out by default: 10% of the training images, at most 5000."""
    return min(MAX_DEFAULT_VAL, n_train // 10)


def make_splits(
    data: RawDataset,
    pixels: Pixels,
    device: torch.device | str = "cpu",
    val_size: int | None = None,
    train_size: int | None = None,
    seed: int = 0,
) -> Splits:
    """Hold out a seeded validation split from the training set (``val_size`` images, default
    :func:`default_val_size`); ``train_size`` keeps the first N images."""
    x, y = data.train_x, data.train_y
    if train_size is not None:
        if train_size < 2:
            raise PyrovaeError(f"--train-size must be at least 2, got {train_size}")
        x, y = x[:train_size], y[:train_size]
    n = len(x)
    if val_size is None:
        val_size = default_val_size(n)
    if not 0 <= val_size < n:
        raise PyrovaeError(f"--val-size must be between 0 and {n - 1} for {n} training images, got {val_size}")
    if train_size is not None and train_size > n:
        warnings.warn(
            PyrovaeWarning(
                f"--train-size {train_size} is more than {data.name} holds: using all {n} images, "
                f"{n - val_size} to train on and {val_size} held out for validation"
            ),
            stacklevel=2,
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:val_size].sort().values, perm[val_size:].sort().values
    if val_size == 0:
        val_idx = train_idx[: min(1000, len(train_idx))]  # no held-out split asked for: monitor on training images
    train_x = x[train_idx]
    return Splits(
        train=ImageData(train_x, y[train_idx], pixels, device),
        val=ImageData(x[val_idx], y[val_idx], pixels, device, fixed_seed=seed + 1),
        test=ImageData(data.test_x, data.test_y, pixels, device, fixed_seed=seed + 2),
        pixels=pixels,
        name=data.name,
        source=data.source,
        train_pixel_mean=train_x.float().mean(0).div(255.0).to(device),
    )
