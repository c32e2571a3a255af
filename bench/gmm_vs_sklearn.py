"""Benchmark: the Pyro GMM (``pyrovae.fit``, k-means++ init) against sklearn's EM GaussianMixture on Fashion-MNIST.

Both fit the same dequantised training images, x = (pixel + u)/256 with u ~ U(0, 1) drawn once
with a fixed seed, with the same K, covariance type and reg_covar; both are scored on the
dequantised test set in nats/image and bits/dim, (-log p + D ln 256)/(D ln 2). The markdown table is
printed and appended, with the machine and date, to bench/RESULTS.md.

Full covariance at D=784 is heavy on a small CPU, so by default it runs only for K <= --full-max-k
(10); the table says which rows were skipped. Quick check: ``--train-size 2000 --ks 5 --epochs 2``.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from pyrovae import ImageData, Pixels, fit, load_dataset
from pyrovae.models.gmm import GMM

HERE = Path(__file__).resolve().parent
HEADER = (
    "| K | covariance | method | test log p (nats/image) | bits/dim | init s | fit s "
    "| s to sklearn's test log p (−1 nat) | notes |"
)
RULE = "|---|---|---|---|---|---|---|---|---|"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--data-dir", default="../shared/data/FashionMNIST/raw", help="folder of the Fashion-MNIST idx files"
    )
    p.add_argument("--train-size", type=int, default=None, help="first N training images (default: all 60000)")
    p.add_argument("--test-size", type=int, default=None, help="first N test images (default: all 10000)")
    p.add_argument("--ks", type=int, nargs="+", default=[10, 50], help="numbers of components")
    p.add_argument("--covariances", nargs="+", default=["diag", "full"], choices=["diag", "full"])
    p.add_argument("--full-max-k", type=int, default=10, help="run full covariance only for K up to this")
    p.add_argument("--epochs", type=int, default=20, help="Pyro GMM: epochs of Adam")
    p.add_argument("--batch-size", type=int, default=256, help="Pyro GMM: minibatch size")
    p.add_argument("--lr", type=float, default=0.05, help="Pyro GMM: Adam learning rate (cosine-annealed)")
    p.add_argument("--restarts", type=int, default=3, help="Pyro GMM: k-means++ restarts")
    p.add_argument("--kmeans-iters", type=int, default=50, help="Pyro GMM: Lloyd iterations per restart")
    p.add_argument("--max-iter", type=int, default=100, help="sklearn: EM iterations at most")
    p.add_argument("--reg-covar", type=float, default=1e-6, help="variance floor for both")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="Pyro GMM device")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-sklearn", action="store_true", help="skip the sklearn reference")
    p.add_argument("--results", default=str(HERE / "RESULTS.md"), help="markdown file to append to ('' for none)")
    return p.parse_args(argv)


def bits_per_dim(nats_per_image: float, dim: int) -> float:
    """Bits/dim of the 8-bit images from a density on [0, 1]^D: (-log p + D ln 256) / (D ln 2)."""
    return (-nats_per_image + dim * math.log(256)) / (dim * math.log(2))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dequantised(images: torch.Tensor, seed: int, device: torch.device) -> torch.Tensor:
    """(N, 784) float32 images (pixel + u)/256, u drawn once from a fixed seed."""
    return ImageData(images, None, Pixels(dequantize=True), device, fixed_seed=seed).all().reshape(len(images), -1)


def run_pyro(
    args: argparse.Namespace, k: int, cov: str, train: torch.Tensor, test: torch.Tensor, target: float | None = None
) -> dict:
    """k-means++ initialisation, then ``fit``; test log-likelihood, and the training time (initialisation
    included) after which the test log-likelihood first came within 1 nat/image of ``target``."""
    device = train.device
    t0 = time.perf_counter()
    gmm = GMM(k, train.shape[1], covariance=cov, reg_covar=args.reg_covar).to(device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    gmm.initialize(train, restarts=args.restarts, iters=args.kmeans_iters, generator=gen)
    _sync(device)
    t1 = time.perf_counter()
    reached: list[float] = []
    elapsed = [t1 - t0]

    def track(row: dict) -> None:  # runs after each epoch; its own time is not counted
        elapsed[0] += row["seconds"]
        if target is not None and not reached and float(gmm.log_prob(test).mean()) >= target - 1.0:
            reached.append(elapsed[0])

    result = fit(
        gmm.model,
        gmm.guide,
        train,
        elbo=gmm.elbo(),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_schedule="cosine",
        seed=args.seed,
        quiet=True,
        callback=track,
    )
    _sync(device)
    t2 = time.perf_counter()
    ll = float(gmm.log_prob(test).mean())
    return {
        "ll": ll,
        "init": t1 - t0,
        "fit": t2 - t1,
        "fit_loop": elapsed[0] - (t1 - t0),
        "to_target": reached[0] if reached else None,
        "notes": f"{result.epochs_done} epochs Adam lr {args.lr} bs {args.batch_size}, {device.type}, float32",
    }


def run_sklearn(args: argparse.Namespace, k: int, cov: str, train: np.ndarray, test: np.ndarray) -> dict:
    """sklearn's EM from its own k-means init (n_init=1), float64."""
    gm = GaussianMixture(
        k, covariance_type=cov, reg_covar=args.reg_covar, max_iter=args.max_iter, random_state=args.seed
    )
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gm.fit(train)
    t1 = time.perf_counter()
    # sklearn's fit includes its k-means initialisation
    state = "converged" if gm.converged_ else "not converged"
    return {
        "ll": float(gm.score(test)),
        "init": float("nan"),
        "fit": t1 - t0,
        "to_target": t1 - t0,
        "notes": f"EM {gm.n_iter_} iters ({state}), cpu, float64",
    }


