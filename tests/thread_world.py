"""N ranks as threads in one process, behind the library's real `Backend` interface.

How torch tests its own collectives: every rank is a thread holding its own `ThreadBackend`,
and the ranks' collectives meet at a shared table keyed by each rank's collective sequence
number (the n-th collective of every rank pairs with the n-th of the others, as under
Horovod and gloo). Collectives are asynchronous: a rank may have several in flight, and
nothing forces the ranks into lockstep. Handles are real `AsyncHandle`s, so the library's
bounded waits, its timeouts (`DataTimeoutError`) and its failure marking (`RankFailureError`,
`Backend.failed`) run unchanged.

Faults, as a launched job sees them:

* a rank that *dies* (its ``fn`` raised, returned, or `Fault` ``"die"`` fired): every
  collective it never joined fails on the peers at once, as gloo's closed connection does
  (the library raises `RankFailureError`);
* a rank that *stalls* (``backend.stall()``, or `Fault` ``"stall"``): it stays silent, so the
  peers wait their ``timeout`` and raise the library's `DataTimeoutError`; the stalled thread
  is released (it raises `RankStalled`) when the others are done;
* collectives that do not match (an allreduce paired with a gather, other shapes or ops) fail
  on every rank in them, where a real backend would hang or corrupt.

Strict mode (default): while `run_ranks` runs, a call of the process-global
``get_backend()`` from a rank thread raises `GlobalWorldError` naming the call site: such
code ignores the injected backend, and would see one rank of a world of one.

Example:
    ```python
    def rank_fn(b):
        loader = hi.DistributedLoader(ds, batch_size=2, backend=b)
        return [x.tolist() for x in loader]

    per_rank = run_all(3, rank_fn)
    ```
"""
from __future__ import annotations

import dataclasses
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

import horovod_iter.backend as hb
from horovod_iter.backend import AsyncHandle, Backend

__all__ = ["Fault", "GlobalWorldError", "HangError", "RankDied", "RankStalled", "ThreadBackend",
           "ThreadWorld", "run_all", "run_ranks", "worker_context"]

#: seconds a timed-out run waits for its threads to unwind after failing their collectives
ABORT_GRACE = 5.0
_REDUCE = {"sum": lambda t: t.sum(0), "min": lambda t: t.min(0).values,
           "max": lambda t: t.max(0).values}


class RankStalled(BaseException):
    """Raised in a stalled rank's thread once the run is over (unwinds it)."""


class RankDied(BaseException):
    """Raised in a rank's thread by `Fault` ``"die"``: it ends at once, like a killed process
    (a BaseException, so that no ``except Exception`` of the library catches it)."""


class GlobalWorldError(AssertionError):
    """A rank thread called the process-global ``get_backend()``: that code path ignores the
    injected backend (strict mode)."""


class HangError(AssertionError):
    """`run_ranks` ran past its timeout; carries the hung threads' stacks."""


@dataclasses.dataclass(frozen=True)
class Fault:
    """Fire ``action`` on ``rank`` when it starts its ``at``-th collective (0-based): ``"die"``
    (the rank ends, peers fail fast) or ``"stall"`` (the rank goes silent, peers time out)."""

    rank: int
    at: int
    action: str = "die"

    def __post_init__(self) -> None:
        if self.action not in ("die", "stall"):
            raise ValueError(f"Fault action must be 'die' or 'stall', got {self.action!r}")


class _Slot:
    """One collective: every rank's contribution under one sequence number."""

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.kinds: dict[int, tuple[Any, ...]] = {}
        self.parts: dict[int, Any] = {}
        self.result: Any = None
        self.error: str | None = None
        self.complete = False
        self.collected = 0


