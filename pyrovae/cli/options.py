"""Shared pieces of the command line: argparse types with one-line messages, and the option groups
(data, model, training, run, evaluation) that every command builds its parser from."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from ..data import BINARIZE, DATASETS
from ..distributed import DEFAULT_TIMEOUT, env_rank, launched
from ..infer import ESTIMATORS
from ..infer.ais import DEFAULT_CHAINS, DEFAULT_LEAPFROG, DEFAULT_STEPS
from ..nn.likelihoods import LIKELIHOODS
from ..nn.nets import ACTIVATIONS, PRESETS
from ..runs import MAX_SEED
from ..tasks.evaluate import SPLITS
from ..train import LR_SCHEDULES

Group = argparse._ArgumentGroup | argparse.ArgumentParser


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        if not (launched() and env_rank() != 0):  # under torchrun: once, from rank 0
            sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


# ------------------------------------------------------------------------------------------------ types
def int_at_least(lowest: int, name: str) -> Callable[[str], int]:
    """An argparse type for integers >= ``lowest``, with a one-line message naming what is accepted."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = lowest - 1
        if value < lowest:
            raise argparse.ArgumentTypeError(f"expected a {name} integer, got {text!r}")
        return value

    parse.__name__ = f"{name.replace('-', '_')}_int"
    return parse


positive_int = int_at_least(1, "positive")
count = int_at_least(0, "non-negative")


def seed(text: str) -> int:
    """A seed numpy accepts: an integer in [0, MAX_SEED]."""
    value = count(text)
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected a seed between 0 and {MAX_SEED}, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def hidden(text: str) -> str:
    """Comma-separated positive layer sizes, kept as text (the run config stores them so)."""
    parts = text.split(",")
    if not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive sizes like 200,200, got {text!r}")
    return text


def sizes(text: str) -> tuple[int, ...]:
    """Layer sizes of a :func:`hidden` option as integers, for library calls."""
    return tuple(int(h) for h in text.split(","))


def rate(text: str) -> float:
    """A missing-pixel rate in (0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a missing rate in (0, 1), got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a missing rate in (0, 1), got {text!r}")
    return value


# ------------------------------------------------------------------------------------------------ groups
DATA_OPTIONS = ("dataset", "data_dir", "root", "download", "binarize", "dequantize", "val_size", "train_size")


def add_data_options(p: argparse.ArgumentParser, only: Sequence[str] = DATA_OPTIONS) -> argparse._ArgumentGroup:
    """The ``data`` group (or the options of it named in ``only``): what a run config's data fields take."""
    g = p.add_argument_group("data")
    options: dict[str, Callable[[], object]] = {
        "dataset": lambda: g.add_argument(
            "--dataset", choices=[*DATASETS, "synthetic"], help="dataset name (default fashion-mnist)"
        ),
        "data_dir": lambda: g.add_argument(
            "--data-dir", help="folder holding the dataset files (the four MNIST-format idx files, gzipped or not)"
        ),
        "root": lambda: g.add_argument(
            "--root", help="torchvision root: looked in after $PYROVAE_DATA, downloaded into with --download"
        ),
        "download": lambda: g.add_argument(
            "--download", action="store_true", default=None, help="download with torchvision if not found"
        ),
        "binarize": lambda: g.add_argument(
            "--binarize",
            choices=BINARIZE,
            help="none: x/255; dynamic: fresh Bernoulli draws per batch; fixed: threshold 0.5 (default dynamic)",
        ),
        "dequantize": lambda: g.add_argument(
            "--dequantize", action="store_true", default=None, help="x = (pixel + U(0,1))/256 (with --binarize none)"
        ),
        "val_size": lambda: g.add_argument(
            "--val-size",
            type=int,
            help="validation images held out of the training set, seeded (default: 10%% of the training images, "
            "at most 5000; 0 monitors on training images)",
        ),
        "train_size": lambda: g.add_argument(
            "--train-size", type=positive_int, help="use only the first N training images"
        ),
    }
    for name in only:
        options[name]()
    return g


