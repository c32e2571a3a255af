"""Safe file handling: one atomic writer, checkpoint and pickle loading that never runs code, run-folder locks.

Every file pyrovae writes goes through :func:`atomic_write` (or :func:`atomic_path` for writers that need a
path): a fresh temporary name in the target folder (``O_EXCL``, so a planted symlink cannot redirect it),
the umask's permissions, then one rename. Temporary names carry the writer's pid, so that the leftovers
of a killed writer can be recognised and removed (:func:`remove_stale_temp_files`).
"""

from __future__ import annotations

import codecs
import errno
import io
import json
import os
import pickle
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .errors import PyrovaeError

LOCK_NAME = ".lock"
TRAINING_FILES = ("checkpoint.pt", "metrics.csv", "config.json")  # what fit writes into a run folder
TEMP_SUFFIX = ".tmp"
_TEMP_NAME = re.compile(r"\..+\.(\d+)\.[A-Za-z0-9_]+\.tmp")  # .NAME.PID.RANDOM.tmp, as _fresh_temp makes them
# numpy's own reconstructor, whatever module it lives in (numpy.core in 1.x, numpy._core in 2.x)
_NP_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(0))[0]
NUMPY_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}
# bytes pickled by Python 3 at protocol 2 (a CIFAR batch re-saved) are rebuilt by _codecs.encode: text -> bytes
PLAIN_PICKLE_GLOBALS = {**NUMPY_PICKLE_GLOBALS, ("_codecs", "encode"): codecs.encode}


# ------------------------------------------------------------------------------------------- writing
def _umask() -> int:
    """The process's umask (read by setting and restoring it: there is no other portable way)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_failed(path: Path, exc: BaseException) -> PyrovaeError | None:
    """A one-line error for a failed write, or None when ``exc`` is not a write failure."""
    text = str(exc)
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC or "unexpected pos" in text:
        return PyrovaeError(f"cannot write {path}: No space left on device; the previous {path.name} is kept")
    if isinstance(exc, OSError):
        return PyrovaeError(f"cannot write {path}: {exc.strerror or text}")
    return None


@contextmanager
def _fresh_temp(path: Path) -> Iterator[tuple[int, Path]]:
    """A new file (``O_EXCL``, the umask's permissions) beside ``path``, renamed onto it if the block succeeds."""
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=TEMP_SUFFIX)
    except OSError as exc:
        raise _write_failed(path, exc) from None
    tmp = Path(name)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600: give the file the umask's permissions
        yield fd, tmp
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        error = _write_failed(path, exc)
        if error is not None:
            raise error from None
        raise


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A fresh temporary path beside ``path``, for writers that need a name (netCDF); renamed onto ``path``
    only when the block succeeds."""
    with _fresh_temp(Path(path)) as (fd, tmp):
        os.close(fd)
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())


def atomic_write(path: str | Path, write: Callable[[io.BufferedWriter], Any] | bytes) -> None:
    """Write a file atomically: ``write(f)`` on a fresh temporary file (or these bytes), then rename into place."""
    with _fresh_temp(Path(path)) as (fd, _), os.fdopen(fd, "wb") as f:  # the very file mkstemp made
        if isinstance(write, bytes | bytearray | memoryview):
            f.write(write)
        else:
            write(f)
        f.flush()
        os.fsync(f.fileno())


def write_json(path: str | Path, obj: Any) -> None:
    """``obj`` as indented JSON, atomically."""
    atomic_write(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def write_text(path: str | Path, text: str) -> None:
    """A text file, atomically."""
    atomic_write(path, text.encode())


def save_figure(fig: Any, path: str | Path, **kwargs: Any) -> Path:
    """Save a matplotlib Figure as PNG through the atomic writer (never following a planted symlink)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", **kwargs)
    atomic_write(path, buf.getvalue())
    return Path(path)


def remove_files(folder: str | Path, names: Sequence[str] = TRAINING_FILES) -> None:
    """Remove the files ``names`` (by default a trained run's) from ``folder``, those that are there."""
    for name in names:
        (Path(folder) / name).unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Remove temporary files of writers that died (kill -9) in ``folder``; returns those removed."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.glob(f".*{TEMP_SUFFIX}"):
        match = _TEMP_NAME.fullmatch(p.name)
        pid = int(match.group(1)) if match else None
        if pid is None or pid == os.getpid() or _pid_alive(pid) or p.is_symlink() or not p.is_file():
            continue
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


# ------------------------------------------------------------------------------------------- reading
def load_weights(path: str | Path, map_location: Any = None) -> Any:
    """``torch.load`` that only rebuilds tensors, numbers, strings, containers and numpy arrays: never code."""
    import torch

    path = Path(path)
    try:
        # older runs recorded torch.__version__ itself (a str subclass) in their config
        allowed = [*NUMPY_PICKLE_GLOBALS.values(), *_numpy_dtype_classes(), torch.torch_version.TorchVersion]
        with torch.serialization.safe_globals(allowed), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's remarks on a damaged file's pickle protocol: the error says it
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        culprit = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if culprit is None:  # no foreign object named: a damaged file, or not a checkpoint at all
            detail = [
                line.strip() for line in str(exc).split("WeightsUnpickler error:")[-1].splitlines() if line.strip()
            ]
            raise PyrovaeError(
                f"cannot read checkpoint {path}: damaged, or not a checkpoint ({(detail or ['unreadable'])[0]})"
            ) from None
        raise PyrovaeError(
            f"refusing to load {path}: it holds objects other than tensors, numbers, strings and containers "
            f"(it names {culprit.group(1)})"
        ) from None
    except OSError as exc:
        raise PyrovaeError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # a damaged file fails in many ways inside torch's reader
        detail = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise PyrovaeError(f"cannot read checkpoint {path}: damaged, or not a checkpoint ({detail})") from None


