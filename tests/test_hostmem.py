"""keep_freed_memory: a loop that frees ~31 MB at the end of every step stops faulting its memory in afresh."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# one "step" allocates and frees ten 1000 x 784 float tensors (~31 MB, the scale of a CPU training step at batch
# 1000); minor page faults per step are counted after a warm-up
SCRIPT = """
import resource, torch
from pyrovae.hostmem import keep_freed_memory
tuned = keep_freed_memory()
def step():
    return sum(float(t[0, 0]) for t in [torch.ones(1000, 784) for _ in range(10)])
for _ in range(5):
    step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(tuned, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 20)
"""


def _faults_per_step(keep: str) -> tuple[str, float]:
    # Whether glibc's defaults give a step's freed memory back depends on what else sits on the heap (a small
    # block above the freed ones stops the trim), so the same script faults in some processes and not in
    # others. Both processes therefore start from the defaults' worst case, MALLOC_TRIM_THRESHOLD_=0 (give
    # back everything freed at the top): then a process that faults nothing is keeping its memory.
    env = {**os.environ, "PYROVAE_KEEP_FREED_MEMORY": keep, "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    tuned, faults = out.stdout.split()
    return tuned, float(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keeping_freed_memory_stops_the_page_faults_of_every_step():
    # given back, the ~31 MB are faulted in again each step (~7 600 pages of 4 KB); kept, a step faults almost
    # none (measured 7 660 vs 0). The bound (a tenth) leaves room for the allocator's own pages.
    off_flag, off = _faults_per_step("0")
    on_flag, on = _faults_per_step("1")
    assert off_flag == "False" and on_flag == "True"
    assert off > 5000, off
    assert on < 0.1 * off, (on, off)


def test_fit_leaves_malloc_alone_the_command_line_opts_in():
    # A process-wide setting is the caller's to make: fit (library code) never calls keep_freed_memory; main does.
    script = """
import torch, pyro, pyro.distributions as dist
from pyrovae import fit
from pyrovae.hostmem import keep_freed_memory
def model(x):
    loc = pyro.param("loc", torch.zeros(2))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)
def guide(x):
    pass
fit(model, guide, torch.randn(20, 2), epochs=1, batch_size=10, quiet=True)
print(keep_freed_memory.cache_info().currsize)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0"], out.stdout
