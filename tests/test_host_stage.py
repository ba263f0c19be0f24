"""The host stage on a thread (horovod_iter/host_stage.py): the batches, their order, the
positions and the errors are exactly the wrapped source's, delivered at the same steps;
close() never hangs and releases the thread and the wrapped source; end to end through the
real DistributedLoader (wrapped by a subclass until the loader has its argument), every rank's
batches, state_dict() and resume equal the inline loader's.

No test measures time; a slow source is a gate (an Event) that the test opens."""
from __future__ import annotations

import collections
import gc
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from inproc_run import sharded_dataset, write_shards
from thread_world import run_all, worker_context
from torch.utils.data import Dataset, IterableDataset, TensorDataset
from toy_data import Ids

import horovod_iter as hi
from horovod_iter.fetch import FetchOptions, HostSource, _InlineSource, host_batches, plan_batches
from horovod_iter.gather import BatchFetcher
from horovod_iter.host_stage import ThreadedSource
from horovod_iter.plan import EpochPlan

pytestmark = pytest.mark.filterwarnings("ignore:rank .* uneven='stop' ended:RuntimeWarning",
                                        "ignore:rank .* the resumed epoch:RuntimeWarning")
WAIT = 30.0  # seconds a test waits for an event that must happen (a hang is a failure)


class Bad(Exception):
    pass


class Fatal(BaseException):
    """Not an Exception: must be delivered all the same."""


class Fake(HostSource):
    """``n`` batches ``tensor([k, k])``; a position ``{"consumer": 0, "state": k + 1}`` per
    batch when ``tagged``; raises ``error`` at step ``fail_at``. ``gates[k]``: next() of step
    k waits for it (a slow fetch); ``entered[k]`` is set when next() of step k begins.
    Records close() calls, their thread, and any close() while a next() runs."""

    def __init__(self, n: int, *, tagged: bool = True, fail_at: int | None = None,
                 error: BaseException | None = None, count: bool = True) -> None:
        self.n, self.i, self.fail_at = n, 0, fail_at
        self.error = error if error is not None else Bad("corrupt record")
        self.num_batches = n if count else None
        self.positions = collections.deque() if tagged else None
        self.gates: dict[int, threading.Event] = {}
        self.entered: dict[int, threading.Event] = {}
        self.calls = 0
        self.closed = 0
        self.close_threads: list[threading.Thread] = []
        self.in_next = False
        self.closed_during_next = False

    def __next__(self) -> Any:
        self.in_next = True
        try:
            k = self.i
            self.calls += 1
            if k in self.entered:
                self.entered[k].set()
            if k in self.gates:
                assert self.gates[k].wait(WAIT)
            if k == self.fail_at:
                self.i += 1
                raise self.error
            if k >= self.n:
                raise StopIteration
            self.i += 1
            if self.positions is not None:
                self.positions.append({"consumer": 0, "state": k + 1})
            return torch.tensor([k, k])
        finally:
            self.in_next = False

    def close(self) -> None:
        self.closed_during_next |= self.in_next
        self.closed += 1
        self.close_threads.append(threading.current_thread())


def drive(src: HostSource, close_after: int | None = None) -> list[Any]:
    """What a consumer sees, step by step: each batch with a snapshot of ``positions`` right
    after it was handed over (nothing popped: a position ahead of its batch would show), the
    error or the end, then whether one more next() ends ("end") or not ("more": a source may
    go on after an error; ours ends there, as the sync never asks again)."""
    events: list[Any] = []
    for step in range(10_000):
        if close_after is not None and step == close_after:
            src.close()
            events.append("closed")
        try:
            b = next(src)
        except StopIteration:
            events.append("end")
            break
        except BaseException as e:
            events.append(("error", type(e).__name__, str(e)))
            break
        pos = None if src.positions is None else list(src.positions)
        events.append(("batch", b.tolist(), pos))
    try:
        next(src)
        events.append("more")
    except StopIteration:
        events.append("end")
    return events


def threaded(src: HostSource, depth: int = 2, **kw: Any) -> tuple[ThreadedSource,
                                                                   threading.Thread]:
    ts = ThreadedSource(src, depth, **kw)
    assert ts._thread is not None
    return ts, ts._thread


def joined(t: threading.Thread) -> bool:
    t.join(WAIT)
    return not t.is_alive()