def _numpy_dtype_classes() -> list[type]:
    """numpy's dtype classes (``numpy.dtypes.UInt32DType`` ...), which pickled numpy arrays name."""
    dtypes = getattr(np, "dtypes", None)
    if dtypes is None:
        return []
    return [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType") and n != "ObjectDType"]


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that builds plain containers, bytes, strings and numpy arrays, and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        found = PLAIN_PICKLE_GLOBALS.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed")
        return found


def load_plain_pickle(path: str | Path) -> Any:
    """Read a pickle (Python 2's bytes kept as bytes) allowing only dicts, lists, bytes, strings and numpy arrays."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise PyrovaeError(f"refusing to read {path}: it is not a plain data pickle ({exc})") from None
    except OSError as exc:
        raise PyrovaeError(f"cannot read {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # truncated or garbled pickles raise many types
        raise PyrovaeError(f"{path} is not a readable pickle: {type(exc).__name__}: {exc}".splitlines()[0]) from None


# ------------------------------------------------------------------------------------------- locking
class RunLock:
    """An exclusive lock on a run folder, so two commands never write one run.

    The lock is ``flock`` on the folder itself (released by the kernel if the holder dies, so a killed
    holder's lock is taken over); ``.lock`` inside holds the holder's pid, to name it to a second command.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._fd: int | None = None
        self.created: list[Path] = []  # folders this lock made (removed again if left empty)

    def __enter__(self) -> RunLock:
        import fcntl

        missing = []
        for parent in [self.folder, *self.folder.parents]:
            if parent.exists():
                break
            missing.append(parent)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.created = missing
            fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise PyrovaeError(f"cannot use {self.folder} as a run folder: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            holder = self._holder()
            raise PyrovaeError(
                f"{self.folder} is in use by another pyrovae command (pid {holder or 'unknown'}); "
                "wait for it to finish or stop it"
            ) from None
        self._fd = fd
        try:
            atomic_write(self.folder / LOCK_NAME, f"{os.getpid()}\n".encode())
        except BaseException:
            self.__exit__()
            raise
        return self

    def _holder(self) -> str:
        try:
            text = (self.folder / LOCK_NAME).read_text().strip()
        except OSError:
            return ""
        return text if text.isdigit() else ""

    def __exit__(self, *exc: Any) -> None:
        if self._fd is None:
            return
        (self.folder / LOCK_NAME).unlink(missing_ok=True)
        for folder in self.created:  # a command that failed before writing anything leaves no empty folders
            try:
                folder.rmdir()
            except OSError:
                break
        os.close(self._fd)
        self._fd = None


# ------------------------------------------------------------------------------------------- run folders
# what commands write beside a run's checkpoint: results of the run they describe, removed when it is replaced
DERIVED_FILES = (
    *(f"{stem}.{ext}" for stem in ("eval", "gap") for ext in ("json", "md", "nc")),
    "posterior.nc",
    "complete.json",
    "complete.md",
    "completions.png",
    "samples.json",
    "samples.md",
    "samples_compare.png",
    *(f"{name}.png" for name in ("samples", "reconstructions", "interpolations", "latents", "training", "khat")),
)


def check_writable_folder(out: Path) -> None:
    """Refuse a run folder that cannot be made or written (before any data is loaded): one line saying why."""
    long = next((p for p in out.parts if len(os.fsencode(p)) > 255), None)
    if long is not None or len(os.fsencode(str(out.absolute()))) > 4000:
        raise PyrovaeError(f"--out {str(out)[:40]}...: file name too long (at most 255 bytes per folder name)")
    if out.exists() and not out.is_dir():
        raise PyrovaeError(f"--out {out} is a file, not a folder")
    existing = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise PyrovaeError(f"--out {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PyrovaeError(f"--out {out}: cannot write in {existing} (permission denied)")


def check_run_folder(out: str, *, resume: bool, overwrite: bool) -> Path:
    """The run folder a training writes into: writable, and not over a run unless told to resume or overwrite it."""
    if not out.strip():
        raise PyrovaeError(f"--out must name a run folder, got {out!r}")
    folder = Path(out)
    if resume and overwrite:
        raise PyrovaeError("--resume and --overwrite exclude each other")
    check_writable_folder(folder)
    if not resume and (folder / "checkpoint.pt").exists() and not overwrite:
        raise PyrovaeError(f"{folder} already holds a run; pass --resume to continue it or --overwrite to replace it")
    return folder


def remove_derived(out: Path) -> None:
    """Remove results of a replaced run (evaluations, figures) so that none describes the new one."""
    remove_files(out, DERIVED_FILES)
