"""The ``pyrovae`` command line: ``train`` here; other subcommands come from their modules' ``register_cli``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__, distributed
from .data import BINARIZE, DATASETS
from .errors import NonFiniteLoss, PyrovaeError
from .infer import ESTIMATORS
from .likelihoods import LIKELIHOODS
from .nets import ACTIVATIONS, PRESETS
from .runs import DEFAULTS, read_config, resolve_device, train_vae
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
        "--warmup-epochs", type=float, help="KL warm-up: β rises linearly to 1 over this many epochs (default 0)"
    )
    g = t.add_argument_group("run")
    g.add_argument("--device", help="auto, cpu or cuda (default auto)")
    g.add_argument(
        "--autocast", choices=["bf16", "fp16"], help="run the networks in mixed precision (likelihoods stay float32)"
    )
    g.add_argument("--seed", type=int, help="seed for initialisation, batching and sampling (default 0)")
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
        "--eval-k", type=_positive_int, help="after training, run 'pyrovae evaluate' with K importance samples"
    )
    t.set_defaults(func=cmd_train)
    for module in SUBCOMMAND_MODULES:
        importlib.import_module(f".{module}", __package__).register_cli(sub)
    return parser


SUBCOMMAND_MODULES = (
    "evaluate",
    "compare",
    "missing",
    "gap",
    "sampling",
    "semisupervised",
)  # modules whose register_cli(sub) adds their subcommand


def train_config(args: argparse.Namespace) -> dict[str, Any]:
    """The run's config: saved settings on --resume, then the options given, then the defaults."""
    given = {k: v for k, v in vars(args).items() if k in DEFAULTS and v is not None}
    base = read_config(args.out) if args.resume else dict(DEFAULTS)
    if args.resume:
        changed = {k for k, v in given.items() if k not in ("epochs", "device") and v != base.get(k)}
        if changed:
            raise PyrovaeError(
                f"--resume continues the saved run; these options differ from it: {', '.join(sorted(changed))}"
            )
    return {**base, **given}


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


def check_run_folder(args: argparse.Namespace) -> Path:
    """``--out`` of a training command: refuse to write over a run unless told to resume or overwrite it."""
    out = Path(args.out)
    if args.resume and args.overwrite:
        raise PyrovaeError("--resume and --overwrite exclude each other")
    if not args.resume and (out / "checkpoint.pt").exists() and not args.overwrite:
        raise PyrovaeError(f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it")
    return out


def cmd_train(args: argparse.Namespace) -> int:
    out = check_run_folder(args)
    cfg = train_config(args)
    if args.resume and cfg.get("masked"):
        raise PyrovaeError(
            f"{out} was trained by 'pyrovae train-masked'; continue it with 'pyrovae train-masked --resume'"
        )
    if cfg["elbo"] == "renyi" and cfg["alpha"] is None:
        raise PyrovaeError("--elbo renyi needs --alpha (e.g. 0.5)")
    if args.nproc is not None and not distributed.launched():
        distributed.check_nproc(args.nproc, resolve_device(cfg["device"]))
        if args.nproc > 1:  # start the processes; each runs this command (less --nproc) under torchrun
            return distributed.launch(args.nproc, _without_nproc(args.argv))
    first = distributed.env_rank() == 0  # under torchrun only global rank 0 touches the run folder and prints
    try:
        distributed.setup(resolve_device(cfg["device"]))  # under torchrun: join the process group, pick the GPU
        if args.overwrite and out.exists() and first:
            for name in ("checkpoint.pt", "metrics.csv", "config.json"):
                (out / name).unlink(missing_ok=True)
        _, _, result = train_vae(cfg, out, resume=args.resume, quiet=args.quiet)
    finally:
        distributed.teardown()
    if not first:
        return 130 if result.interrupted else 0
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

        s = evaluate_run(out, k=args.eval_k, device=cfg["device"], quiet=args.quiet)
        print(f"test log p(x) {s['log_likelihood']:.2f} nats/image (K={args.eval_k}); see {out / 'eval.md'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.getLogger("pyro").setLevel(logging.WARNING)  # Pyro logs its max_plate_nesting guesses at INFO
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for --nproc, which runs this command again
    try:
        return args.func(args)
    except PyrovaeError as exc:
        sys.stderr.write(f"pyrovae {args.command}: error: {exc}\n")
        return 1 if isinstance(exc, NonFiniteLoss) else 2
    except KeyboardInterrupt:
        sys.stderr.write("pyrovae: interrupted\n")
        return 130
