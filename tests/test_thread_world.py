"""The in-process thread world (tests/thread_world.py), and the end-of-data protocol
(`EndOfDataSync`) on it: stop/pad/error over unequal lengths, a rank whose data raises, a rank
that dies or stalls, a configuration that differs on one rank."""
from __future__ import annotations

import threading
from typing import Any

import pytest
import thread_world
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from thread_world import (
    Fault,
    GlobalWorldError,
    HangError,
    RankDied,
    RankStalled,
    ThreadBackend,
    run_all,
    run_ranks,
)

import horovod_iter as hi
import horovod_iter.backend as hb
from horovod_iter.errors import (
    ConfigMismatchError,
    DataTimeoutError,
    RankFailureError,
    UnevenDataError,
)
from horovod_iter.sync import EndOfDataSync

# -- the world itself ------------------------------------------------------------------------


def test_allreduce_ops_and_object_collectives() -> None:
    def fn(b: ThreadBackend) -> Any:
        t = torch.tensor([b.rank, 10 - b.rank], dtype=torch.int64)
        return (b.allreduce(t, "sum").tolist(), b.allreduce(t, "min").tolist(),
                b.allreduce(t, "max").tolist(), b.broadcast_object(("x", b.rank), root=2),
                b.allgather_object(b.rank * 2), (b.local_rank, b.local_size))

    out = run_all(3, fn)
    for r in range(3):
        assert out[r][:5] == ([3, 27], [0, 8], [2, 10], ("x", 2), [0, 2, 4])
        assert out[r][5] == (r, 3)


def test_async_collectives_match_by_order_not_lockstep() -> None:
    """Several in flight, waited in any order: the n-th of every rank pairs up."""

    def fn(b: ThreadBackend) -> list[int]:
        handles = [b.allreduce_async(torch.tensor([b.rank + i]), "sum") for i in range(5)]
        order = range(5) if b.rank % 2 else reversed(range(5))
        got = {i: int(handles[i].wait(30)[0]) for i in order}
        return [got[i] for i in range(5)]

    assert run_all(4, fn) == [[6 + 4 * i for i in range(5)]] * 4


def test_mismatched_collectives_fail_on_every_rank() -> None:
    def fn(b: ThreadBackend) -> Any:
        if b.rank == 0:
            return b.allgather_object(1, timeout=30)
        return b.allreduce(torch.tensor([1]), timeout=30)

    out = run_ranks(2, fn)
    assert all(isinstance(e, RankFailureError) and "does not match" in str(e) for e in out)


def test_a_rank_that_dies_fails_its_peers_fast_and_marks_them_failed() -> None:
    def fn(b: ThreadBackend) -> Any:
        b.barrier(timeout=30)
        try:
            b.barrier(timeout=30)
        finally:
            failed = b.failed
        return failed

    out = run_ranks(3, fn, faults=[Fault(rank=1, at=1, action="die")])
    assert isinstance(out[1], RankDied)
    for r in (0, 2):
        assert isinstance(out[r], RankFailureError) and "rank 1 died" in str(out[r])


def test_a_rank_that_stalls_times_its_peers_out() -> None:
    backends: list[ThreadBackend] = []

    def fn(b: ThreadBackend) -> Any:
        backends.append(b)
        b.barrier(timeout=30)
        b.barrier(timeout=0.5)

    out = run_ranks(3, fn, faults=[Fault(rank=2, at=1, action="stall")])
    assert isinstance(out[2], RankStalled)
    assert all(isinstance(out[r], DataTimeoutError) for r in (0, 1))
    assert all(b.failed for b in backends if b.rank != 2)
    # later collectives of a failed backend raise at once
    with pytest.raises(RankFailureError, match="out of step"):
        backends[0].allreduce(torch.tensor([1]), timeout=30)


def test_a_rank_that_raises_or_returns_leaves_the_world() -> None:
    def fn(b: ThreadBackend) -> Any:
        if b.rank == 0:
            raise KeyError("boom")
        if b.rank == 1:
            return "left early"
        return b.allgather_object(b.rank, timeout=30)

    out = run_ranks(3, fn)
    assert isinstance(out[0], KeyError) and out[1] == "left early"
    assert isinstance(out[2], RankFailureError)


def test_a_hang_is_reported_with_the_stacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(thread_world, "ABORT_GRACE", 0.1)
    gate = threading.Event()

    def fn(b: ThreadBackend) -> None:
        if b.rank == 1:
            gate.wait(30)  # outside any collective: no library timeout can fire

    try:
        with pytest.raises(HangError, match=r"(?s)ranks \[1\] of 2.*gate.wait"):
            run_ranks(2, fn, timeout=0.2)
    finally:
        gate.set()


