"""ELBO estimators by name: one registry, one place to add an estimator.

``trace`` (Monte Carlo KL), ``meanfield`` (analytic KL where available) — Pyro's Trace_ELBO and
TraceMeanField_ELBO with the loss kept on the device (``trace.py``), ``iwae`` (per-datapoint
IWAE bound, K particles), ``renyi`` (per-datapoint Rényi bound, α given), ``tracegraph`` (Rao-
Blackwellised score-function terms for non-reparameterised sites). Particles are vectorised.
Pyro's JIT variants are left out on purpose: in Pyro 1.9 JitTraceMeanField_ELBO re-traces every
step (about 4x slower here) and TorchScript is deprecated in torch >= 2.11.

Beside the estimators: ``handlers.py`` the minibatch scale (``DataScale``) and plate helpers, ``paramstore.py``
param-store scopes. The estimators of per-datapoint log p(x), one per module over shared parts: ``importance.py``
(the importance sweep: log p(x), its draws, the ELBO's parts), ``ais.py`` (annealed importance sampling, with the
HMC transitions of ``hmc.py``), ``bdmc.py`` (the BDMC sandwich on simulated data); ``program.py`` the one
inspection of a program they share (data plate, local latents, particle dim, subsets), ``memory.py`` their memory
planner, ``diagnostics.py`` k̂ and the rest; ``local.py`` variational families with parameters per datapoint
(where the inference gap's q* is fitted).
"""

from __future__ import annotations

from collections.abc import Callable

from pyro.infer import ELBO, TraceGraph_ELBO

from ..errors import PyrovaeError
from .anneal import LatentScale, warmup_beta
from .renyi import RenyiBound
from .trace import MeanField, Trace


def check_alpha(elbo: str, alpha: float | None) -> None:
    """Refuse the Rényi estimator without its α (before any data is loaded or model built)."""
    if elbo == "renyi" and alpha is None:
        raise PyrovaeError("--elbo renyi needs --alpha (e.g. 0.5; 0 is iwae, 1 is the ELBO)")


def _renyi(particles: int, alpha: float | None, **settings) -> ELBO:
    check_alpha("renyi", alpha)
    return RenyiBound(alpha=alpha, num_particles=particles, **settings)


def _vectorised(cls: type[ELBO]) -> Callable[..., ELBO]:
    """An estimator of K particles, vectorised in a particle plate when K > 1 unless the settings say otherwise."""
    return lambda k, a, **settings: cls(num_particles=k, **{"vectorize_particles": k > 1, **settings})


ESTIMATORS: dict[str, Callable[..., ELBO]] = {
    "trace": _vectorised(Trace),
    "meanfield": _vectorised(MeanField),
    "iwae": lambda k, a, **settings: RenyiBound(alpha=0.0, num_particles=k, **settings),
    "renyi": _renyi,
    "tracegraph": _vectorised(TraceGraph_ELBO),
}
DEFAULT_PARTICLES = {"iwae": 5, "renyi": 5}
SETTINGS = ("max_plate_nesting", "strict_enumeration_warning", "vectorize_particles")  # as Pyro's ELBOs take them


def make_elbo(
    spec: str | ELBO | type[ELBO], particles: int | None = None, alpha: float | None = None, **settings
) -> ELBO:
    """An ELBO from a registered name, a ``pyro.infer.ELBO`` subclass, or an instance (returned as is).

    ``settings`` are Pyro's ELBO options (``max_plate_nesting``, ``strict_enumeration_warning``,
    ``vectorize_particles``), given to the estimator built; an instance carries its own.
    """
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise PyrovaeError(f"unknown ELBO setting {unknown[0]!r}; the settings are {', '.join(SETTINGS)}")
    if isinstance(spec, ELBO):
        if settings:
            raise PyrovaeError(
                f"{', '.join(sorted(settings))} given beside an ELBO instance: set them on the instance "
                f"({type(spec).__name__}({next(iter(sorted(settings)))}=...))"
            )
        return spec
    if isinstance(spec, type) and issubclass(spec, ELBO):
        return spec(num_particles=particles or 1, **settings)
    if not isinstance(spec, str) or spec not in ESTIMATORS:
        raise PyrovaeError(f"unknown ELBO {spec!r}; choose one of {', '.join(ESTIMATORS)} or pass a pyro.infer.ELBO")
    k = particles if particles is not None else DEFAULT_PARTICLES.get(spec, 1)
    if k < 1:
        raise PyrovaeError(f"--particles must be at least 1, got {k}")
    return ESTIMATORS[spec](k, alpha, **settings)


__all__ = ["ESTIMATORS", "LatentScale", "MeanField", "RenyiBound", "Trace", "check_alpha", "make_elbo", "warmup_beta"]
