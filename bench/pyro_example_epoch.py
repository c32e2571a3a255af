"""Epoch time: pyrovae's fit vs the recipe of Pyro's examples/vae/vae.py, on full Fashion-MNIST.

The recipe: a torch Dataset that turns each uint8 image into a tensor through PIL and
``transforms.ToTensor`` (as torchvision's MNIST classes do), a shuffling DataLoader (batch 256),
and ``SVI.step`` with ``pyro.optim.Adam`` and ``Trace_ELBO`` on the example's VAE (784-400-50,
softplus, Bernoulli probabilities). pyrovae: the same networks (preset ``pyro-example``), the same
continuous pixels and batch size, data on the device, ``fit``. Interleaved, median of repeats.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from PIL import Image
from pyro.infer import SVI, Trace_ELBO
from torch import nn
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results, markdown_table  # noqa: E402

from pyrovae import Pixels, build_vae, fit, load_dataset, make_splits  # noqa: E402
from pyrovae.hostmem import keep_freed_memory  # noqa: E402


class ToTensorImages(torch.utils.data.Dataset):
    """Per-item PIL conversion and ToTensor, as torchvision's MNIST datasets do."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels, self.transform = images[:, 0], labels, transforms.ToTensor()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i].numpy(), mode="L")), int(self.labels[i])


class ExampleVAE(nn.Module):
    """The example's VAE: 784-400-50 with softplus, exp scale, sigmoid Bernoulli probabilities."""

    def __init__(self, z_dim: int = 50, hidden: int = 400) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.enc = nn.Linear(784, hidden)
        self.enc_loc, self.enc_scale = nn.Linear(hidden, z_dim), nn.Linear(hidden, z_dim)
        self.dec = nn.Sequential(nn.Linear(z_dim, hidden), nn.Softplus(), nn.Linear(hidden, 784), nn.Sigmoid())

    def model(self, x: torch.Tensor) -> None:
        pyro.module("decoder", self.dec)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("latent", dist.Normal(x.new_zeros(x.shape[0], self.z_dim), 1.0).to_event(1))
            probs = (self.dec(z) + 1e-7) * (1 - 2e-7)
            pyro.sample("obs", dist.Bernoulli(probs, validate_args=False).to_event(1), obs=x.reshape(-1, 784))

    def guide(self, x: torch.Tensor) -> None:
        pyro.module("encoder", self)
        with pyro.plate("data", x.shape[0]):
            h = nn.functional.softplus(self.enc(x.reshape(-1, 784)))
            pyro.sample("latent", dist.Normal(self.enc_loc(h), self.enc_scale(h).exp()).to_event(1))


def recipe_epoch(svi: SVI, loader: torch.utils.data.DataLoader, device: torch.device) -> float:
    total = 0.0
    for x, _ in loader:
        total += svi.step(x.to(device))
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for the recipe")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    keep_freed_memory()  # as the CLI does for training
    device = torch.device(args.device)
    raw = load_dataset("fashion-mnist", args.data_dir)
    splits = make_splits(raw, Pixels("none"), device, val_size=0)
    loader = torch.utils.data.DataLoader(
        ToTensorImages(raw.train_x, raw.train_y), batch_size=args.batch_size, shuffle=True, num_workers=args.workers
    )
    ours = build_vae(splits.train.shape, "bernoulli", "pyro-example").to(device)
    theirs = ExampleVAE().to(device)
    times: dict[str, list[float]] = {"recipe": [], "trace": [], "meanfield": []}

    def recipe() -> None:
        pyro.clear_param_store()
        svi = SVI(theirs.model, theirs.guide, pyro.optim.Adam({"lr": 1e-3}), loss=Trace_ELBO())
        t0 = time.perf_counter()
        recipe_epoch(svi, loader, device)
        times["recipe"].append(time.perf_counter() - t0)

    def ours_epochs() -> None:
        for elbo in ("trace", "meanfield"):
            t0 = time.perf_counter()
            fit(ours.model, ours.guide, splits.train, elbo=elbo, epochs=1, batch_size=args.batch_size, quiet=True)
            times[elbo].append(time.perf_counter() - t0)  # whole call: set-up included, validation off

    for r in range(args.repeats):  # alternating order: neither side always runs second
        for side in (recipe, ours_epochs) if r % 2 == 0 else (ours_epochs, recipe):
            side()
        print({k: round(v[-1], 2) for k, v in times.items()}, flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    rows = [
        [
            name,
            f"{med[name]:.2f} ({best[name]:.2f}–{max(times[name]):.2f})",
            f"{med['recipe'] / med[name]:.2f}×",
            f"{best['recipe'] / best[name]:.2f}×",
        ]
        for name in ("recipe", "trace", "meanfield")
    ]
    append_results(
        f"Epoch: pyrovae vs Pyro's examples/vae recipe (Fashion-MNIST 60k, batch {args.batch_size}, {device.type})",
        markdown_table(["pipeline", "s/epoch (range)", "speed-up (medians)", "speed-up (bests)"], rows),
        "python bench/pyro_example_epoch.py " + " ".join(sys.argv[1:]),
        f"Median and best of {args.repeats} interleaved repeats, order alternating. recipe = DataLoader ({args.workers} workers) + per-item "
        "ToTensor + SVI.step with pyro.optim.Adam + Trace_ELBO; trace/meanfield = pyrovae fit (whole call).",
    )


if __name__ == "__main__":
    main()