# -- the wrapped source's batches, positions and errors, at the same steps -----------------
@pytest.mark.parametrize("depth", [1, 2, 5])
@pytest.mark.parametrize("tagged", [True, False])
def test_same_batches_positions_and_end(depth: int, tagged: bool) -> None:
    want = drive(Fake(7, tagged=tagged))
    src = Fake(7, tagged=tagged)
    ts, t = threaded(src, depth)
    assert ts.num_batches == 7 and (ts.positions is None) == (not tagged)
    assert drive(ts) == want
    assert want[-2:] == ["end", "end"] and len(want) == 9
    assert joined(t) and src.closed >= 1 and not src.closed_during_next


def test_num_batches_unknown_passes_through() -> None:
    ts = ThreadedSource(Fake(3, count=False))
    assert ts.num_batches is None
    ts.close()


@pytest.mark.parametrize("error", [Bad("corrupt record"), Fatal("dataset called exit")])
@pytest.mark.parametrize("fail_at", [0, 1, 4])
def test_error_at_its_step_after_the_batches_before_it(fail_at: int,
                                                       error: BaseException) -> None:
    """Batches 0..fail_at-1, then the same exception object, then the end: never early (the
    thread made the failing batch long before), never lost."""
    src = Fake(6, fail_at=fail_at, error=error)
    src.gates[fail_at + 1] = threading.Event()  # never reached: the source ends at its error
    ts, t = threaded(src, depth=4)
    for k in range(fail_at):
        assert next(ts).tolist() == [k, k]
        assert list(ts.positions or ()) == [{"consumer": 0, "state": j + 1} for j in range(k + 1)]
    with pytest.raises(type(error)) as info:
        next(ts)
    assert info.value is error
    with pytest.raises(StopIteration):
        next(ts)
    assert joined(t) and src.calls == fail_at + 1  # nothing pulled past the error


def test_positions_never_ahead_of_their_batch() -> None:
    """With the thread far ahead (depth 5, the consumer holding back), the positions seen
    are those of the batches handed over, one each, in order."""
    src = Fake(6)
    ts, t = threaded(src, depth=5)
    never = threading.Event()
    for _ in range(int(WAIT / 0.01)):  # until the thread made all it may (5), none consumed
        if src.calls >= 5:
            break
        never.wait(0.01)
    assert src.calls == 5
    assert list(ts.positions or ()) == []  # made ahead, not handed: no position yet
    got = []
    for _ in range(6):
        next(ts)
        got.append(ts.positions.popleft())  # type: ignore[union-attr]
        assert not ts.positions  # exactly one position per handed batch
    assert got == [{"consumer": 0, "state": k + 1} for k in range(6)]
    ts.close()
    assert joined(t)


def test_depth_bounds_the_batches_made_ahead() -> None:
    """The thread waits once ``depth`` batches are made and not handed over."""
    src = Fake(20)
    src.entered[3] = threading.Event()  # next() of a 4th batch ahead: must not begin
    ts, t = threaded(src, depth=3)
    for _ in range(int(WAIT / 0.01)):
        if src.calls >= 3:
            break
        src.entered[3].wait(0.01)
    assert src.calls == 3
    assert not src.entered[3].wait(0.3)  # a negative check: never true when correct
    next(ts)  # room for one more
    assert src.entered[3].wait(WAIT)
    ts.close()
    assert joined(t)


def test_bad_depth_is_refused() -> None:
    for depth in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="depth must be an int >= 1"):
            ThreadedSource(Fake(1), depth)  # type: ignore[arg-type]


@pytest.mark.cuda
def test_the_thread_works_on_the_trainer_device() -> None:
    """Pinning and CUDA work in the thread land on the given device (torch's pin-memory
    thread sets it too), not on the thread's default device 0."""
    dev = torch.device("cuda", torch.cuda.device_count() - 1)
    seen: list[int] = []

    class Pinning(Fake):
        def __next__(self) -> Any:
            batch = super().__next__()
            seen.append(torch.cuda.current_device())
            return batch.pin_memory()

    batches = list(ThreadedSource(Pinning(3), 2, device=dev))
    assert len(batches) == 3 and all(b.is_pinned() for b in batches)
    assert set(seen) == {dev.index}


# -- close(): prompt, never hangs, releases the thread and the wrapped source ----------------
def test_close_while_the_thread_waits_for_room() -> None:
    src = Fake(50)
    ts, t = threaded(src, depth=2)
    assert next(ts).tolist() == [0, 0]
    ts.close()  # the thread is waiting for room (or finishing a batch): it exits now
    assert not t.is_alive()
    assert src.closed == 1 and src.close_threads == [threading.current_thread()]
    assert not src.closed_during_next
    with pytest.raises(StopIteration):
        next(ts)
    ts.close()  # idempotent
    assert src.closed == 1


