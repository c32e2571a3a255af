"""Host memory: keep freed memory for the next training step instead of faulting it in afresh (glibc).

glibc's malloc gives the free memory at the top of its heap back to the OS once more of it is free than
twice its largest recent block (unless a live block above them pins them). A CPU training step at batch
1000 frees some 30 MB of activations and gradients at its end, and in training processes here every step
faulted ~2000 fresh pages back in: measured (bench/host_memory.py), a hand-written
PyTorch step at batch 1000 took 22-26 ms with glibc's defaults and 19-22 ms with the thresholds below
(batches of 100-256 fault little either way). A process-wide setting, so opt-in: the ``pyrovae`` command
calls :func:`keep_freed_memory` at its start, and a library user may call it before ``fit``; the process
then keeps up to ``trim_mb`` of freed memory (its peak is unchanged).
Set ``PYROVAE_KEEP_FREED_MEMORY=0`` to leave malloc as it is (the command too).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
MMAP_MAX_MB = 32  # glibc's upper limit for M_MMAP_THRESHOLD on 64-bit


@functools.cache
def keep_freed_memory(trim_mb: int = 256) -> bool:
    """Raise glibc's trim threshold to ``trim_mb`` and fix its mmap threshold at 32 MB, once per process.

    True if malloc is glibc's and took both settings; False (and nothing changed) elsewhere or when
    ``PYROVAE_KEEP_FREED_MEMORY=0``.
    """
    ok = False
    if os.environ.get("PYROVAE_KEEP_FREED_MEMORY", "1") != "0" and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
            mallopt = None
        if mallopt is not None:
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_MAX_MB << 20)) and bool(mallopt(M_TRIM_THRESHOLD, trim_mb << 20))
    return ok
