"""The names a user reaches for first are importable from ``pyrovae`` itself."""

from __future__ import annotations

import pyrovae


def test_top_level_api():
    wanted = {"fit", "log_likelihood", "evaluate_points", "evaluate_run", "load_run", "pareto_khat", "build_vae", "GMM"}
    missing = sorted(n for n in wanted if not callable(getattr(pyrovae, n, None)))
    assert not missing, missing
    assert wanted <= set(pyrovae.__all__)
    assert all(hasattr(pyrovae, n) for n in pyrovae.__all__)
