"""Rank, size and the few collectives horovod_iter needs, over Horovod, torch.distributed or
a single process.

The rest of the library talks only to `Backend`, so the same sampler and loader run
unchanged under ``horovodrun``, ``torchrun`` and plain ``python``.

Collectives offered (and nothing more): allreduce of a small integer tensor (sum, min, max),
blocking or asynchronous; ``broadcast_object``; ``allgather_object``; ``barrier``. Every wait
is bounded (the loader's ``timeout``, else ``HOROVOD_ITER_TIMEOUT``) and raises only our errors.

Teardown (torchtitan's rule: destroy process groups only after a clean run): a collective of
ours that timed out, failed or was left unmatched marks the backend *failed*. At exit a failed
(or still busy) backend abandons its groups instead of destroying them - destroying a gloo
group joins its worker threads, which wait on the dead rank for the group timeout, and
Horovod's shutdown joins its background thread likewise. Under Horovod a failed process that
is ending on an uncaught exception leaves with ``os._exit`` (status 1) after flushing its
output, ahead of Horovod's own exit handlers.
The Horovod and torch.distributed backends live in `backend_horovod` and
`backend_torch`, imported only when chosen. This module imports nothing of the
library but `errors` and `_tree`.
"""
from __future__ import annotations

import atexit
import importlib
import logging
import os
import pickle
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any, Callable

import torch

from ._tree import concat_rows, tree_map
from .errors import BackendError, DataTimeoutError, HorovodIterError, RankFailureError

__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "DEFAULT_TIMEOUT",
    "AsyncHandle",
    "Backend",
    "ChainHandle",
    "gather_rows",
    "get_backend",
    "init",
    "shutdown",
]

#: Environment variable that overrides backend auto-detection.
BACKEND_ENV = "HOROVOD_ITER_BACKEND"
#: Backend names accepted by `init()`.
BACKENDS = ("horovod", "torch", "local")
_OPS = ("sum", "min", "max")
#: seconds a collective of ours waits when no loader says otherwise (``HOROVOD_ITER_TIMEOUT``)
DEFAULT_TIMEOUT = float(os.environ.get("HOROVOD_ITER_TIMEOUT", "300"))
# Environment variables set by horovodrun (gloo), mpirun (Open MPI, MPICH/Intel MPI, PMIx).
_HOROVOD_ENV = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


_FOREVER = None


class AsyncHandle(ABC):
    """A collective in flight; ``wait`` returns its result.

    Every wait of the library goes through here, bounded by a timeout: a wait that times out
    or fails records the failure on the backend (`Backend.fail`), so that later collectives
    raise at once and the exit path does not wait on the dead ranks."""

    def __init__(self, backend: Backend | None = None) -> None:
        self._backend = backend
        self._finished = False
        self._value: Any = None
        self._error: BaseException | None = None  # the backend's own error, kept for wait()

    @abstractmethod
    def _ready(self) -> bool:
        """True once the result can be collected without blocking (may raise the backend's
        own error: a chained handle collects its first half here)."""

    @abstractmethod
    def _collect(self) -> Any:
        """The result (called once ``_ready``); may raise the backend's own error."""

    def _poll(self) -> bool:
        """``_ready``, with any error it raises kept for `wait` to report (True then)."""
        if self._error is None:
            try:
                return bool(self._ready())
            except Exception as e:  # a rank died between the halves, or the group broke
                self._error = e
        return True

    def done(self) -> bool:
        """True once the result is ready (``wait`` will not block; it may raise)."""
        return self._finished or self._poll()

    def wait(self, timeout: float | None = _FOREVER, what: str = "an allreduce") -> Any:
        """Block until the result is ready; raise `DataTimeoutError` after ``timeout`` s
        (``None``: no limit) and `RankFailureError` if the collective failed - in either
        half of a chained one, while polling or while collecting."""
        if not self._finished:
            b = self._backend
            if b is not None:
                b.await_connection(timeout, what)
            if not poll_until(self._poll, timeout):
                assert b is not None
                err = timeout_error(b, what, timeout)
                b.fail(str(err))
                raise err
            try:
                if self._error is not None:
                    raise self._error
                self._value = self._collect()
            except Exception as e:
                self._error = e
                failure = e if b is None else b.failed_with(what, e)
                if failure is e:
                    raise
                raise failure from e
            self._finished = True
        return self._value


