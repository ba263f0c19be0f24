"""DataLoader worker faults on one rank, in process (issue 22 rows 1, 6, 7).

* A rank that dies right after it forks its workers leaves none of them alive: each worker
  compares its parent with the rank's pid once its die-with-parent signal is armed.
* A worker killed (or OOM-killed) is this rank's `SampleError` naming the rank, the step and
  the worker, at its next batch, never torch's raw ``RuntimeError`` inside the trainer's step.
* On a timeout the stuck workers are killed, not joined for 5 s each.
"""
from __future__ import annotations

import json
import multiprocessing.process
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from horovod_iter.errors import DataTimeoutError, SampleError
from horovod_iter.fetch import FetchOptions, host_batches

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)


class Numbers(torch.utils.data.Dataset):
    """0..n-1; index ``die`` SIGKILLs the worker reading it, indices >= ``stall`` hang."""

    def __init__(self, n: int, die: int = -1, stall: int | None = None) -> None:
        self.n, self.die, self.stall = n, die, stall

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == self.die:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.stall is not None and i >= self.stall:
            time.sleep(3600)
        return torch.tensor(i)


def source(ds: Numbers, rank: int = 0, batch: int = 2, **kw):
    arrays = iter([np.arange(a, min(a + batch, len(ds))) for a in range(0, len(ds), batch)])
    opts = FetchOptions(batch_size=batch, num_workers=2, rank=rank, **kw)
    return host_batches(ds, opts, indices=(arrays, -(-len(ds) // batch)))


def workers_of(src) -> list:
    return list(src._it._workers)


def wait_until_dead(pid: int, created: float, end: float) -> bool:
    """Poll (not a timing assertion: ``end`` is a generous cap) until ``pid`` is gone or a
    zombie; False if it still runs at ``end`` (``time.monotonic()``)."""
    while time.monotonic() < end:
        try:
            p = psutil.Process(pid)
            if p.create_time() != created or p.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.2)
    return False


# -- row 1: a rank that dies right after the fork ---------------------------------------------

ORPHANS = textwrap.dedent("""
    import json, os, signal, sys, time
    import numpy as np, torch
    sys.path.insert(0, sys.argv[1])
    from horovod_iter.fetch import FetchOptions, host_batches

    class Numbers(torch.utils.data.Dataset):
        def __len__(self):
            return 64
        def __getitem__(self, i):
            return torch.tensor(i)

    def slow_init(worker_id):  # the user's worker_init_fn
        time.sleep(2)

    # the workers reach worker_init_fn only after this rank is gone (a slow fork on a loaded
    # host): without the parent check, their die-with-parent signal is armed too late
    os.register_at_fork(after_in_child=lambda: time.sleep(3))
    arrays = iter([np.arange(a, a + 2) for a in range(0, 64, 2)])
    opts = FetchOptions(batch_size=2, num_workers=2, worker_init_fn=slow_init,
                        multiprocessing_context="fork")
    src = host_batches(Numbers(), opts, indices=(arrays, 32))
    print(json.dumps([w.pid for w in src._it._workers]), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_workers_of_a_rank_killed_right_after_the_fork_do_not_outlive_it(tmp_path):
    script = tmp_path / "orphans.py"
    script.write_text(ORPHANS)
    out = tmp_path / "out.txt"
    with open(out, "w") as f:  # a file, not a pipe: orphans holding a pipe would hang run()
        code = subprocess.run([sys.executable, str(script), str(ROOT)], check=False,
                              stdout=f, stderr=subprocess.STDOUT, timeout=120).returncode
    text = out.read_text()
    assert code == -signal.SIGKILL, text
    pids = json.loads(text.strip().splitlines()[-1])
    procs = {}
    for pid in pids:
        try:
            procs[pid] = psutil.Process(pid).create_time()
        except psutil.NoSuchProcess:
            procs[pid] = None
    end = time.monotonic() + 60
    try:
        alive = [pid for pid, created in procs.items()
                 if created is not None and not wait_until_dead(pid, created, end)]
        assert not alive, f"DataLoader workers {alive} outlived their rank"
    finally:
        for pid, created in procs.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created:
                    p.kill()
            except psutil.NoSuchProcess:
                pass


# -- row 6: a killed worker is our SampleError -------------------------------------------------

def test_a_worker_killing_itself_in_getitem_is_a_sample_error_naming_rank_step_worker():
    src = source(Numbers(64, die=20), rank=3)
    got = []
    with pytest.raises(SampleError, match=r"rank 3, step \d+ of this pass: DataLoader worker "
                                          r"[01] \(pid \d+\) of this rank was killed by "
                                          r"signal SIGKILL") as err:
        for batch in src:
            got.append(batch)
            time.sleep(0.05)  # the trainer's step: the worker dies during one
    step = int(str(err.value).split("step ")[1].split()[0])
    assert step == len(got) <= 10  # index 20 is in batch 10: never handed out


def test_a_worker_killed_during_the_trainers_step_surfaces_at_the_next_batch():
    """The kill's SIGCHLD arrives while the trainer steps: nothing raises there (torch raises
    its RuntimeError wherever the main thread is); the next batch is our SampleError."""
    src = source(Numbers(64), rank=1)
    assert next(src).tolist() == [0, 1]
    assert next(src).tolist() == [2, 3]
    workers = workers_of(src)
    victim = workers[1]
    os.kill(victim.pid, signal.SIGKILL)
    try:  # the trainer's step, until the worker has died (not reaping it)
        os.waitid(os.P_PID, victim.pid, os.WEXITED | os.WNOWAIT)
    except ChildProcessError:  # reaped meanwhile, by the SIGCHLD handler
        pass
    for _ in range(100):  # bytecodes in which Python runs the SIGCHLD handler
        sum(range(10))
    with pytest.raises(SampleError, match=rf"rank 1, step 2 of this pass: DataLoader worker 1 "
                                          rf"\(pid {victim.pid}\) of this rank was killed by "
                                          "signal SIGKILL"):
        next(src)
    assert all(w.exitcode is not None for w in workers)
    with pytest.raises(StopIteration):
        next(src)


def test_a_worker_killed_just_before_the_next_batch_is_a_sample_error_naming_it():
    """Killed right before ``next()``: its batches already sent cannot be read (their
    tensors' file descriptors come from the dead process), before the process is reaped or
    its SIGCHLD handled: still our SampleError naming the worker, never the
    ``ConnectionResetError`` that torch lets through."""
    src = source(Numbers(64), rank=2)
    assert next(src).tolist() == [0, 1]
    victim = workers_of(src)[1]
    os.kill(victim.pid, signal.SIGKILL)
    with pytest.raises(SampleError, match=rf"rank 2, step \d of this pass: DataLoader worker 1 "
                                          rf"\(pid {victim.pid}\) of this rank was killed by "
                                          "signal SIGKILL"):
        for _ in range(31):
            next(src)


def test_a_worker_that_died_between_passes_of_persistent_workers_fails_the_next_pass():
    ds = Numbers(8)
    kept: dict = {}

    def one_pass():
        arrays = iter([np.arange(a, a + 2) for a in range(0, 8, 2)])
        opts = FetchOptions(batch_size=2, num_workers=2, persistent_workers=True)
        return host_batches(ds, opts, indices=(arrays, 4), workers=kept)

    src = one_pass()
    assert [b.tolist() for b in src] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    src.close()
    (dl,) = kept.values()
    victim = dl._iterator._workers[0]
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(30)
    with pytest.raises(SampleError, match=rf"step 0 of this pass: DataLoader worker 0 "
                                          rf"\(pid {victim.pid}\) .* SIGKILL"):
        one_pass()
    src = one_pass()  # new workers
    assert [b.tolist() for b in src] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    src.close()
    dl._iterator._shutdown_workers()


# -- row 7: stuck workers are killed, not joined -----------------------------------------------

@pytest.fixture
def joins(monkeypatch):
    """Every ``Process.join`` as (pid, timeout, alive after it): a join that returns on a live
    process waited out its whole timeout (torch's 5 s per stuck worker)."""
    seen: list[tuple[int, float | None, bool]] = []
    real = multiprocessing.process.BaseProcess.join

    def join(self, timeout=None):
        real(self, timeout)
        seen.append((self.pid, timeout, self.exitcode is None))

    monkeypatch.setattr(multiprocessing.process.BaseProcess, "join", join)
    return seen


@pytest.mark.parametrize("pin", [False, pytest.param(True, marks=pytest.mark.cuda)])
def test_stuck_workers_are_killed_at_the_timeout_not_joined(joins, pin):
    src = source(Numbers(64, stall=4), rank=2, timeout=1, pin=pin)
    workers = workers_of(src)
    with pytest.raises(DataTimeoutError, match=r"rank 2, step 2 of this pass: no batch"):
        for _ in src:
            pass
    assert all(w.exitcode is not None for w in workers)  # none left, right after the error
    assert [j for j in joins if j[2]] == []  # no join waited on a live (stuck) worker
    src.close()


def test_a_clean_pass_still_lets_its_workers_exit_on_their_own(joins):
    src = source(Numbers(16))
    workers = workers_of(src)
    assert len(list(src)) == 8
    assert [w.exitcode for w in workers] == [0, 0]  # asked to stop, not killed
    assert [j for j in joins if j[2]] == []


class _Dying:
    """A worker process as the kernel shows one being killed on a loaded host: its files
    (the sentinel pipe, its sockets) are closed at once, its exit status shows ``lag`` s
    later."""

    def __init__(self, lag: float) -> None:
        r, w = os.pipe()
        os.close(w)  # the sentinel reads as ready: the process closed its files
        self.sentinel, self.pid, self._at = r, 4242, time.monotonic() + lag

    @property
    def exitcode(self):
        return -signal.SIGKILL if time.monotonic() >= self._at else None


def test_a_read_error_waits_for_the_exit_status_that_comes_after_the_files_close():
    """The race behind 1 of 100 worker_kill runs of scripts/faults.py being reported as "the
    dataset raised: ConnectionResetError": the sentinel was ready, the status not yet."""
    from horovod_iter.fetch import _death_behind

    class It:
        _shutdown = False
        _workers = (_Dying(0.3),)

    try:
        death = _death_behind(It(), ConnectionResetError(104, "Connection reset by peer"))
        assert death is not None and death.describe().startswith("DataLoader worker 0 (pid 4242)")
    finally:
        os.close(It._workers[0].sentinel)
