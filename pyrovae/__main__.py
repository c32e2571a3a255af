"""``python -m pyrovae``: the CLI, with a Ctrl-C or SIGTERM during start-up (torch's import) ending in one line."""

import os
import signal
import sys

INTERRUPTED = 130  # the exit code of a command stopped by Ctrl-C or SIGTERM (128 + SIGINT, as shells report it)


def run() -> int:
    """Import the CLI and run it; an interrupt before the CLI takes over is one line and exit 130.

    During start-up the signal handler itself ends the process (``os._exit``): nothing has been written yet,
    and an exception raised inside torch's import can cross its C++ frames and abort the process (SIGABRT),
    be swallowed by a library's bare ``except:``, or leave torch half-initialised with exit handlers that hang.
    """

    def stop_now(signum, frame):
        if os.environ.get("RANK", "0") == "0":  # a data-parallel run's workers all get it: rank 0 says it
            sys.stderr.write("pyrovae: interrupted\n")
        _exit_now(INTERRUPTED)

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, stop_now)
    _stop_with_launcher()
    from .cli import main
    from .distributed import launched

    # the CLI's own handling takes over from here: Ctrl-C raises KeyboardInterrupt, and main() makes SIGTERM do so
    signal.signal(signal.SIGINT, signal.default_int_handler)
    code = main()
    if code == INTERRUPTED or launched():
        # Interrupted: the command caught it and said so; end here, since an interrupt that passed through C code
        # (an import run by PyRun_*) leaves Python's "unhandled KeyboardInterrupt" mark, which at a normal exit
        # turns exit 130 into death by SIGINT. A torchrun worker: its files are written and its process group
        # left; gloo's store threads can abort a normal interpreter shutdown ("terminate called without an
        # active exception"), which torchrun would report as a failed worker.
        _exit_now(code)
    _end_on_signal(code)
    return code


def _stop_with_launcher() -> None:
    """A worker of ``pyrovae train --nproc`` gets SIGTERM (a stop that keeps its checkpoint) when its launcher
    dies, even by ``kill -9``: it runs in a session of its own, where no Ctrl-C of the terminal reaches it (Linux)."""
    launcher = os.environ.get("PYROVAE_LAUNCHER", "")  # distributed.LAUNCHER_ENV, not imported before torch
    if not launcher.isdigit() or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(launcher):  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _exit_now(code: int) -> None:
    """Flush what was printed and end the process at once, skipping interpreter shutdown."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed or broken stream: nothing left to say
            pass
    os._exit(code)


def _end_on_signal(code: int | None) -> None:
    """After the command is done (files written, its last line printed), a Ctrl-C or SIGTERM during interpreter
    shutdown ends the process at once with the command's exit code, instead of a traceback from an exit handler."""

    def stop(signum, frame):
        _exit_now(int(code or 0))

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, stop)


if __name__ == "__main__":
    sys.exit(run())