class ChainHandle(AsyncHandle):
    """A size exchange, then the payload exchange it sizes (object collectives): ``second``
    makes the second collective from the first one's result, once that is ready."""

    def __init__(self, backend: Backend, first: AsyncHandle,
                 second: Callable[[Any], AsyncHandle]) -> None:
        super().__init__(backend)
        self._first: AsyncHandle | None = first
        self._make_second = second
        self._second: AsyncHandle | None = None

    def _ready(self) -> bool:
        if self._second is None:
            assert self._first is not None
            if not self._first._ready():
                return False
            self._second = self._make_second(self._first._collect())
            self._first = None
        return self._second._ready()

    def _collect(self) -> Any:
        assert self._second is not None
        return self._second._collect()


class _DoneHandle(AsyncHandle):
    def __init__(self, result: Any) -> None:
        super().__init__()
        self._value, self._finished = result, True

    def _ready(self) -> bool:
        return True

    def _collect(self) -> Any:
        return self._value


def poll_until(done: Callable[[], bool], timeout: float | None) -> bool:
    """Spin-then-sleep until ``done()``; False if ``timeout`` seconds pass first."""
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = 0.0
    while not done():
        if deadline is not None and time.monotonic() >= deadline:
            return False
        if delay:
            time.sleep(delay)
        delay = min(max(delay * 2, 2e-5), 1e-3)
    return True


def timeout_error(backend: Backend, what: str, timeout: float | None) -> DataTimeoutError:
    return DataTimeoutError(
        f"rank {backend.rank} of {backend.size} ({backend.name} backend) waited more than "
        f"{timeout} s for {what}: another rank is stalled, has died, or stopped iterating "
        "early. Check the other ranks' logs; raise `timeout` if they are just slow."
    )


def dumps(obj: Any) -> bytes:
    """Pickle for an object collective: by reference where possible (a class of the script
    arrives as the same class on every rank), by value (cloudpickle) where pickle cannot."""
    try:
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, AttributeError, TypeError):
        import cloudpickle  # Horovod's own dependency; without it the error above stands

        return bytes(cloudpickle.dumps(obj))


