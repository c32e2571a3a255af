"""Param-store isolation: library code runs Pyro programs in a fresh scope of Pyro's param store instead of
clearing the user's (``pyro.get_param_store().scope()``), so a caller's own parameters survive a call."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pyro


@contextmanager
def fresh_param_store(publish: bool = False) -> Iterator[dict]:
    """Run the block in an empty param store (no stale entry can be picked up by name); the caller's is back after.

    ``publish``: on a normal exit the parameters made inside are also put in the caller's store under
    their names (replacing entries of those names only), as a Pyro user expects after training.
    """
    store = pyro.get_param_store()
    with store.scope() as scope:
        yield scope
    if publish:
        for name in scope["params"]:
            if name in store:
                del store[name]
        store.set_state(scope)


def forget_module(name: str) -> None:
    """Drop the entries ``pyro.module(name, ...)`` (and its children ``name.child``) made, and no others: a model
    rebuilt under that name then registers its own tensors, not stale ones of the same name."""
    store = pyro.get_param_store()
    for key in list(store.keys()):
        owner = key.partition("$$$")[0]
        if owner == name or owner.startswith(name + "."):
            del store[key]
