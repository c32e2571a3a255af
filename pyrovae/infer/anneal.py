"""KL warm-up: scale every latent (unobserved) sample site by β, in model and guide alike.

With β on both sides the ELBO becomes E_q[log p(x|z)] − β·KL(q‖p), for Trace_ELBO and
TraceMeanField_ELBO alike (the latter checks that model and guide scales agree).
"""

from __future__ import annotations

from pyro.poutine.messenger import Messenger


class LatentScale(Messenger):
    """Multiply the scale of unobserved sample sites by ``beta``."""

    def __init__(self, beta: float) -> None:
        super().__init__()
        self.beta = float(beta)

    def _process_message(self, msg) -> None:
        if msg["type"] == "sample" and not msg["is_observed"]:
            msg["scale"] = self.beta * msg["scale"]


def warmup_beta(epoch: int, warmup_epochs: float) -> float:
    """β for a 0-based epoch: rising linearly from 1/E to 1 over the first E epochs, then 1."""
    if warmup_epochs <= 0:
        return 1.0
    return min(1.0, (epoch + 1) / warmup_epochs)
