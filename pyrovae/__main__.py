"""``python -m pyrovae``: the CLI, with a Ctrl-C or SIGTERM during start-up (torch's import) ending in one line."""

import signal
import sys


def run() -> int:
    """Import the CLI and run it; an interrupt before the CLI takes over is one line and exit 130."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        from .cli import main

        return main()
    except KeyboardInterrupt:
        sys.stderr.write("pyrovae: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(run())
