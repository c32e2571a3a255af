"""The ``pyrovae`` command line: ``train`` here; other subcommands come from their modules' ``register_cli``."""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

from . import __version__, distributed
from .config import OPTIONS, RunConfig, flat_options, parse_hidden, with_options
from .data import BINARIZE, DATASETS
from .errors import NonFiniteLoss, PyrovaeError, PyrovaeWarning
from .files import RunLock, remove_files
from .hostmem import keep_freed_memory
from .infer import ESTIMATORS, check_alpha
from .likelihoods import LIKELIHOODS
from .nets import ACTIVATIONS, PRESETS
from .runs import MAX_SEED, read_config, resolve_device, train_vae
from .train import LR_SCHEDULES


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def _int_at_least(lowest: int, name: str):
    """An argparse type for integers >= ``lowest``, with a one-line message naming what is accepted."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = lowest - 1
        if value < lowest:
            raise argparse.ArgumentTypeError(f"expected a {name} integer, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1, "positive")
_count = _int_at_least(0, "non-negative")


def _seed(text: str) -> int:
    value = _count(text)
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected a seed between 0 and {MAX_SEED}, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _hidden(text: str) -> str:
    parts = text.split(",")
    if not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive sizes like 200,200, got {text!r}")
    return text


def add_data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=[*DATASETS, "synthetic"], help="dataset name (default fashion-mnist)")
    g.add_argument(
        "--data-dir", help="folder holding the dataset files (the four MNIST-format idx files, gzipped or not)"
    )
    g.add_argument("--root", help="torchvision root: looked in after $PYROVAE_DATA, downloaded into with --download")
    g.add_argument("--download", action="store_true", default=None, help="download with torchvision if not found")
    g.add_argument(
        "--binarize",
        choices=BINARIZE,
        help="none: x/255; dynamic: fresh Bernoulli draws per batch; fixed: threshold 0.5 (default dynamic)",
    )
    g.add_argument(
        "--dequantize", action="store_true", default=None, help="x = (pixel + U(0,1))/256 (with --binarize none)"
    )
    g.add_argument(
        "--val-size",
        type=int,
        help="validation images held out of the training set, seeded (default: 10%% of the training images, "
        "at most 5000; 0 monitors on training images)",
    )
    g.add_argument("--train-size", type=_positive_int, help="use only the first N training images")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pyrovae", description="Variational autoencoders as Pyro programs.")
    parser.add_argument("--version", action="version", version=f"pyrovae {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser(
        "train", help="train a VAE", description="Train a VAE; writes OUT/metrics.csv, config.json, checkpoint.pt."
    )
    add_data_options(t)
    g = t.add_argument_group("model")
    g.add_argument("--likelihood", choices=list(LIKELIHOODS), help="decoder likelihood p(x|z) (default bernoulli)")
    g.add_argument(
        "--sigma", type=_positive_float, help="standard deviation of the fixed-σ gaussian likelihood (default 0.1)"
    )
    g.add_argument(
        "--allow-nonbinary",
        action="store_true",
        default=None,
        help="let bernoulli see non-binary pixels (cross-entropy)",
    )
    g.add_argument(
        "--arch",
        choices=list(PRESETS),
        help="network preset: iwae (200-200 tanh, z=50), pyro-example (400 softplus, z=50), conv (default iwae)",
    )
    g.add_argument("--z-dim", type=_positive_int, help="latent dimension (overrides the preset)")
    g.add_argument(
        "--hidden", type=_hidden, help="hidden sizes, e.g. 400,200 (MLP) or conv channels (overrides the preset)"
    )
    g.add_argument("--activation", choices=list(ACTIVATIONS), help="hidden activation (overrides the preset)")
    g = t.add_argument_group("objective and optimiser")
    g.add_argument(
        "--elbo",
        choices=list(ESTIMATORS),
        help="estimator: trace (MC KL), meanfield (analytic KL), iwae, renyi, tracegraph (default meanfield)",
    )
    g.add_argument(
        "--particles", type=_positive_int, help="K samples per datapoint, vectorised (default 1; 5 for iwae/renyi)"
    )
    g.add_argument("--alpha", type=float, help="α of the renyi bound (0 = iwae)")
    g.add_argument(
        "--epochs", type=_positive_int, help="epochs in total (default 10; with --resume, may extend the run)"
    )
    g.add_argument("--batch-size", type=_positive_int, help="minibatch size (default 100)")
    g.add_argument("--lr", type=_positive_float, help="Adam learning rate (default 1e-3)")
    g.add_argument("--clip-norm", type=_positive_float, help="clip the gradient's global norm to this")
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, help="per-epoch learning-rate schedule (default none)")
    g.add_argument(
        "--lr-gamma", type=_positive_float, help="decay per epoch of the exponential schedule (default 0.95)"
    )
    g.add_argument(
        "--warmup-epochs",
        type=_non_negative_float,
        help="KL warm-up: β rises linearly to 1 over this many epochs (default 0)",
    )
    g = t.add_argument_group("run")
    g.add_argument("--device", help="auto, cpu or cuda (default auto)")
    g.add_argument(
        "--autocast", choices=["bf16", "fp16"], help="run the networks in mixed precision (likelihoods stay float32)"
    )
    g.add_argument("--seed", type=_seed, help="seed for initialisation, batching and sampling (default 0)")
    g.add_argument(
        "--nproc",
        type=int,
        help="train data-parallel in N processes on this node via torchrun (one per GPU, or gloo on CPU); "
        "--batch-size is per process",
    )
    g.add_argument("--out", default="runs/latest", help="run folder (default runs/latest)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    g.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    g.add_argument(
        "--tensorboard",
        metavar="DIR",
        help="also write TensorBoard event files into DIR: per-epoch ELBOs, sample and reconstruction grids "
        "(needs: pip install 'pyrovae[tensorboard]')",
    )
    g.add_argument(
        "--eval-k", type=_positive_int, help="after training, run 'pyrovae evaluate' with K importance samples"
    )
    t.set_defaults(func=cmd_train)
    for module in SUBCOMMAND_MODULES:
        importlib.import_module(f".{module}", __package__).register_cli(sub)
    return parser


SUBCOMMAND_MODULES = (
    "evaluate",
    "comparison",
    "missing",
    "gap",
    "sampling",
    "semisupervised",
)  # modules whose register_cli(sub) adds their subcommand


def train_config(args: argparse.Namespace) -> RunConfig:
    """The run's config: saved settings on --resume, then the options given, then the defaults."""
    given = {k: parse_hidden(v) if k == "hidden" else v for k, v in vars(args).items() if k in OPTIONS}
    given = {k: v for k, v in given.items() if v is not None}
    base = read_config(args.out) if args.resume else RunConfig()
    if args.resume:
        saved = flat_options(base) if base.kind in ("vae", "masked") else {}
        changed = {k for k, v in given.items() if k not in ("epochs", "device") and v != saved.get(k)}
        if changed:
            raise PyrovaeError(
                f"--resume continues the saved run; these options differ from it: {', '.join(sorted(changed))}"
            )
    return with_options(base, given)