def row(k: int, cov: str, method: str, res: dict | None, dim: int, note: str = "") -> str:
    if res is None:
        return f"| {k} | {cov} | {method} | – | – | – | – | – | {note} |"
    init = "incl." if math.isnan(res["init"]) else f"{res['init']:.1f}"
    to_target = "not reached" if res.get("to_target") is None else f"{res['to_target']:.1f}"
    return (
        f"| {k} | {cov} | {method} | {res['ll']:.1f} | {bits_per_dim(res['ll'], dim):.3f} | {init} | "
        f"{res['fit']:.1f} | {to_target} | {res['notes']} |"
    )


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    device = torch.device(args.device)
    raw = load_dataset("fashion-mnist", data_dir=args.data_dir)
    train = dequantised(raw.train_x[: args.train_size], args.seed, device)
    test = dequantised(raw.test_x[: args.test_size], args.seed + 1, device)
    train_np, test_np = train.cpu().double().numpy(), test.cpu().double().numpy()
    dim = train.shape[1]
    lines = [HEADER, RULE]
    for cov in args.covariances:
        for k in args.ks:
            if cov == "full" and k > args.full_max_k:
                note = f"skipped: full covariance only for K <= {args.full_max_k} (--full-max-k)"
                lines += [row(k, cov, "pyro", None, dim, note), row(k, cov, "sklearn", None, dim, note)]
                continue
            sk = None
            if not args.no_sklearn:
                print(f"K={k} {cov}: sklearn ...", file=sys.stderr, flush=True)
                sk = run_sklearn(args, k, cov, train_np, test_np)
            print(f"K={k} {cov}: pyro ...", file=sys.stderr, flush=True)
            lines.append(row(k, cov, "pyro", run_pyro(args, k, cov, train, test, sk and sk["ll"]), dim))
            if sk is not None:
                lines.append(row(k, cov, "sklearn", sk, dim))
            print("\n".join(lines[-2:]), file=sys.stderr, flush=True)  # rows as they come, in case of a stop
    table = "\n".join(lines)
    print(table)
    if args.results:
        gpu = f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
        machine = f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores{gpu}"
        stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        header = (
            f"\n## GMM vs sklearn on Fashion-MNIST (dequantised 8-bit in [0, 1]), {stamp}\n\n"
            f"Machine: {machine}. Train {len(train)} images, test {len(test)}, reg_covar {args.reg_covar}.\n"
            f"Command: `python bench/gmm_vs_sklearn.py {' '.join(sys.argv[1:] if argv is None else argv)}`\n\n"
        )
        with open(args.results, "a") as f:
            f.write(header + table + "\n")
    return table


if __name__ == "__main__":
    main()