def add_model_options(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The ``model`` group: likelihood and network of a run config."""
    g = p.add_argument_group("model")
    g.add_argument("--likelihood", choices=list(LIKELIHOODS), help="decoder likelihood p(x|z) (default bernoulli)")
    g.add_argument(
        "--sigma", type=positive_float, help="standard deviation of the fixed-σ gaussian likelihood (default 0.1)"
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
    g.add_argument("--z-dim", type=positive_int, help="latent dimension (overrides the preset)")
    g.add_argument(
        "--hidden", type=hidden, help="hidden sizes, e.g. 400,200 (MLP) or conv channels (overrides the preset)"
    )
    g.add_argument("--activation", choices=list(ACTIVATIONS), help="hidden activation (overrides the preset)")
    return g


def add_training_options(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The ``objective and optimiser`` group: how a run config's model is trained."""
    g = p.add_argument_group("objective and optimiser")
    g.add_argument(
        "--elbo",
        choices=list(ESTIMATORS),
        help="estimator: trace (MC KL), meanfield (analytic KL), iwae, renyi, tracegraph (default meanfield)",
    )
    g.add_argument(
        "--particles", type=positive_int, help="K samples per datapoint, vectorised (default 1; 5 for iwae/renyi)"
    )
    g.add_argument("--alpha", type=float, help="α of the renyi bound (0 = iwae)")
    g.add_argument(
        "--epochs", type=positive_int, help="epochs in total (default 10; with --resume, may extend the run)"
    )
    g.add_argument("--batch-size", type=positive_int, help="minibatch size (default 100)")
    g.add_argument("--lr", type=positive_float, help="Adam learning rate (default 1e-3)")
    g.add_argument("--clip-norm", type=positive_float, help="clip the gradient's global norm to this")
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, help="per-epoch learning-rate schedule (default none)")
    g.add_argument("--lr-gamma", type=positive_float, help="decay per epoch of the exponential schedule (default 0.95)")
    g.add_argument(
        "--warmup-epochs",
        type=non_negative_float,
        help="KL warm-up: β rises linearly to 1 over this many epochs (default 0)",
    )
    return g


def add_device_option(g: Group, default: str | None = "auto") -> None:
    """``--device``: where to run (a run config's device when ``default`` is None)."""
    g.add_argument("--device", default=default, help="auto, cpu or cuda (default auto)")


def add_run_options(p: argparse.ArgumentParser, out: str, *, nproc: bool = False) -> argparse._ArgumentGroup:
    """The ``run`` group of a training command: device, precision, seed, run folder and its resume/overwrite."""
    g = p.add_argument_group("run")
    add_device_option(g, default=None)
    g.add_argument(
        "--autocast", choices=["bf16", "fp16"], help="run the networks in mixed precision (likelihoods stay float32)"
    )
    g.add_argument("--seed", type=seed, help="seed for initialisation, batching and sampling (default 0)")
    if nproc:
        g.add_argument(
            "--nproc",
            type=int,
            help="train data-parallel in N processes on this node (one per GPU, or gloo on CPU); "
            "--batch-size is per process",
        )
        g.add_argument(
            "--peer-timeout",
            type=positive_float,
            default=DEFAULT_TIMEOUT,
            metavar="SECONDS",
            help="with --nproc or under torchrun: a process that waits longer than this for another (one that died "
            f"or hangs) stops the run, its last checkpoint kept (default {DEFAULT_TIMEOUT:g})",
        )
    g.add_argument("--out", default=out, help=f"run folder (default {out})")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    g.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    return g


def add_evaluation_options(
    p: Group,
    *,
    k: int,
    k_help: str,
    n: int | None,
    n_help: str,
    memory_mb: float | None = 1024.0,
    memory_help: str = "memory bound per call (default 1024)",
    split: bool = True,
    batch_size_help: str | None = None,
) -> None:
    """The importance-sampling options of a command that evaluates: K, split, images, batch and memory bound."""
    p.add_argument("--k", type=positive_int, default=k, help=k_help)
    if split:
        p.add_argument("--split", choices=SPLITS, default="test", help="which split (default test)")
    p.add_argument("--n", type=positive_int, default=n, help=n_help)
    if batch_size_help is not None:
        p.add_argument("--batch-size", type=positive_int, help=batch_size_help)
    p.add_argument("--memory-mb", type=positive_float, default=memory_mb, help=memory_help)


def add_annealing_options(p: Group, methods: Sequence[str] = ("is", "ais", "bdmc")) -> None:
    """The estimator of log p(x) and the AIS schedule: --method, --steps, --chains, --leapfrog."""
    what = {"is": "importance sampling", "ais": "and AIS", "bdmc": "and the BDMC sandwich on simulated images"}
    p.add_argument(
        "--method",
        choices=list(methods),
        default="is",
        help="log p(x) by " + ", ".join(f"{m}: {what[m]}" for m in methods) + " (default is)",
    )
    p.add_argument(
        "--steps", type=positive_int, default=DEFAULT_STEPS, help=f"AIS annealing steps (default {DEFAULT_STEPS})"
    )
    p.add_argument(
        "--chains", type=positive_int, default=DEFAULT_CHAINS, help=f"AIS chains per image (default {DEFAULT_CHAINS})"
    )
    p.add_argument(
        "--leapfrog",
        type=positive_int,
        default=DEFAULT_LEAPFROG,
        help=f"leapfrog steps per HMC transition (default {DEFAULT_LEAPFROG})",
    )


def run_dir_argument(p: Group, made_by: str) -> None:
    """The positional RUN_DIR of a command that reads a trained run."""
    p.add_argument("run_dir", metavar="RUN_DIR", help=f"run folder made by '{made_by}'")