def test_close_mid_pass_with_a_slow_source_does_not_wait_for_it() -> None:
    """The thread is stuck in a slow next(): close() returns after its bounded join, leaves
    the wrapped source's close() to the thread, which calls it once its next() returns -
    never while it runs."""
    src = Fake(10)
    src.gates[3] = threading.Event()
    src.entered[3] = threading.Event()
    ts, t = threaded(src, depth=4, join_timeout=0.05)
    for k in range(3):
        assert next(ts).tolist() == [k, k]
    assert src.entered[3].wait(WAIT)
    ts.close()
    assert t.is_alive() and src.closed == 0  # still inside next(): not closed under it
    with pytest.raises(StopIteration):
        next(ts)
    src.gates[3].set()
    assert joined(t)
    assert src.closed == 1 and src.close_threads == [t] and not src.closed_during_next
    assert src.calls == 4  # nothing fetched after the stop


def test_close_before_any_next() -> None:
    src = Fake(5)
    ts, t = threaded(src)
    ts.close()
    assert joined(t) and src.closed == 1


def test_a_source_dropped_without_close_stops_its_thread() -> None:
    """The iterator's __del__ drops things without closing them: the thread must not keep
    the source (and its batches) alive, and must end."""
    src = Fake(50)
    ts, t = threaded(src, depth=2)
    next(ts)
    del ts
    gc.collect()
    assert joined(t)
    assert src.calls <= 4


@settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(0, 9), depth=st.integers(1, 4), tagged=st.booleans(), data=st.data())
def test_any_length_error_and_close_point(n: int, depth: int, tagged: bool,
                                          data: st.DataObject) -> None:
    """Whatever the length, error step and close point: the events up to the close are the
    inline source's, the next() after a close ends, the wrapped source is closed exactly
    once (never during its next()), and the thread ends."""
    fail_at = data.draw(st.none() | st.integers(0, n), label="fail_at")
    close_after = data.draw(st.none() | st.integers(0, n + 1), label="close_after")
    want = drive(Fake(n, tagged=tagged, fail_at=fail_at))
    src = Fake(n, tagged=tagged, fail_at=fail_at)
    ts, t = threaded(src, depth)
    got = drive(ts, close_after)
    if "closed" in got:
        k = got.index("closed")
        assert got[:k] == want[:k] and got[k + 1:] == ["end", "end"]
    else:  # the same up to the end or the error; after an error the source ends
        assert got[:-1] == want[:-1] and got[-1] == "end"
    ts.close()
    assert joined(t)
    assert src.closed == 1 and not src.closed_during_next


# -- the real sources ------------------------------------------------------------------------
def reusing_source(n: int = 64, bs: int = 4) -> tuple[HostSource, BatchFetcher]:
    """The inline fetch path with CPU buffer reuse on (the loader's reuse_cpu_buffers)."""
    ds = TensorDataset(torch.arange(n * 6, dtype=torch.int64).view(n, 6))
    plan = EpochPlan(n=n, world=1, rank=0, seed=0, epoch=0, shuffle=False)
    arrays, count = plan_batches(plan, 0, bs, False)
    fetcher = BatchFetcher(ds, None, False, 0, reuse=True)
    return _InlineSource(arrays, count, fetcher), fetcher


def expected(step: int, bs: int = 4) -> torch.Tensor:
    return torch.arange(step * bs * 6, (step + 1) * bs * 6).view(bs, 6)


def test_reused_buffers_are_never_overwritten_under_the_thread() -> None:
    """The gather reuses a CPU buffer once nothing refers to it: with the thread making
    batches while the trainer holds, views, scribbles on and drops others, every batch the
    trainer kept still holds its own values (tests/test_fetch.py's poison test, threaded)."""
    for depth in (1, 2, 4):
        src, fetcher = reusing_source()
        ts = ThreadedSource(src, depth)
        kept, views = [], []
        for step, (x,) in enumerate(ts):
            if step % 3 == 0:
                kept.append((step, x))
            elif step % 3 == 1:
                views.append((step, x[1:3], x.numpy()))
            else:
                x.fill_(-1)  # ours to scribble on: dropped right after
            del x
        ts.close()
        assert fetcher.buffers is not None and fetcher.buffers.reuses > 0  # else proves nothing
        for step, x in kept:
            assert torch.equal(x, expected(step)), (depth, step)
        for step, v, a in views:
            assert torch.equal(v, expected(step)[1:3]), (depth, step)
            assert np.array_equal(a, expected(step).numpy()), (depth, step)


