"""``python -m pyrovae``: the CLI, with a Ctrl-C or SIGTERM during start-up (torch's import) ending in one line."""

import os
import signal
import sys


def run() -> int:
    """Import the CLI and run it; an interrupt before the CLI takes over is one line and exit 130.

    The interrupt is recorded as well as raised, since a library's bare ``except:`` during its import can
    swallow the ``KeyboardInterrupt``. The exit skips interpreter shutdown: an import cut short can leave
    torch half-initialised, and its exit handlers then hang. Nothing has been written yet at that point.
    """
    received: list[int] = []

    def interrupt(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, interrupt)
    try:
        from .cli import main

        if received:
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        sys.stderr.write("pyrovae: interrupted\n")
        sys.stderr.flush()
        os._exit(130)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # the CLI's own handling takes over from here
    code = main()
    _end_on_signal(code)
    return code


def _end_on_signal(code: int | None) -> None:
    """After the command is done (files written, its last line printed), a Ctrl-C or SIGTERM during interpreter
    shutdown ends the process at once with the command's exit code, instead of a traceback from an exit handler."""

    def stop(signum, frame):
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed or broken stream: nothing left to say
                pass
        os._exit(int(code or 0))

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, stop)


if __name__ == "__main__":
    sys.exit(run())