class Backend(ABC):
    """Rank facts and the library's collectives. Obtain one with `init()`.

    Subclasses implement the raw operations (``_allreduce``, ``_allgather_bytes``,
    ``_broadcast_bytes``); this class bounds every wait with a timeout, turns the backend's
    own errors into ours, and keeps the one *failed* fact that the exit path reads: after a
    collective of ours timed out, failed, or was left unmatched, the ranks' collectives are
    out of step - later ones raise at once, and at exit the group is abandoned instead of
    destroyed (destroying it would join threads that wait on the dead ranks).
    """

    name: str = ""

    def __init__(self) -> None:
        self._failure: str | None = None
        self._closed = False
        self._pending: list[AsyncHandle] = []  # issued, never waited (complete by themselves)
        self._inflight: list[AsyncHandle] = []  # every collective issued, until it is done

    @property
    @abstractmethod
    def rank(self) -> int:
        """This process's global rank."""

    @property
    @abstractmethod
    def size(self) -> int:
        """Number of ranks."""

    @property
    @abstractmethod
    def local_rank(self) -> int:
        """Rank among the processes on this host."""

    @property
    @abstractmethod
    def local_size(self) -> int:
        """Number of processes on this host."""

    # -- failure and exit -------------------------------------------------------------
    @property
    def failed(self) -> str | None:
        """Why the ranks' collectives are out of step (None while they are not)."""
        return self._failure

    def fail(self, reason: str) -> None:
        """Record that a collective of ours failed, timed out, or was left unmatched: later
        collectives raise `RankFailureError` at once, and the exit path abandons the group."""
        if self._failure is None:
            self._failure = reason
            self._on_failure()

    def _on_failure(self) -> None:  # noqa: B027 - optional hook
        """Called once, when the backend first fails."""

    def await_connection(self, timeout: float | None, what: str) -> None:  # noqa: B027
        """Wait (at most ``timeout`` s) until this process's group is connected, before a
        collective's own ``timeout`` starts: connecting grows with the hosts' distance and
        number, and must not eat the first message's time. Most backends are connected from
        the start."""

    def failed_with(self, what: str, error: Exception) -> HorovodIterError:
        """Mark the backend failed by ``error`` (raised while starting or finishing ``what``)
        and return the error to raise: ours as it is, the backend's own as `failure_error`."""
        failure = (error if isinstance(error, HorovodIterError)
                   else self.failure_error(what, error))
        self.fail(str(failure))
        return failure

    def _begin(self, what: str, start: Callable[[], AsyncHandle]) -> AsyncHandle:
        """Issue a collective; an error while issuing it is a failure like one while waiting
        (the ranks' collectives are out of step)."""
        self._guard(what)
        try:
            handle = start()
        except Exception as e:
            failure = self.failed_with(what, e)
            if failure is e:
                raise
            raise failure from e
        # tracked until done; the ones waited for leave at once, the rest when polled
        self._inflight = [h for h in self._inflight if not h._finished]
        if len(self._inflight) >= 256:
            self._inflight = [h for h in self._inflight if not h.done()]
        self._inflight.append(handle)
        return handle

    def failure_error(self, what: str, cause: BaseException) -> RankFailureError:
        """Our error for the backend's own exception ``cause`` (kept as ``__cause__``)."""
        return RankFailureError(
            f"rank {self.rank} of {self.size} ({self.name} backend): {what} failed, most "
            f"likely because another rank died or raised: {type(cause).__name__}: {cause}")

    def _guard(self, what: str) -> None:
        if self._closed:
            raise BackendError(
                f"{what}: the {self.name} backend of this loader was shut down "
                "(horovod_iter.shutdown()); call horovod_iter.init() and build the loader "
                "again after a shutdown")
        if self._failure is not None:
            raise RankFailureError(
                f"rank {self.rank} of {self.size}: {what} not started: an earlier collective "
                f"of horovod_iter failed, so the ranks are out of step ({self._failure}). "
                "End the job (or, under Horovod elastic, let it reset).")

    def adopt(self, handles: Iterable[AsyncHandle]) -> None:
        """Take collectives that nobody will wait for (a pass closed early): they complete
        by themselves when every rank issued them; the exit path needs to know of those
        that never do."""
        self._prune()
        self._pending.extend(handles)

    def pending(self) -> bool:
        """True if a collective of ours is still in flight (never completed): adopted, or
        held by a live iterator (a heartbeat to a host that froze, while the trainer's own
        collective failed) - the exit path must not join a thread that waits on it."""
        self._prune()
        self._inflight = [h for h in self._inflight if not h.done()]
        return bool(self._pending or self._inflight)

    def _prune(self) -> None:
        """Collect the adopted collectives that completed (Horovod keeps a handle until it
        is synchronised); one that failed marks the backend failed."""
        keep = []
        for h in self._pending:
            if not h.done():
                keep.append(h)
                continue
            try:
                h.wait(0.0, what="a message in flight when its pass was closed")
            except HorovodIterError:
                pass  # recorded by fail()
        self._pending = keep

    # -- collectives ------------------------------------------------------------------
    def allreduce_async(self, tensor: torch.Tensor, op: str = "sum",
                        name: str | None = None) -> AsyncHandle:
        """Start an allreduce of a small integer CPU tensor; ``op`` is sum, min or max.

        Ops match across ranks by their order (under Horovod too: each op is named by the
        backend's own sequence), so every rank must issue the library's collectives in the
        same order; ``name`` is a label for errors only."""
        self._check(tensor, op)
        return self._begin(f"allreduce {name or ''}".strip(),
                           lambda: self._allreduce(tensor, op))

    def allreduce(self, tensor: torch.Tensor, op: str = "sum", name: str | None = None,
                  timeout: float | None = _FOREVER) -> torch.Tensor:
        """Blocking allreduce; see `allreduce_async()`."""
        result: torch.Tensor = self.allreduce_async(tensor, op, name).wait(
            timeout, what=f"allreduce {name or ''}".strip())
        return result

    def broadcast_object(self, obj: Any, root: int = 0, *,
                         timeout: float | None = DEFAULT_TIMEOUT,
                         what: str = "an object broadcast") -> Any:
        """Return rank ``root``'s ``obj`` on every rank (picklable objects), waiting at most
        ``timeout`` s (``HOROVOD_ITER_TIMEOUT``, 300 s, by default; ``None``: no limit)."""
        if not 0 <= root < self.size:
            raise ValueError(f"root must be in [0, {self.size}), got {root}")
        self._guard(what)
        payload = dumps(obj) if self.rank == root else b""
        data = self._begin(what, lambda: self._broadcast_bytes(payload, root)).wait(
            timeout, what)
        return pickle.loads(data)

    def allgather_object(self, obj: Any, *, timeout: float | None = DEFAULT_TIMEOUT,
                         what: str = "an object gather") -> list[Any]:
        """Return every rank's ``obj``, indexed by rank, waiting at most ``timeout`` s
        (``HOROVOD_ITER_TIMEOUT``, 300 s, by default; ``None``: no limit)."""
        self._guard(what)
        payload = dumps(obj)
        parts = self._begin(what, lambda: self._allgather_bytes(payload)).wait(timeout, what)
        return [pickle.loads(p) for p in parts]

    def barrier(self, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        """Block until every rank arrives (at most ``timeout`` s)."""
        self.allreduce_async(torch.zeros(1, dtype=torch.int32), name="barrier").wait(
            timeout, what="a barrier")

    @abstractmethod
    def _allreduce(self, tensor: torch.Tensor, op: str) -> AsyncHandle:
        """Start the allreduce (arguments checked)."""

    @abstractmethod
    def _broadcast_bytes(self, payload: bytes, root: int) -> AsyncHandle:
        """Start broadcasting ``payload`` from ``root``; the handle's result is the bytes."""

    @abstractmethod
    def _allgather_bytes(self, payload: bytes) -> AsyncHandle:
        """Start gathering every rank's ``payload``; the result is a list of bytes by rank."""

    def on_world_change(self) -> None:
        """The set of ranks changed (Horovod elastic): reset per-world bookkeeping; the
        failure that caused the change is over."""
        self._failure = None
        self._pending = []
        self._inflight = []

    def close(self) -> None:
        """Release what this backend created (process groups, Horovod if we initialised it);
        after a failure, abandon them instead (see `abandon_at_exit`)."""
        self._closed = True

    def abandon_at_exit(self) -> None:
        """The process is ending with the ranks out of step: leave every group as it is
        (never join a thread that waits on a dead rank)."""
        self._closed = True

    def __repr__(self) -> str:
        return f"<{type(self).__name__} rank={self.rank} size={self.size}>"

    @staticmethod
    def _check(tensor: torch.Tensor, op: str) -> None:
        if op not in _OPS:
            raise ValueError(f"op must be one of {_OPS}, got {op!r}")
        if not isinstance(tensor, torch.Tensor) or tensor.is_floating_point() or tensor.is_cuda:
            raise TypeError(
                "the library's allreduce takes a small integer CPU tensor, got "
                f"{type(tensor).__name__} {getattr(tensor, 'dtype', '')}"
            )


class LocalBackend(Backend):
    """One process: size 1, collectives are identities."""

    name = "local"
    rank = 0
    size = 1
    local_rank = 0
    local_size = 1

    def _allreduce(self, tensor: torch.Tensor, op: str) -> AsyncHandle:
        return _DoneHandle(tensor.clone())

    def _broadcast_bytes(self, payload: bytes, root: int) -> AsyncHandle:
        return _DoneHandle(payload)

    def _allgather_bytes(self, payload: bytes) -> AsyncHandle:
        return _DoneHandle([payload])


_lock = threading.RLock()
_backend: Backend | None = None
_provisional = False  # _backend is local by auto-detection
_MODULES = {"horovod": ("backend_horovod", "HorovodBackend"),
            "torch": ("backend_torch", "TorchBackend")}


def _create(name: str) -> Backend:
    if name == "local":
        return LocalBackend()
    module, cls = _MODULES[name]
    factory: Callable[[], Backend] = getattr(
        importlib.import_module(f"{__package__}.{module}"), cls)
    return factory()


def _horovod_importable() -> bool:
    try:
        import horovod.torch  # noqa: F401
    except ImportError:
        return False
    return True


def _detect() -> str:
    """Which backend the launch environment implies (see `init()`)."""
    if any(v in os.environ for v in _HOROVOD_ENV) and _horovod_importable():
        return "horovod"
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return "torch"
    except ImportError:  # pragma: no cover
        pass
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return "torch"
    return "local"


def _normalise(backend: str | None) -> str | None:
    if backend is None:
        return None
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
    name = backend.strip().lower()
    if name in ("", "auto"):
        return None
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or 'auto', got {backend!r}")
    return name


def init(backend: str | None = None) -> Backend:
    """Initialise (once) and return the backend.

    Args:
        backend: ``"horovod"``, ``"torch"``, ``"local"``, or ``None``/``"auto"`` to detect it:
            a horovodrun/mpirun environment with Horovod importable gives ``horovod``;
            torchrun's environment (``RANK``, ``WORLD_SIZE``) or an initialised
            torch.distributed gives ``torch``; anything else ``local``. The environment
            variable ``HOROVOD_ITER_BACKEND`` overrides auto-detection.

    Idempotent: later calls return the same backend. Asking for a backend that contradicts the
    one already initialised raises `BackendError`.

    Example:
        ```python
        import horovod_iter as hi
        b = hi.init()
        print(b.name, b.rank, b.size)
        ```
    """
    global _backend, _provisional
    wanted = _normalise(backend)
    with _lock:
        if _backend is not None and _provisional and _detect() != "local":
            _backend = None  # a launcher's environment appeared after a local auto-detection
        if _backend is not None and _provisional and wanted not in (None, "local"):
            _backend = None  # an explicit backend replaces an auto-detected local one
        if _backend is not None:
            if wanted is not None and wanted != _backend.name:
                raise BackendError(
                    f"horovod_iter is already initialised with the {_backend.name!r} backend; "
                    f"cannot switch to {wanted!r}. Call horovod_iter.shutdown() first, or drop "
                    "the explicit backend argument."
                )
            return _backend
        if wanted is None:
            env = os.environ.get(BACKEND_ENV, "").strip().lower()
            if env not in ("", "auto", *BACKENDS):
                raise ValueError(
                    f"{BACKEND_ENV}={os.environ[BACKEND_ENV]!r} is not one of {BACKENDS} or "
                    "'auto'; fix or unset the environment variable"
                )
            wanted = _normalise(env)
        name = wanted or _detect()
        _backend = _create(name)
        _provisional = wanted is None and name == "local"
        return _backend


def gather_rows(value: Any, *, backend: Backend | None = None,
                timeout: float | None = DEFAULT_TIMEOUT) -> Any:
    """Every rank's rows of ``value`` (a tensor, or a dict/list/tuple of them), concatenated
    along dim 0 in rank order: the exact evaluation gather for ``uneven="pad"``.

    Ranks may hold different row counts, zero included (the empty padding batches), which
    the frameworks' own gathers (``accelerator.gather_for_metrics``, ``all_gather``) cannot
    take. A collective on the library's own group, bounded by ``timeout``: call it on every
    rank, e.g. once after the evaluation loop with the concatenated outputs.

    Example:
        ```python
        preds = torch.cat([model(x).argmax(1) for x, _ in eval_loader])   # uneven="pad"
        labels = torch.cat([y for _, y in eval_loader])
        preds, labels = hi.gather_rows((preds, labels))   # every sample exactly once
        ```
    """
    mine = tree_map(lambda t: t.detach().cpu(), value)
    try:
        concat_rows([mine])  # the same check on every rank, before the collective
    except TypeError as e:
        raise TypeError(f"gather_rows: {e}") from None
    b = backend or get_backend()
    return concat_rows(b.allgather_object(mine, timeout=timeout, what="gather_rows()"))


def get_backend() -> Backend:
    """The initialised backend, initialising it lazily (auto-detected) if needed. A local
    backend found by auto-detection is provisional: once a launcher's environment appears
    (Lightning's launcher sets ``RANK`` inside ``trainer.fit()``, after the script built its
    loaders), the next call detects the real one."""
    if _backend is not None and not _provisional:
        return _backend
    return init()


def is_provisional(backend: Backend) -> bool:
    """True if ``backend`` is a local backend by auto-detection that a launcher's environment
    would now replace (see `get_backend`)."""
    return backend.name == "local" and (backend is not _backend or (
        _provisional and _detect() != "local"))


def shutdown() -> None:
    """Release the backend's resources; a later `init()` starts afresh. Loaders built on
    the old backend raise `BackendError` when iterated."""
    global _backend, _provisional
    with _lock:
        if _backend is not None:
            try:
                if _backend.failed is not None or _backend.pending():
                    _backend.abandon_at_exit()
                else:
                    _backend.close()
            finally:
                _backend = None
                _provisional = False


_exiting = False


def exiting() -> bool:
    """True once the interpreter is shutting down: finalizers must not block then."""
    return _exiting


def _at_exit() -> None:
    global _exiting
    _exiting = True
    shutdown()


def exit_now_if_failed() -> None:
    """An exit handler registered ahead of Horovod's: if the backend failed and the process
    is ending on an uncaught exception, flush the output and end with ``os._exit`` - Horovod's
    shutdown and its C++ destructors would otherwise join a thread that waits on the dead
    rank (``HOROVOD_GLOO_TIMEOUT_SECONDS``). A process that caught our error and ends
    normally keeps its exit status and Horovod's own shutdown."""
    b = _backend
    if b is None or b.failed is None:
        return
    uncaught = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)
    if uncaught is None:
        return
    code = 130 if isinstance(uncaught, KeyboardInterrupt) else 1
    global _exiting
    _exiting = True
    try:
        logging.shutdown()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


atexit.register(_at_exit)