class Stream(IterableDataset):
    """A stateful stream (torchdata's protocol) of ``n`` ids; raises at ``raise_at``."""

    def __init__(self, n: int, raise_at: int | None = None) -> None:
        self.n, self.raise_at = n, raise_at
        self.pos = 0

    def __iter__(self) -> Any:
        while self.pos < self.n:
            i = self.pos
            if i == self.raise_at:
                raise KeyError(f"corrupt record {i}")
            self.pos += 1
            yield i

    def state_dict(self) -> dict[str, int]:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.pos = state["pos"]


@pytest.mark.parametrize("raise_at", [None, 9])
def test_iterable_source_positions_and_error_equal_inline(raise_at: int | None) -> None:
    """A DataLoader over iterable data at 0 workers (positions taken in the thread, where
    the dataset yields): the same batches, positions and error at the same step."""
    def source() -> HostSource:
        return host_batches(Stream(23, raise_at), FetchOptions(3, collate_fn=torch.tensor))

    want = drive(source())
    assert drive(ThreadedSource(source(), 3)) == want
    assert (want[-2][0] == "error") if raise_at else (want[-2] == "end")
    assert sum(e[0] == "batch" for e in want) == (3 if raise_at else 8)


class Slow(Dataset):
    """Ids; samples from ``slow_from`` on take ``delay`` s (in a DataLoader worker)."""

    def __init__(self, n: int, slow_from: int, delay: float) -> None:
        self.n, self.slow_from, self.delay = n, slow_from, delay

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if i >= self.slow_from:
            import time
            time.sleep(self.delay)
        return torch.tensor(i)


def test_torch_dataloader_workers_closed_from_the_thread() -> None:
    """A torch DataLoader iterator with worker processes tolerates its close() (the workers'
    shutdown) from our thread, after the thread's slow next() returned: no hang, no worker
    left."""
    plan = EpochPlan(n=40, world=1, rank=0, seed=0, epoch=0, shuffle=False)
    opts = FetchOptions(4, num_workers=2, multiprocessing_context=worker_context(),
                        prefetch_factor=1)
    src = host_batches(Slow(40, 8, 0.3), opts, indices=plan_batches(plan, 0, 4, False))
    it = src._it  # type: ignore[attr-defined]
    workers = list(it._workers)
    ts, t = threaded(src, depth=2, join_timeout=0.01)
    assert next(ts).tolist() == [0, 1, 2, 3]
    assert next(ts).tolist() == [4, 5, 6, 7]
    ts.close()  # the thread waits in next() for a slow batch: closes the workers after
    assert joined(t)
    for w in workers:
        w.join(WAIT)
        assert not w.is_alive()
    assert it._shutdown


# -- end to end: the real DistributedLoader, the thread wrapped by a subclass --------------------
class ThreadedLoader(hi.DistributedLoader):
    """What the loader's proposed ``fetch_thread=True`` does in ``_start``."""

    def _start(self, *args: Any) -> Any:
        pass_, source, options = super()._start(*args)
        return pass_, ThreadedSource(source, max(1, self.prefetch), device=self.device), options


def run_loader(b: Any, make: Any, thread: bool, *, batch: int, uneven: str = "stop",
               stop_after: int | None = None, state_in: Any = None,
               epochs: tuple[int, ...] = (0,), **kw: Any) -> dict[str, Any]:
    cls = ThreadedLoader if thread else hi.DistributedLoader
    loader = cls(make(b), batch_size=batch, uneven=uneven, backend=b, timeout=60, **kw)
    if state_in is not None:
        loader.load_state_dict(state_in)
    out: dict[str, Any] = {"batches": [], "state": None, "error": None}
    try:
        for epoch in epochs:
            loader.set_epoch(epoch)
            it = iter(loader)
            for step, x in enumerate(it):
                assert isinstance(it._source, ThreadedSource) == thread
                out["batches"].append((epoch, x.tolist()))
                if stop_after is not None and step + 1 == stop_after:
                    state = json.loads(json.dumps(loader.state_dict()))
                    state.pop("messages")  # the heartbeat count depends on the step rate
                    out["state"] = state
                    break
    except Exception as e:
        out["error"] = (type(e).__name__, str(e))
    return out


def both(world: int, make: Any, **kw: Any) -> list[dict[str, Any]]:
    """Every rank's run inline and with the thread: must be equal."""
    inline = run_all(world, lambda b: run_loader(b, make, False, **kw))
    thread = run_all(world, lambda b: run_loader(b, make, True, **kw))
    assert thread == inline
    return inline


def resumed(res: list[dict[str, Any]]) -> Any:
    return res[0]["state"] | {"messages": 0}


