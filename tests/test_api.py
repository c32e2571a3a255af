"""The package as a user meets it: the names reached for first are in ``pyrovae`` itself, and importing or
drawing sets no process-wide state."""

from __future__ import annotations

import os
import subprocess
import sys

import pyrovae


def test_top_level_api():
    wanted = {"fit", "log_likelihood", "evaluate_points", "evaluate_run", "load_run", "pareto_khat", "build_vae", "GMM"}
    missing = sorted(n for n in wanted if not callable(getattr(pyrovae, n, None)))
    assert not missing, missing
    assert wanted <= set(pyrovae.__all__)
    assert all(hasattr(pyrovae, n) for n in pyrovae.__all__)


def test_exports_survive_importing_every_submodule():
    """The lazy exports stay what they name once their modules are imported (a submodule named like an export,
    e.g. ``pyrovae.compare``, would otherwise replace the function by the module)."""
    import importlib
    import pkgutil
    import types

    for info in pkgutil.walk_packages(pyrovae.__path__, "pyrovae."):
        importlib.import_module(info.name)
    modules = sorted(n for n in pyrovae.__all__ if isinstance(getattr(pyrovae, n), types.ModuleType))
    assert not modules, modules
    assert callable(pyrovae.compare) and callable(pyrovae.fit)


def test_figures_leave_matplotlibs_backend_alone(tmp_path):
    """Drawing pyrovae's figures sets no process-wide matplotlib state: a user's backend choice survives."""
    code = f"""
import matplotlib, numpy as np
from pyrovae.reports.figures import khat_plot
from pyrovae.tasks.samples import compare_figure
import torch
khat_plot(np.linspace(0, 1, 50), {str(tmp_path / "k.png")!r})
compare_figure({{"a": torch.rand(4, 1, 6, 6)}}, {str(tmp_path / "c.png")!r}, per_block=4)
print(matplotlib.get_backend())
"""
    env = {**os.environ, "MPLBACKEND": "svg"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "svg"
    assert (tmp_path / "k.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "c.png").stat().st_size > 0
