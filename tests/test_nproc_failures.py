"""``pyrovae train --nproc 2`` when things go wrong: a worker killed, Ctrl-C, SIGTERM, a hung worker, bad input,
a busy run folder. Each is one line on stderr with the single-process exit codes (1 lost, 130 interrupted,
2 bad input), the checkpoint stays whole, and ``--resume`` finishes the run as an uninterrupted one would.

The runs are real: the launcher and two gloo workers on the CPU, small synthetic data. Workers are found as
the launcher's children (Linux ``/proc``) and paused with SIGSTOP once a checkpoint exists, so that what is
done to them happens mid-run however loaded the machine is.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pyrovae import distributed as ddp
from pyrovae.cli import main
from pyrovae.train import load_checkpoint

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds workers through /proc")

EPOCHS = 30  # far more than pass between the first checkpoint and the pause: the run is always cut mid-way
ARGS = ["--dataset", "synthetic", "--train-size", "1000", "--val-size", "100", "--hidden", "32", "--z-dim", "4"]
ARGS += ["--batch-size", "25", "--device", "cpu", "--seed", "5", "--quiet", "--epochs", str(EPOCHS)]


def start(out: Path, *extra: str) -> subprocess.Popen:
    """``pyrovae train --nproc 2`` in a process group of its own (as a terminal would run it)."""
    return subprocess.Popen(
        [sys.executable, "-m", "pyrovae", "train", "--nproc", "2", *ARGS, "--out", str(out), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )


def run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pyrovae", "train", "--nproc", "2", *ARGS, "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )


def workers(launcher: int) -> dict[int, int]:
    """The launcher's worker processes: pid by rank."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == launcher:
                env = dict(v.split("=", 1) for v in (d / "environ").read_text().split("\0") if "=" in v)
                found[int(env["RANK"])] = int(d.name)
        except (OSError, ValueError, KeyError, IndexError):
            continue  # gone meanwhile, or not ours
    return found


def rows(out: Path) -> list[dict[str, str]]:
    try:
        return list(csv.DictReader(open(out / "metrics.csv")))
    except (OSError, csv.Error):
        return []


def pause_after_first_epoch(proc: subprocess.Popen, out: Path) -> dict[int, int]:
    """Wait for the first epoch's checkpoint, then SIGSTOP both workers; their pids by rank."""
    deadline = time.time() + 240
    while not rows(out) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert rows(out), f"no epoch after 240 s: {proc.poll()} {proc.stderr.read() if proc.poll() is not None else ''}"
    pids = workers(proc.pid)
    assert sorted(pids) == [0, 1], pids
    for pid in pids.values():
        os.kill(pid, signal.SIGSTOP)
    return pids


def resume(pids: dict[int, int]) -> None:
    for pid in pids.values():
        os.kill(pid, signal.SIGCONT)


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def assert_whole(out: Path) -> dict:
    """The run folder holds a readable checkpoint and nothing half-written, and its lock is released."""
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["world_size"] == 2 and state["epoch"] >= 1
    left = sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp") or p.name == ".lock")
    assert left == [], left
    return state


