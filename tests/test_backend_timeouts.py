"""The backend's waits and failures: object collectives without a limit (issue 21 row 13), a
collective that fails between its two halves (issue 22 row 4), a first use on one rank only
(issue 21 H1), where our gloo group binds and how local ranks are found (issue 22 rows 10-11).

In-process where a world of one shows the behaviour (the real torch backend on a private
port, or a chained local backend with injected faults); one real torchrun launch for H1.
"""
from __future__ import annotations

import json
import socket
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
from harness import launch, run

import horovod_iter as hi
import horovod_iter.backend as hb
from horovod_iter.backend import AsyncHandle, ChainHandle, LocalBackend

pytestmark = pytest.mark.timeout(300)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_WORLD_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK",
              "LOCAL_WORLD_SIZE", "TORCHELASTIC_USE_AGENT_STORE", "GLOO_SOCKET_IFNAME",
              "HOROVOD_ITER_NIC", "HOROVOD_ITER_BACKEND")


@pytest.fixture
def torch_world1(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A torch world of one rank in this process (our own init_process_group on a free port,
    no launcher): the real torch backend and its gloo group."""
    for var in _WORLD_ENV:
        monkeypatch.delenv(var, raising=False)
    for var, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", str(_free_port()))):
        monkeypatch.setenv(var, value)
    yield
    hb.shutdown()
    if dist.is_initialized():
        dist.destroy_process_group()


# -- a chained local backend with injected faults -------------------------------------------
class _Boom(RuntimeError):
    """Stands for gloo's ``Connection closed by peer`` / Horovod's internal error."""


class _Half(AsyncHandle):
    def __init__(self, backend: Any, value: Any, fail: str | None = None) -> None:
        super().__init__(backend)
        self._v, self._fail = value, fail

    def _ready(self) -> bool:
        if self._fail == "ready":
            raise _Boom("peer gone (poll)")
        return True

    def _collect(self) -> Any:
        if self._fail == "collect":
            raise _Boom("peer gone (collect)")
        return self._v


class _ChainedLocal(LocalBackend):
    """World of one whose object collectives are two halves, as under torch and Horovod;
    ``fault`` = (half, how) makes that half fail: ``first``/``second`` x ``ready``/
    ``collect``/``start``."""

    fault: tuple[str, str] | None = None

    def _half(self, which: str, value: Any) -> AsyncHandle:
        how = self.fault[1] if self.fault and self.fault[0] == which else None
        if how == "start":
            raise _Boom(f"peer gone (starting the {which} half)")
        return _Half(self, value, how)

    def _broadcast_bytes(self, payload: bytes, root: int) -> AsyncHandle:
        return ChainHandle(self, self._half("first", len(payload)),
                           lambda n: self._half("second", payload[:n]))

    def _allgather_bytes(self, payload: bytes) -> AsyncHandle:
        return ChainHandle(self, self._half("first", [len(payload)]),
                           lambda n: self._half("second", [payload[: n[0]]]))


# -- issue 21 row 13: timeout=None ------------------------------------------------------------
@pytest.mark.parametrize("timeout", [None, 30.0])
def test_chained_object_collectives_without_a_limit(timeout: float | None) -> None:
    b = _ChainedLocal()
    assert b.broadcast_object({"a": 1}, timeout=timeout) == {"a": 1}
    assert b.allgather_object([1, 2], timeout=timeout) == [[1, 2]]
    assert b.failed is None


def test_torch_object_collectives_without_a_limit(torch_world1: None) -> None:
    b = hi.init("torch")
    assert b.broadcast_object({"x": 3}, timeout=None) == {"x": 3}
    assert b.allgather_object("y", timeout=None) == ["y"]
    assert b.allreduce(torch.tensor([2, 5]), "max", timeout=None).tolist() == [2, 5]
    b.barrier(timeout=None)
    assert hi.gather_rows(torch.arange(3), timeout=None).tolist() == [0, 1, 2]
    assert b.failed is None


# -- issue 22 row 4: a half that fails is our error and fails the backend ----------------------
@pytest.mark.parametrize("fault", [("first", "start"), ("first", "ready"), ("first", "collect"),
                                   ("second", "start"), ("second", "ready"),
                                   ("second", "collect")])
@pytest.mark.parametrize("timeout", [None, 30.0])
def test_a_failing_half_is_a_rank_failure(fault: tuple[str, str], timeout: float | None) -> None:
    b = _ChainedLocal()
    b.fault = fault
    with pytest.raises(hi.RankFailureError, match=r"rank 0 of 1.*peer gone") as info:
        b.allgather_object("x", timeout=timeout, what="the test gather")
    assert isinstance(info.value.__cause__, _Boom)
    assert b.failed is not None and "the test gather" in b.failed
    with pytest.raises(hi.RankFailureError, match="not started"):
        b.broadcast_object(1)  # the ranks are out of step: later collectives raise at once


def test_a_failing_start_is_a_rank_failure() -> None:
    class _NoStart(LocalBackend):
        def _allreduce(self, tensor: torch.Tensor, op: str) -> AsyncHandle:
            raise _Boom("peer gone (start)")

    b = _NoStart()
    with pytest.raises(hi.RankFailureError, match="peer gone"):
        b.allreduce_async(torch.tensor([1]), name="x")
    assert b.failed is not None


def test_done_does_not_raise_and_wait_reports_the_failure() -> None:
    b = _ChainedLocal()
    b.fault = ("first", "ready")
    h = b._allgather_bytes(b"x")
    assert h.done()  # the failure is ready to be reported, by wait
    with pytest.raises(hi.RankFailureError):
        h.wait(1.0)
    assert b.failed is not None


@pytest.mark.distributed
def test_iterable_pad_without_a_limit_under_torchrun() -> None:
    """The issue's case: iterable data, ``uneven="pad"`` (its padding template is an object
    collective) and ``timeout=0`` (torch's "no limit")."""
    cfg = json.dumps({"data": "iter", "lengths": [7, 3], "batch_size": 2, "uneven": "pad",
                      "timeout": 0})
    res = launch("torch", 2, "loader_run.py", cfg, timeout=120)
    assert [r["error"] for r in res] == [None, None]
    ids = sorted(i for r in res for b in r["batches"] for i in b)
    assert len(ids) == 10 and len(set(ids)) == 10


# -- issue 22 row 2: the exit path and a message still in flight ------------------------------
class _Never(AsyncHandle):
    """A heartbeat to a host that froze: never completes."""

    def _ready(self) -> bool:
        return False

    def _collect(self) -> Any:
        raise AssertionError("never ready")


class _Exits(LocalBackend):
    """Records whether the exit path closed (joins gloo's threads) or abandoned the group."""

    closed = abandoned = False
    frozen = True

    def _allreduce(self, tensor: torch.Tensor, op: str) -> AsyncHandle:
        return _Never(self) if self.frozen else super()._allreduce(tensor, op)

    def close(self) -> None:
        self.closed = True
        super().close()

    def abandon_at_exit(self) -> None:
        self.abandoned = True
        super().abandon_at_exit()


@pytest.mark.parametrize("frozen", [True, False])
def test_exit_never_closes_with_a_message_in_flight(monkeypatch: pytest.MonkeyPatch,
                                                    frozen: bool) -> None:
    """A live iterator holds a heartbeat in flight (not failed, not adopted) when the
    trainer's own collective fails and the process ends: the group is abandoned, not closed."""
    b = _Exits()
    b.frozen = frozen
    handle = b.allreduce_async(torch.tensor([1]), name="heartbeat")
    monkeypatch.setattr(hb, "_backend", b)
    monkeypatch.setattr(hb, "_provisional", False)
    hb.shutdown()
    assert (b.abandoned, b.closed) == (frozen, not frozen)
    assert handle is not None and b.failed is None


# -- issue 22 row 10: binding and our own init_process_group ----------------------------------
@pytest.mark.parametrize("var", ["HOROVOD_ITER_NIC", "GLOO_SOCKET_IFNAME"])
def test_a_bad_interface_is_our_error_naming_the_variable(
        torch_world1: None, monkeypatch: pytest.MonkeyPatch, var: str) -> None:
    monkeypatch.setenv(var, "nosuchnic0")
    with pytest.raises(hi.BackendError, match=f"{var}='nosuchnic0'"):
        hi.init("torch")


def test_an_interface_named_by_the_user_is_used(torch_world1: None,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOROVOD_ITER_NIC", "lo")
    b = hi.init("torch")
    assert b.allgather_object(7) == [7]


def test_connecting_our_group_does_not_eat_the_first_collectives_timeout(
        torch_world1: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Connecting our gloo group takes several store round trips per rank (up to 5 s for 4
    ranks on 2 hosts at 200 ms RTT on a loaded host): the first collective waits up to its
    timeout for the connection, then its timeout for the result. Before, the first message
    of about 1 in 5 such jobs timed out on a rank whose connect was slow (issue 22)."""
    import time

    from horovod_iter import backend_torch as bt

    build = bt.TorchBackend._build

    class Work:  # a message that takes 0.6 s on the wire
        def __init__(self) -> None:
            self.at = time.monotonic() + 0.6

        def is_completed(self) -> bool:
            return time.monotonic() >= self.at

        def wait(self) -> None:
            pass

    class Far:  # our group between hosts far apart: connecting takes 0.7 s
        def __init__(self, group: Any) -> None:
            self.group = group

        def allreduce(self, tensors: Any, opts: Any) -> Work:
            return Work()

    def slow(self: Any, seq: int) -> Any:
        time.sleep(0.7)
        group, local = build(self, seq)
        return Far(group), local

    monkeypatch.setattr(bt.TorchBackend, "_build", slow)
    b = hi.init("torch")
    t0 = time.monotonic()  # 0.7 + 0.6 s: each within the timeout, not both together
    assert b.allreduce(torch.tensor([3]), timeout=1.0, name="first").tolist() == [3]
    assert time.monotonic() - t0 >= 1.3
    # bounded all the same: a connect that never ends is our error, naming the collective
    monkeypatch.setattr(bt.TorchBackend, "_build", lambda self, seq: time.sleep(3600))
    hb.shutdown()
    b = hi.init("torch")
    with pytest.raises(hi.DataTimeoutError, match="gloo group did not connect within 0.5 s "
                                                   r"\(for allreduce second"):
        b.allreduce(torch.tensor([3]), timeout=0.5, name="second")


def test_init_is_not_a_collective_and_our_own_init_is_bounded() -> None:
    """Without torchrun (RANK/WORLD_SIZE/MASTER_* by hand), rank 0 of 2 alone: ``hi.init()``
    returns at once (nothing collective), and the first collective raises our timeout error
    instead of waiting in torch's rendezvous for 30 minutes."""
    code = (
        "import torch, horovod_iter as hi\n"
        "b = hi.init('torch'); print('init', b.rank, b.size, flush=True)\n"
        "try:\n"
        "    b.allreduce(torch.tensor([1]), timeout=2.0, name='lonely')\n"
        "except hi.DataTimeoutError as e:\n"
        "    print('timeout', e, flush=True)\n"
        "import os; os._exit(0)\n")
    env = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port()), "LOCAL_RANK": "", "TORCHELASTIC_USE_AGENT_STORE": ""}
    res = run([sys.executable, "-c", code], timeout=120, env=env)
    assert "init 0 2" in res.stdout and "timeout" in res.stdout, res.stdout
    assert "lonely" in res.stdout


# -- issue 22 row 11: local ranks --------------------------------------------------------------
@pytest.mark.parametrize("env, want", [
    ({"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}, (1, 4)),
    ({"HOROVOD_LOCAL_RANK": "2", "HOROVOD_LOCAL_SIZE": "3"}, (2, 3)),
    ({"OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, (0, 2)),
    ({"MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}, (1, 2)),
    ({"LOCAL_RANK": "1"}, None),  # half a pair: not trusted, the hosts are compared instead
    ({}, None),
])
def test_local_rank_from_the_launcher(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                                      want: tuple[int, int] | None) -> None:
    from horovod_iter import backend_torch as bt

    for pair in bt.LOCAL_ENV:
        for var in pair:
            monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert bt.local_from_env() == want


def test_hosts_that_share_a_hostname_are_told_apart() -> None:
    from horovod_iter import backend_torch as bt

    a, b = bt.host_identity("10.0.0.1"), bt.host_identity("10.0.0.2")
    assert a != b and socket.gethostname() in a
    hosts = [a, a, b, b]
    assert [bt.local_facts(hosts, r) for r in range(4)] == [(0, 2), (1, 2), (0, 2), (1, 2)]


def test_local_rank_without_launcher_env_compares_hosts(torch_world1: None) -> None:
    b = hi.init("torch")
    assert (b.local_rank, b.local_size) == (0, 1)
    assert b.allgather_object(1) == [1]  # the group made for the comparison serves the rest


# -- issue 21 H1: the first use on one rank only ----------------------------------------------
@pytest.mark.distributed
def test_first_use_on_one_rank_after_init_process_group_does_not_hang() -> None:
    res = launch("torch", 2, "first_use_one_rank.py", timeout=150)
    assert res[0]["facts"] == ["torch", 0, 2, 0, 2, 3]
    assert [r["sum"] for r in res] == [3, 3]
    assert sorted(x for r in res for b in r["batches"] for x in b) == list(range(12))
