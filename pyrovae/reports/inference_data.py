"""ArviZ in one place: PSIS k̂, results as InferenceData, NUTS draws converted, for ArviZ 0.x and 1.x.

Python 3.10-3.11 can only get ArviZ 0.x (``InferenceData``, ``az.psislw``, ``az.from_pyro``); Python >= 3.12
gets ArviZ 1.x (arviz-base/-stats, xarray's ``DataTree``; no ``psislw``, ``from_pyro`` or ``InferenceData``).
Every other module goes through these few functions, so each API difference is handled once. The netCDF
files both write have one group per name and are read by either ArviZ's ``from_netcdf``.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import xarray as xr

ARVIZ_1 = int(importlib.metadata.version("arviz").split(".")[0]) >= 1


def _arviz() -> ModuleType:
    """``import arviz`` without ArviZ 0.23's import-time FutureWarning about its refactor (5 lines on stderr)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz

    return arviz


def psis_khat(log_weights: np.ndarray) -> np.ndarray:
    """ArviZ's PSIS k̂ of each row of (..., K) importance log-weights (reff 1: independent draws).

    NaN for a row whose tail (its largest ceil(min(K/5, 3√K)) weights, the ones PSIS fits) is all one value:
    there is no tail to fit (ArviZ 1.x refuses such a row, 0.x returns inf)."""
    lw = np.asarray(log_weights, dtype=float)
    tail = int(np.ceil(min(0.2 * lw.shape[-1], 3 * np.sqrt(lw.shape[-1]))))
    top = np.sort(lw, axis=-1)[..., -tail:]
    flat = np.ptp(top, axis=-1) < np.finfo(float).tiny
    khat = np.full(lw.shape[:-1], np.nan)
    if flat.all():
        return khat
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        if ARVIZ_1:
            from arviz_stats.base import array_stats

            # arviz-stats' psislw takes log-likelihood values and negates them (as LOO's raw weights)
            _, fitted = array_stats.psislw(-lw[~flat], r_eff=1.0, axis=-1)
        else:
            _, fitted = _arviz().psislw(lw[~flat], reff=1.0)
    khat[~flat] = np.asarray(fitted, dtype=float)
    return khat


def make_idata(**groups: xr.Dataset) -> Any:
    """Named groups of xarray Datasets as one ArviZ object: an ``InferenceData`` (0.x) or a ``DataTree`` (1.x)."""
    if ARVIZ_1:
        import xarray as xr

        return xr.DataTree.from_dict(groups)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # groups outside ArviZ's schema (e.g. "evaluation") get a warning
        return _arviz().InferenceData(**groups)


def group(idata: Any, name: str) -> xr.Dataset:
    """One group of an ArviZ object as a Dataset."""
    return idata[name].to_dataset() if ARVIZ_1 else getattr(idata, name)


def group_names(idata: Any) -> set[str]:
    """The names of the groups an ArviZ object holds."""
    if ARVIZ_1:
        return {path.strip("/") for path in idata.groups if path.strip("/")}
    return set(idata.groups())


def from_draws(
    posterior: dict[str, np.ndarray],
    sample_stats: dict[str, np.ndarray],
    coords: dict[str, Any],
    dims: dict[str, list[str]],
) -> Any:
    """Posterior draws and sample stats, each (chain, draw, ...), through ArviZ's own ``from_dict``."""
    az = _arviz()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if ARVIZ_1:
            return az.from_dict({"posterior": posterior, "sample_stats": sample_stats}, coords=coords, dims=dims)
        return az.from_dict(posterior=posterior, sample_stats=sample_stats, coords=coords, dims=dims)


def summary(idata: Any, var_names: list[str]):
    """ArviZ's summary table (mean, sd, ESS, R̂, MCSE; unrounded) of the posterior variables."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _arviz().summary(idata, var_names=var_names, kind="all", round_to="none")


def scalar_attrs(values: dict[str, Any]) -> dict[str, Any]:
    """The entries netCDF can hold as attributes: numbers and strings (booleans left out)."""
    return {k: v for k, v in values.items() if isinstance(v, int | float | str) and not isinstance(v, bool)}


def write_idata(path: str | Path, idata: Any) -> None:
    """``idata`` (InferenceData or DataTree) as netCDF, atomically under a fresh temporary name (a planted
    symlink cannot redirect the write)."""
    from ..files import atomic_path

    with atomic_path(path) as tmp:
        idata.to_netcdf(str(tmp))


def read_netcdf(path: str) -> Any:
    """A netCDF file written by :func:`make_idata`'s object, as the ArviZ the user has reads it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _arviz().from_netcdf(path)
