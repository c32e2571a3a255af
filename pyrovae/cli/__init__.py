"""The ``pyrovae`` command line: a thin layer over the library.

``options`` holds the argparse types and the shared option groups (data, model, training, run,
evaluation); each other module here is one command (``train``, ``evaluate``, ``compare``, ``missing``
(``train-masked``, ``complete``), ``gap``, ``samples``, ``semisupervised``, ``zoo``) that declares its parser from
those groups, turns the options into typed values, calls the library and prints a line. The library
never imports this package; process-wide settings (malloc, signals, warnings) are made only in :func:`main`.
"""

from __future__ import annotations

import argparse
import errno
import logging
import signal
import sys
import threading
import warnings
from collections.abc import Sequence

from .. import __version__, distributed
from ..errors import NonFiniteLoss, PeerLost, PyrovaeError, PyrovaeWarning
from ..hostmem import keep_freed_memory
from . import compare, evaluate, gap, missing, samples, semisupervised, train, zoo
from .options import Parser

COMMANDS = (train, evaluate, compare, missing, gap, samples, semisupervised, zoo)  # each module's register(sub)


def build_parser() -> argparse.ArgumentParser:
    """The ``pyrovae`` parser with every subcommand."""
    parser = Parser(prog="pyrovae", description="Variational autoencoders as Pyro programs.")
    parser.add_argument("--version", action="version", version=f"pyrovae {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in COMMANDS:
        command.register(sub)
    return parser


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _note(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line on stderr: ``pyrovae: note:`` for pyrovae's own, ``warning:`` for others."""
    kind = "note" if issubclass(category, PyrovaeWarning) else "warning"
    sys.stderr.write(f"pyrovae: {kind}: {str(message).splitlines()[0] if str(message) else category.__name__}\n")


def _who(args) -> str:
    """The prefix of an error line: the command, once it is parsed."""
    return f"pyrovae {args.command}" if args is not None else "pyrovae"


def _tell(message: str, line: str, code: int, lost: bool = False) -> int:
    """Print a command's last line and return its exit code. A data-parallel worker leaves it to pyrovae's
    launcher (which tells each distinct line once); under torchrun, rank 0 prints, and another rank only a
    failure of its own (a lost peer), not the errors and interrupts every rank meets alike."""
    if distributed.launched():
        if distributed.report(message, line, code, lost):
            return code
        if distributed.env_rank() != 0 and not lost:
            return code
    sys.stderr.write(line + "\n")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``pyrovae`` command; a library error is one line on stderr and a non-zero exit code."""
    logging.getLogger("pyro").setLevel(logging.WARNING)  # Pyro logs its max_plate_nesting guesses at INFO
    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers can only be set there
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None  # a scheduler's stop = Ctrl-C
    args = None
    try:  # parsing too: an interrupt while the parser is built is one line like any other
        args = build_parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # for --nproc, which runs this command again
        keep_freed_memory()  # a process-wide malloc setting: the command line's to make, not the library's
        with warnings.catch_warnings():
            warnings.showwarning = _note
            return args.func(args)
    except PyrovaeError as exc:
        lost = isinstance(exc, PeerLost)
        return _tell(str(exc), f"{_who(args)}: error: {exc}", 1 if lost or isinstance(exc, NonFiniteLoss) else 2, lost)
    except OSError as exc:  # a file that cannot be read or written: say which, and why, on one line
        reason = "No space left on device" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
        where = f"{exc.filename}: " if exc.filename else ""
        return _tell(f"{where}{reason}", f"{_who(args)}: error: {where}{reason}", 2)
    except KeyboardInterrupt:
        return _tell("interrupted", "pyrovae: interrupted", 130)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