class ThreadWorld:
    """The shared table of ``size`` thread ranks; ``backends[r]`` is rank ``r``'s backend."""

    def __init__(self, size: int, *, local_size: int | None = None,
                 faults: Sequence[Fault] = ()) -> None:
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be an int >= 1, got {size!r}")
        self.size = size
        self.local_size = size if local_size is None else local_size
        if size % self.local_size:
            raise ValueError(f"local_size={self.local_size} must divide size={size}")
        self._cond = threading.Condition()
        self._slots: dict[int, _Slot] = {}
        self.gone: dict[int, str] = {}        # rank -> why it left (died, raised, returned)
        self.stalled: set[int] = set()
        self.aborted: str | None = None
        self.released = threading.Event()     # set when the run is over: stalled ranks unwind
        self.faults = {(f.rank, f.at): f.action for f in faults}
        #: call sites (file:line function) of get_backend() from rank threads (strict mode)
        self.global_calls: list[str] = []
        self.backends = [ThreadBackend(self, r) for r in range(size)]

    # -- the table --------------------------------------------------------------------
    def _contribute(self, rank: int, seq: int, kind: tuple[Any, ...], part: Any) -> _Slot:
        with self._cond:
            slot = self._slots.get(seq)
            if slot is None:
                slot = self._slots[seq] = _Slot(seq)
            slot.kinds[rank] = kind
            slot.parts[rank] = part
            if len(slot.parts) == self.size:
                self._complete(slot)
                self._cond.notify_all()
            return slot

    def _complete(self, slot: _Slot) -> None:
        kinds = set(slot.kinds.values())
        if len(kinds) > 1:
            slot.error = (f"collective #{slot.seq} does not match across ranks: " + ", ".join(
                f"rank {r} {slot.kinds[r]}" for r in sorted(slot.kinds)))
        else:
            (kind,) = kinds
            try:
                slot.result = self._compute(kind, slot.parts)
            except Exception as e:  # shapes or dtypes differ
                slot.error = f"collective #{slot.seq} {kind}: {type(e).__name__}: {e}"
        slot.complete = True

    def _compute(self, kind: tuple[Any, ...], parts: Mapping[int, Any]) -> Any:
        if kind[0] == "allreduce":
            stacked = torch.stack([parts[r] for r in range(self.size)])
            return _REDUCE[kind[1]](stacked)
        if kind[0] == "broadcast":
            return parts[kind[1]]
        return [parts[r] for r in range(self.size)]

    def _ready(self, slot: _Slot) -> bool:
        return slot.complete or self.aborted is not None or any(
            r not in slot.parts for r in self.gone)

    def _collect(self, slot: _Slot, rank: int) -> Any:
        with self._cond:  # a wait without timeout collects at once: block here
            self._cond.wait_for(lambda: self._ready(slot))
        if not slot.complete:
            why = self.aborted or "; ".join(
                f"rank {r} {w}" for r, w in sorted(self.gone.items()) if r not in slot.parts)
            raise ConnectionError(f"collective #{slot.seq} cannot complete: {why}")
        with self._cond:
            slot.collected += 1
            if slot.collected == self.size:
                self._slots.pop(slot.seq, None)
        if slot.error is not None:
            raise RuntimeError(slot.error)
        result = slot.result
        return result.clone() if isinstance(result, torch.Tensor) else result

    # -- faults -----------------------------------------------------------------------
    def leave(self, rank: int, why: str) -> None:
        """Rank ``rank`` is gone (died, raised, or returned): collectives it never joined
        fail on the others."""
        with self._cond:
            self.gone.setdefault(rank, why)
            self._cond.notify_all()

    def abort(self, why: str) -> None:
        """Fail every collective in flight and to come (the run is being torn down)."""
        with self._cond:
            self.aborted = why
            self._cond.notify_all()
        self.released.set()

    def _stall(self, rank: int) -> None:
        with self._cond:
            self.stalled.add(rank)
        self.released.wait()
        raise RankStalled(f"rank {rank} stalled")


class ThreadBackend(Backend):
    """Rank ``rank`` of a `ThreadWorld`: a real `Backend` whose raw collectives meet at the
    world's table. Pass it as ``backend=`` wherever the library takes one."""

    name = "thread"

    def __init__(self, world: ThreadWorld, rank: int) -> None:
        super().__init__()
        self.world = world
        self._rank = rank
        self._seq = 0

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self.world.size

    @property
    def local_rank(self) -> int:
        return self._rank % self.world.local_size

    @property
    def local_size(self) -> int:
        return self.world.local_size

    def stall(self) -> None:
        """Stop participating (a hung rank): block until the run is over, then unwind."""
        self.world._stall(self._rank)

    def die(self) -> None:
        """End this rank at once, like a killed process: peers' collectives it never joins
        fail fast; its thread unwinds with `RankDied`."""
        self.world.leave(self._rank, "died (killed)")
        raise RankDied(f"rank {self._rank} died")

    def _meet(self, kind: tuple[Any, ...], part: Any) -> AsyncHandle:
        seq, self._seq = self._seq, self._seq + 1
        action = self.world.faults.get((self._rank, seq))
        if action == "stall":
            self.stall()
        if action == "die":
            self.world.leave(self._rank, f"died at its collective #{seq} (injected)")
            raise RankDied(f"rank {self._rank} died at its collective #{seq} (injected)")
        if self._rank in self.world.gone:
            raise RankDied(f"rank {self._rank} is gone: {self.world.gone[self._rank]}")
        return _ThreadHandle(self, self.world._contribute(self._rank, seq, kind, part))

    def _allreduce(self, tensor: torch.Tensor, op: str) -> AsyncHandle:
        return self._meet(("allreduce", op, tuple(tensor.shape), str(tensor.dtype)),
                           tensor.detach().clone())

    def _broadcast_bytes(self, payload: bytes, root: int) -> AsyncHandle:
        return self._meet(("broadcast", root), bytes(payload))

    def _allgather_bytes(self, payload: bytes) -> AsyncHandle:
        return self._meet(("allgather",), bytes(payload))


class _ThreadHandle(AsyncHandle):
    def __init__(self, backend: ThreadBackend, slot: _Slot) -> None:
        super().__init__(backend)
        self._world = backend.world
        self._rank = backend.rank
        self._slot = slot

    def _ready(self) -> bool:
        return self._world._ready(self._slot)

    def _collect(self) -> Any:
        return self._world._collect(self._slot, self._rank)


# -- strict mode: get_backend() from a rank thread ------------------------------------------
_rank_of = threading.local()