def assert_resumes_like(out: Path, reference: Path) -> None:
    """``--resume`` with 2 processes finishes the run, bit for bit the uninterrupted one."""
    res = subprocess.run(
        [sys.executable, "-m", "pyrovae", "train", "--nproc", "2", "--out", str(out), "--resume", "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.count(f"done: {EPOCHS} epochs") == 1 and res.stderr == "", (res.stdout, res.stderr)
    got, want = rows(out), rows(reference)
    assert [(r["train_elbo"], r["val_elbo"]) for r in got] == [(r["train_elbo"], r["val_elbo"]) for r in want]
    a, b = (load_checkpoint(p / "checkpoint.pt")["modules"]["model"] for p in (out, reference))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted 2-process run of the same settings."""
    out = tmp_path_factory.mktemp("nproc") / "reference"
    res = run(out)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    return out


def test_a_killed_worker_is_one_line_exit_1_and_the_run_resumes(tmp_path, reference):
    out = tmp_path / "run"
    proc = start(out)
    pids = pause_after_first_epoch(proc, out)
    os.kill(pids[1], signal.SIGKILL)
    resume(pids)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    line = one_line(err)
    pattern = (
        rf"pyrovae train: error: worker 1 \(pid {pids[1]}\) was killed by signal 9 \(SIGKILL\) during epoch (\d+); "
        rf"the checkpoint of epoch (\d+) is intact; continue with: pyrovae train --out {re.escape(str(out))} --resume"
    )
    match = re.fullmatch(pattern, line)
    assert match, line
    state = assert_whole(out)
    assert int(match[2]) == state["epoch"] == int(match[1]) - 1 and state["batch"] == 0
    assert not (out / "workers.log").exists()  # worker 1 said nothing before it died
    assert_resumes_like(out, reference)


@pytest.mark.parametrize("how", ["ctrl-c to the process group", "sigterm to the launcher"])
def test_an_interrupt_is_one_line_exit_130_and_the_run_resumes(tmp_path, reference, how):
    out = tmp_path / "run"
    proc = start(out)
    pids = pause_after_first_epoch(proc, out)
    if how.startswith("ctrl-c"):
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does; the workers have a session of their own
    else:
        os.kill(proc.pid, signal.SIGTERM)
    resume(pids)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert one_line(err) == f"interrupted: checkpoint saved in {out}; continue with: pyrovae train --out {out} --resume"
    assert_whole(out)
    if how.startswith("ctrl-c"):  # the workers stop alike on either signal (the launcher passes it on): resume once
        assert_resumes_like(out, reference)


def test_a_hung_worker_stops_the_run_within_the_peer_timeout(tmp_path):
    out = tmp_path / "run"
    proc = start(out, "--peer-timeout", "3")
    pids = pause_after_first_epoch(proc, out)
    os.kill(pids[0], signal.SIGCONT)  # worker 1 stays stopped: worker 0 waits on it in its next collective
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 1, err
    line = one_line(err)
    assert re.fullmatch(
        rf"pyrovae train: error: worker 0 \(pid {pids[0]}\) waited more than 3 s for another worker \(one hung or "
        rf"died\) during epoch \d+; the checkpoint of epoch \d+ is intact; continue with: .* --resume",
        line,
    ), line
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids.values())  # the hung one was killed too
    assert_whole(out)


def test_a_busy_run_folder_is_refused_before_any_worker_starts(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    proc = start(out)
    pids = pause_after_first_epoch(proc, out)
    try:
        monkeypatch.setattr(ddp, "launch", lambda *a, **k: pytest.fail("workers started"))
        before = (out / "checkpoint.pt").read_bytes()
        assert main(["train", "--nproc", "2", *ARGS, "--out", str(out), "--resume"]) == 2
        err = capsys.readouterr().err
        assert one_line(err) == (
            f"pyrovae train: error: {out} is in use by another pyrovae command (pid {proc.pid}); "
            "wait for it to finish or stop it"
        )
        assert (out / "checkpoint.pt").read_bytes() == before
    finally:
        resume(pids)
    os.kill(proc.pid, signal.SIGTERM)  # the first run is undisturbed: it stops as asked
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "checkpoint saved" in one_line(err), err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--resume", "--epochs", str(EPOCHS)], f"has already trained {EPOCHS} epochs"),
        (["--resume", "--lr", "0.5"], "these options differ from it: lr"),
        ([], "already holds a run; pass --resume"),
        (["--overwrite", "--binarize", "none"], "needs binary pixels"),
    ],
)
def test_bad_input_is_refused_once_before_any_worker_starts(reference, monkeypatch, capsys, extra, message):
    monkeypatch.setattr(ddp, "launch", lambda *a, **k: pytest.fail("workers started"))
    before = sorted((p.name, p.read_bytes()) for p in reference.iterdir())
    assert main(["train", "--nproc", "2", *ARGS, *extra, "--out", str(reference)]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("pyrovae train: error: ") and message in line, line
    assert sorted((p.name, p.read_bytes()) for p in reference.iterdir()) == before


# ------------------------------------------------------------------------- the launcher's verdict, unit by unit
def _exit(rank, code, line=None, *, lost=False, killed=False, order=0, report_code=None):
    said = None if line is None else {"message": line, "line": f"pyrovae train: error: {line}", "lost": lost}
    if said is not None:
        said["code"] = code if report_code is None else report_code
    return ddp.WorkerExit(rank, 100 + rank, code, said, killed, order)


def test_outcome_names_the_worker_that_died_not_the_one_that_lost_it():
    out = ddp.outcome([_exit(0, 1, "worker 0 lost contact", lost=True, order=1), _exit(1, -9, order=0)])
    assert (out.code, out.cause) == (1, "worker 1 (pid 101) was killed by signal 9 (SIGKILL)")
    out = ddp.outcome([_exit(0, 1, "worker 0 waited more than 3 s", lost=True), _exit(1, -9, killed=True)])
    assert (out.code, out.cause) == (1, "worker 0 waited more than 3 s")


def test_outcome_tells_a_shared_error_once_with_its_exit_code():
    out = ddp.outcome([_exit(0, 2, "bad option"), _exit(1, 2, "bad option")])
    assert (out.code, out.cause, out.lines) == (2, "", ("pyrovae train: error: bad option",))
    out = ddp.outcome([_exit(0, 130), _exit(1, 130)])  # rank 0 printed its own line
    assert (out.code, out.lines) == (130, ())
    assert ddp.outcome([_exit(0, 0), _exit(1, 0)]).code == 0


def test_a_failed_collective_becomes_one_line_naming_the_worker(monkeypatch):
    from pyrovae.errors import PeerLost

    gloo = "[../gloo/transport/tcp/pair.cc:534] Read error [127.0.0.1]:4: Connection reset by peer. This is typically"
    with pytest.raises(RuntimeError, match="Connection reset"):  # one process: not a peer's failure, left as it is
        with ddp.peer_failures():
            raise RuntimeError(gloo)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    me = rf"worker 1 \(pid {os.getpid()}\)"
    with pytest.raises(
        PeerLost, match=rf"^{me} lost contact with another worker \(Read error \S+ Connection reset by peer\)$"
    ):
        with ddp.peer_failures():
            raise RuntimeError(gloo)
    with pytest.raises(PeerLost, match=rf"^{me} waited more than 7 s for another worker \(one hung or died\)$"):
        with ddp.peer_failures(7):
            raise RuntimeError("[gloo] Timed out waiting 7000ms for recv operation to complete")
    with pytest.raises(RuntimeError, match="^a bug$"):  # not the group's: passes unchanged
        with ddp.peer_failures():
            raise RuntimeError("a bug")