@pytest.mark.parametrize("world", [1, 3])
@pytest.mark.parametrize("uneven", ["stop", "pad"])
def test_map_style_batches_state_and_resume_equal_inline(world: int, uneven: str) -> None:
    def make(b: Any) -> Any:
        return Ids(37)

    full = both(world, make, batch=4, uneven=uneven, epochs=(0, 1))
    assert full[0]["error"] is None
    cut = both(world, make, batch=4, uneven=uneven, stop_after=3)
    assert cut[0]["state"] is not None
    assert all(r["state"] == cut[0]["state"] for r in cut)
    rest = both(world, make, batch=4, uneven=uneven, state_in=resumed(cut))
    for r in range(world):  # the cut pass and its resumption make the full epoch
        epoch0 = [x for e, x in full[r]["batches"] if e == 0]
        assert [x for _, x in cut[r]["batches"]] + [x for _, x in rest[r]["batches"]] == epoch0


@pytest.mark.parametrize("world", [1, 2])
def test_sharded_stream_state_and_resume_equal_inline(world: int, tmp_path: Path) -> None:
    """Iterable data whose positions the sync pulls ahead of the steps: state_dict() mid-pass
    (a collective of every consumer's position) and its resumption equal the inline loader's."""
    write_shards(tmp_path, [7, 5, 9, 3, 6])

    def make(b: Any) -> Any:
        return sharded_dataset(b, {"dir": str(tmp_path), "buffer": 8})

    kw: dict[str, Any] = {"batch": 3, "uneven": "pad", "collate_fn": torch.tensor}
    full = both(world, make, **kw)
    cut = both(world, make, stop_after=4, **kw)
    assert all(r["state"] is not None for r in cut)
    rest = both(world, make, state_in=resumed(cut), **kw)
    seen = sorted(i for res in (cut, rest) for r in res for _, x in r["batches"] for i in x)
    assert seen == sorted(i for r in full for _, x in r["batches"] for i in x)
    assert sorted(set(seen)) == seen  # pad: every record once, none twice


@pytest.mark.parametrize("where", ["map", "iterable"])
def test_dataset_errors_at_the_same_step_on_every_rank(where: str) -> None:
    class Raising(Dataset):
        def __len__(self) -> int:
            return 40

        def __getitem__(self, i: int) -> torch.Tensor:
            if i == 21:
                raise KeyError(f"corrupt record {i}")
            return torch.tensor(i)

    def make(b: Any) -> Any:
        return Raising() if where == "map" else Stream(30, raise_at=13 + b.rank)

    kw: dict[str, Any] = {"collate_fn": torch.tensor} if where == "iterable" else {}
    res = both(2, make, batch=2, shuffle=False, **kw) if where == "map" else \
        both(2, make, batch=2, **kw)
    assert all(r["error"] is not None for r in res)


@settings(deadline=None, max_examples=12, suppress_health_check=[HealthCheck.too_slow])
@given(world=st.integers(1, 3), n=st.integers(1, 30), batch=st.integers(1, 5),
       uneven=st.sampled_from(["stop", "pad"]), stop_after=st.none() | st.integers(1, 6),
       prefetch=st.integers(0, 3))
def test_any_configuration_equals_inline(world: int, n: int, batch: int, uneven: str,
                                         stop_after: int | None, prefetch: int) -> None:
    def make(b: Any) -> Any:
        return Ids(n)

    res = both(world, make, batch=batch, uneven=uneven, stop_after=stop_after,
               prefetch=prefetch)
    if stop_after is not None and res[0]["state"] is not None:
        both(world, make, batch=batch, uneven=uneven, prefetch=prefetch,
             state_in=resumed(res))


def test_the_loader_argument_fetch_thread_gives_the_inline_batches_and_state():
    """``DistributedLoader(fetch_thread=True)``: the same batches and the same resume as
    inline, on 2 thread-world ranks; refused with workers."""
    from thread_world import run_ranks
    from toy_data import Ids

    def fn(b):
        out = []
        for thread in (False, True):
            loader = hi.DistributedLoader(Ids(23), batch_size=3, backend=b, uneven="pad",
                                          fetch_thread=thread)
            it = iter(loader)
            head = [next(it).tolist() for _ in range(2)]
            state = loader.state_dict()
            loader.close()
            again = hi.DistributedLoader(Ids(23), batch_size=3, backend=b, uneven="pad",
                                         fetch_thread=thread)
            again.load_state_dict(state)
            out.append((head, [x.tolist() for x in again]))
        return out

    for inline, threaded in run_ranks(2, fn, timeout=60):
        assert inline == threaded
    with pytest.raises(ValueError, match="fetch_thread=True"):
        hi.DistributedLoader(Ids(4), num_workers=2, fetch_thread=True)