def _without_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` less ``--nproc N`` (or ``--nproc=N``, or an abbreviation): torchrun's own parser refuses it."""
    out, skip = [], False
    for arg in argv:
        name = arg.split("=", 1)[0]
        if skip or len(name) > 3 and "--nproc".startswith(name):
            skip = not skip and "=" not in arg
            continue
        out.append(arg)
    return out


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


def check_run_folder(args: argparse.Namespace) -> Path:
    """``--out`` of a training command: a writable folder; refuse to write over a run unless told to
    resume or overwrite it."""
    if not args.out.strip():
        raise PyrovaeError(f"--out must name a run folder, got {args.out!r}")
    out = Path(args.out)
    if args.resume and args.overwrite:
        raise PyrovaeError("--resume and --overwrite exclude each other")
    check_writable_folder(out)
    if not args.resume and (out / "checkpoint.pt").exists() and not args.overwrite:
        raise PyrovaeError(f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it")
    return out


def remove_derived(out: Path) -> None:
    """Remove results of a replaced run (evaluations, figures) so that none describes the new one."""
    remove_files(out, DERIVED_FILES)


def _checked_config(args: argparse.Namespace) -> RunConfig:
    out = check_run_folder(args)
    cfg = train_config(args)
    if args.resume and cfg.kind == "masked":
        raise PyrovaeError(
            f"{out} was trained by 'pyrovae train-masked'; continue it with 'pyrovae train-masked --resume'"
        )
    check_alpha(cfg.training.elbo, cfg.training.alpha)
    return cfg


def cmd_train(args: argparse.Namespace) -> int:
    out = Path(args.out)
    cfg = _checked_config(args)  # refuse bad options before locking, loading or launching anything
    if args.nproc is not None and not distributed.launched():
        distributed.check_nproc(args.nproc, resolve_device(cfg.training.device))
        if args.nproc > 1:  # start the processes; each runs this command (less --nproc) under torchrun
            return distributed.launch(args.nproc, _without_nproc(args.argv))
    first = distributed.env_rank() == 0  # under torchrun only global rank 0 touches the run folder and prints
    with RunLock(out) if first else nullcontext():
        cfg = _checked_config(args)  # again, now that no other command can change the folder
        replaced = (lambda: remove_derived(out)) if args.overwrite and first else None
        try:
            # under torchrun: join the process group, pick the GPU
            distributed.setup(resolve_device(cfg.training.device))
            # the old run (with --overwrite) is replaced only once the new one has written its first checkpoint
            _, _, result = train_vae(
                cfg,
                out,
                resume=args.resume,
                quiet=args.quiet,
                on_first_checkpoint=replaced,
                tensorboard=args.tensorboard if first else None,
            )
        finally:
            distributed.teardown()
    if not first:
        return 130 if result.interrupted else 0
    if result.interrupted and result.checkpoint is None:
        print(f"interrupted before the first step: nothing saved in {out}", file=sys.stderr)
        return 130
    if result.interrupted:
        print(
            f"interrupted: checkpoint saved in {out}; continue with: pyrovae train --out {out} --resume",
            file=sys.stderr,
        )
        return 130
    last = result.history[-1]
    print(f"done: {result.epochs_done} epochs, val ELBO {last['val_elbo']:.2f} nats/image; run folder {out}")
    if getattr(args, "eval_k", None):
        from .evaluate import evaluate_run

        s = evaluate_run(out, k=args.eval_k, device=cfg.training.device, quiet=args.quiet)
        print(f"test log p(x) {s['log_likelihood']:.2f} nats/image (K={args.eval_k}); see {out / 'eval.md'}")
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _note(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line on stderr: ``pyrovae: note:`` for pyrovae's own, ``warning:`` for others."""
    kind = "note" if issubclass(category, PyrovaeWarning) else "warning"
    sys.stderr.write(f"pyrovae: {kind}: {str(message).splitlines()[0] if str(message) else category.__name__}\n")


def main(argv: Sequence[str] | None = None) -> int:
    logging.getLogger("pyro").setLevel(logging.WARNING)  # Pyro logs its max_plate_nesting guesses at INFO
    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers can only be set there
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None  # a scheduler's stop = Ctrl-C
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for --nproc, which runs this command again
    keep_freed_memory()  # a process-wide malloc setting: the command line's to make, not the library's
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _note
            return args.func(args)
    except PyrovaeError as exc:
        sys.stderr.write(f"pyrovae {args.command}: error: {exc}\n")
        return 1 if isinstance(exc, NonFiniteLoss) else 2
    except OSError as exc:  # a file that cannot be read or written: say which, and why, on one line
        reason = "No space left on device" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
        where = f"{exc.filename}: " if exc.filename else ""
        sys.stderr.write(f"pyrovae {args.command}: error: {where}{reason}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("pyrovae: interrupted\n")
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
