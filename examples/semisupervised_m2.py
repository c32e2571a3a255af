"""Semi-supervised M2 (Kingma et al. 2014) on a few labels, with the API, against a supervised baseline.

    python examples/semisupervised_m2.py --dataset synthetic --labels 100 --epochs 20
    python examples/semisupervised_m2.py --data-dir ../shared/data/FashionMNIST/raw --labels 100 --epochs 10

Prints the test accuracy of q(y|x) per epoch, then M2 against the same classifier trained on the labels only.
"""

from __future__ import annotations

import argparse
import math

import pyro
import torch

import pyrovae
from pyrovae.models.m2 import M2, Classifier
from pyrovae.tasks.semisupervised import (
    SemiSupervisedData,
    accuracy,
    balanced_labels,
    predict,
    train_classifier,
    train_m2,
)


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist, mnist, or synthetic")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--labels", type=int, default=100, help="labelled examples, balanced per class")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--train-size", type=int, default=None)
    args = p.parse_args(argv)

    pyro.set_rng_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    synthetic = args.dataset == "synthetic"
    raw = pyrovae.synthetic() if synthetic else pyrovae.load_dataset(args.dataset, args.data_dir)
    splits = pyrovae.make_splits(raw, pyrovae.Pixels("dynamic"), device, val_size=0, train_size=args.train_size)
    train, test = splits.train, splits.test
    labelled = balanced_labels(train.labels, args.labels).to(device)
    data = SemiSupervisedData(train, train.labels, labelled, labelled_batch=50)
    hidden, z_dim, lr = ((64,), 4, 5e-3) if synthetic else ((500,), 50, 1e-3)
    batch_size = 50 if synthetic else 100

    m2 = M2(train.shape, "bernoulli", hidden, z_dim).to(device)
    start = {k: v.clone() for k, v in m2.classifier.state_dict().items()}
    result = train_m2(m2, data, epochs=args.epochs, batch_size=batch_size, lr=lr, test=(test.all(), test.labels))
    print("M2 test accuracy per epoch:", " ".join(f"{r['test_accuracy']:.3f}" for r in result.history))

    baseline = Classifier(train.shape, hidden, 10, "softplus").to(device)
    baseline.load_state_dict(start)
    x_lab, y_lab = data.labelled_data()
    steps = args.epochs * math.ceil(len(data) / batch_size)
    train_classifier(baseline, x_lab, y_lab, steps=steps, batch_size=data.labelled_batch, lr=lr)
    out = {
        "m2": accuracy(m2.predict(test.all()), test.labels),
        "baseline": accuracy(predict(baseline, test.all()), test.labels),
    }
    print(f"{args.labels} labels: M2 {out['m2']:.4f}, supervised baseline {out['baseline']:.4f} test accuracy")
    return out


if __name__ == "__main__":
    main()