def _guarded_get_backend(original: Callable[[], Backend]) -> Callable[[], Backend]:
    def get_backend() -> Backend:
        world: ThreadWorld | None = getattr(_rank_of, "world", None)
        if world is None:
            return original()
        frame = sys._getframe(1)
        path = "/".join(frame.f_code.co_filename.rsplit("/", 2)[-2:])
        site = f"{path}:{frame.f_lineno} ({frame.f_code.co_name})"
        with world._cond:
            world.global_calls.append(site)
        raise GlobalWorldError(
            f"rank {_rank_of.rank} of a thread world called the process-global get_backend() "
            f"at {site}: this path ignores the injected backend; pass rank=/num_replicas= (or "
            "backend=) explicitly, or run_ranks(..., strict=False)")

    get_backend.__wrapped__ = original  # type: ignore[attr-defined]
    return get_backend


def _patch_get_backend() -> list[tuple[Any, Any]]:
    """Replace every module's reference to ``get_backend`` (``from .backend import
    get_backend`` binds it per module) with the guard; returns what to restore."""
    original = hb.get_backend
    while hasattr(original, "__wrapped__"):
        original = original.__wrapped__
    guard = _guarded_get_backend(original)
    restore = []
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "horovod_iter" or name.startswith("horovod_iter.")):
            continue
        if getattr(module, "get_backend", None) is original:
            restore.append((module, original))
            vars(module)["get_backend"] = guard
    return restore


# -- DataLoader workers ----------------------------------------------------------------------
_worker_ctx: Any = None


def worker_context() -> Any:
    """The ``multiprocessing_context`` for DataLoader workers in a thread world: a forkserver
    with torch and the library preloaded (about 2 s once, then ~0.05 s a worker). A plain
    fork from a process whose other rank threads are running copies their held locks, and
    stalls a worker for torch's 5 s status interval about every second pass."""
    global _worker_ctx
    if _worker_ctx is None:
        import multiprocessing

        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "horovod_iter", "thread_world", "toy_data"])
        _worker_ctx = ctx
    return _worker_ctx


# -- the runner ---------------------------------------------------------------------------
def run_ranks(n: int, fn: Callable[[ThreadBackend], Any], *, timeout: float = 60.0,
              faults: Sequence[Fault] = (), strict: bool = True,
              world: ThreadWorld | None = None) -> list[Any]:
    """Run ``fn(backend)`` on ``n`` rank threads; return each rank's result or the exception
    it raised (`RankStalled`/`RankDied` for the injected faults), indexed by rank.

    A rank whose ``fn`` raises or returns leaves the world (its peers' later collectives
    fail fast, as after a process exit). Raises `HangError`, with every hung thread's
    stack, if the ranks are not done within ``timeout`` s (a hang is a bug: the library's
    own timeouts should have fired)."""
    w = world if world is not None else ThreadWorld(n, faults=faults)
    if w.size != n:
        raise ValueError(f"world has {w.size} ranks, asked for {n}")
    results: list[Any] = [None] * n

    def body(rank: int) -> None:
        _rank_of.world, _rank_of.rank = w, rank
        try:
            results[rank] = fn(w.backends[rank])
            w.leave(rank, "returned (its process ended)")
        except BaseException as e:  # reported per rank
            results[rank] = e
            w.leave(rank, f"raised {type(e).__name__}: {e}")
        finally:
            _rank_of.world = None

    restore = _patch_get_backend() if strict else []
    threads = [threading.Thread(target=body, args=(r,), name=f"thread-world-rank{r}",
                                daemon=True) for r in range(n)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + timeout
        for r, t in enumerate(threads):
            if r in w.stalled:
                continue
            while t.is_alive() and r not in w.stalled and time.monotonic() < deadline:
                t.join(0.05)
        hung = [r for r, t in enumerate(threads) if t.is_alive() and r not in w.stalled]
        if hung:
            frames = sys._current_frames()
            stacks = "\n".join(
                f"--- rank {r} ---\n" + "".join(traceback.format_stack(frames[t.ident]))
                for r, t in enumerate(threads) if r in hung and t.ident in frames)
            w.abort(f"run_ranks timed out after {timeout} s")
            _join(threads, ABORT_GRACE)  # those in a collective unwind; others stay (daemons)
            raise HangError(f"ranks {hung} of {n} still running after {timeout} s "
                            f"(stalled: {sorted(w.stalled)}):\n{stacks}")
        w.released.set()
        _join(threads, 10.0)
    finally:
        w.released.set()
        for module, original in restore:
            vars(module)["get_backend"] = original
    return results


def _join(threads: Sequence[threading.Thread], within: float) -> None:
    deadline = time.monotonic() + within
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))


def run_all(n: int, fn: Callable[[ThreadBackend], Any], **kwargs: Any) -> list[Any]:
    """`run_ranks`, but raise the first rank's exception (naming the rank) if any raised."""
    results = run_ranks(n, fn, **kwargs)
    for r, v in enumerate(results):
        if isinstance(v, BaseException):
            raise AssertionError(f"rank {r} of {n} raised {type(v).__name__}: {v}") from v
    return results