def test_strict_mode_names_a_call_of_the_global_backend() -> None:
    out = run_ranks(2, lambda b: hb.get_backend())
    assert all(isinstance(e, GlobalWorldError) and "test_thread_world.py" in str(e)
               for e in out)
    assert run_all(2, lambda b: hb.get_backend().size, strict=False) == [1, 1]
    out = run_ranks(2, lambda b: hi.DistributedSampler(8).num_replicas)  # a default world
    assert all(isinstance(e, GlobalWorldError) and "sampler.py" in str(e) for e in out)


def test_a_loader_runs_on_the_world() -> None:
    ds = list(range(10))

    def fn(b: ThreadBackend) -> list[int]:
        loader = hi.DistributedLoader(ds, batch_size=2, backend=b, shuffle=False)
        return [int(i) for x in loader for i in x]

    per_rank = run_all(3, fn)
    seen = sorted(i for r in per_rank for i in r)
    assert len({len(r) for r in per_rank}) == 1
    assert set(seen) == set(range(10)) and len(seen) == 12  # padded as torch does


# -- EndOfDataSync on unequal lengths ---------------------------------------------------------


def _source(n: int, rank: int, fail_at: int | None = None) -> Any:
    for s in range(n):
        if s == fail_at:
            raise ValueError(f"bad sample on rank {rank} at step {s}")
        yield torch.full((2,), 100 * rank + s)


def _eod(lengths: list[int], uneven: str, mapstyle: bool, fail: tuple[int, int] | None = None,
         config: Any = None, timeout: float = 30.0) -> list[Any]:
    def fn(b: ThreadBackend) -> list[int]:
        r = b.rank
        fail_at = fail[1] if fail is not None and fail[0] == r else None
        sync = EndOfDataSync(_source(lengths[r], r, fail_at), b, uneven, timeout,
                             num_batches=lengths[r] if mapstyle else None,
                             config=config(r) if config else {"n": 1},
                             empty=lambda: torch.zeros(0, dtype=torch.int64))
        return [int(x[0]) if len(x) else -1 for x in sync]

    return run_ranks(len(lengths), fn)


@settings(deadline=None, max_examples=40)
@given(lengths=st.lists(st.integers(0, 5), min_size=1, max_size=4),
       uneven=st.sampled_from(["stop", "pad", "error"]), mapstyle=st.booleans())
@pytest.mark.filterwarnings("ignore:rank .* uneven='stop' ended:RuntimeWarning")
def test_end_of_data_over_unequal_lengths(lengths: list[int], uneven: str,
                                          mapstyle: bool) -> None:
    out = _eod(lengths, uneven, mapstyle)
    lo, hi_ = min(lengths), max(lengths)
    for r, got in enumerate(out):
        real = [100 * r + s for s in range(lengths[r])]
        if uneven == "stop":
            assert got == real[:lo]
        elif uneven == "pad":
            assert got == real + [-1] * (hi_ - lengths[r])
        elif lo == hi_:
            assert got == real
        else:
            assert isinstance(got, UnevenDataError), got


@settings(deadline=None, max_examples=20)
@given(length=st.integers(1, 5), world=st.integers(2, 4), data=st.data(),
       uneven=st.sampled_from(["stop", "pad", "error"]), mapstyle=st.booleans())
def test_a_rank_whose_data_raises(length: int, world: int, data: Any, uneven: str,
                                  mapstyle: bool) -> None:
    """The raising rank gets its own error at its step, the others `RankFailureError`:
    iterable data reports the failure ahead ("another rank's data raised at step k", at the
    same step); with map-style data the others learn only that the rank is gone."""
    bad = data.draw(st.integers(0, world - 1))
    at = data.draw(st.integers(0, length - 1))
    out = _eod([length] * world, uneven, mapstyle, fail=(bad, at))
    assert isinstance(out[bad], ValueError) and f"step {at}" in str(out[bad])
    for r, e in enumerate(out):
        if r != bad:
            assert isinstance(e, RankFailureError)
            assert mapstyle or f"raised at step {at} " in str(e), e


@pytest.mark.parametrize("mapstyle", [True, False])
def test_a_config_that_differs_on_one_rank_is_named_on_every_rank(mapstyle: bool) -> None:
    out = _eod([3, 3, 3], "stop", mapstyle,
               config=lambda r: {"seed": 7 if r == 1 else 0, "batch_size": 4})
    for e in out:
        assert isinstance(e, ConfigMismatchError)
        assert "seed: rank 0=0, rank 1=7, rank 2=0" in str(e) and "batch_size" not in str(e)


def test_a_stalled_rank_in_a_pass_times_the_others_out() -> None:
    def fn(b: ThreadBackend) -> Any:
        sync = EndOfDataSync(_source(20, b.rank), b, "stop", 0.5, num_batches=20)
        got = []
        for x in sync:
            if b.rank == 1 and len(got) == 3:
                b.stall()
            got.append(int(x[0]))
        return got

    out = run_ranks(2, fn)
    assert isinstance(out[1], RankStalled)
    assert isinstance(out[0], DataTimeoutError) and "waited more than 0.5 s" in str(out[0])
