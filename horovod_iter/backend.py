"""Rank, size and the few collectives horovod_iter needs, over Horovod, torch.distributed or
a single process.

The rest of the library talks only to `Backend`, so the same sampler and loader run
unchanged under ``horovodrun``, ``torchrun`` and plain ``python``.

Collectives offered (and nothing more): allreduce of a small integer tensor (sum, min, max),
blocking or asynchronous with a timeout; ``broadcast_object``; ``allgather_object``; ``barrier``.
The Horovod and torch.distributed backends live in `backend_horovod` and
`backend_torch`, imported only when chosen. This module imports nothing of the
library but `errors`.
"""
from __future__ import annotations

import atexit
import importlib
import os
import threading
import time
from abc import ABC, abstractmethod
from typing import Any, Callable

import torch

from .errors import BackendError, DataTimeoutError

__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "AsyncHandle",
    "Backend",
    "get_backend",
    "init",
    "shutdown",
]

#: Environment variable that overrides backend auto-detection.
BACKEND_ENV = "HOROVOD_ITER_BACKEND"
#: Backend names accepted by `init()`.
BACKENDS = ("horovod", "torch", "local")
_OPS = ("sum", "min", "max")
# Environment variables set by horovodrun (gloo), mpirun (Open MPI, MPICH/Intel MPI, PMIx).
_HOROVOD_ENV = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


class AsyncHandle(ABC):
    """An allreduce in flight. ``wait`` returns the reduced tensor."""

    @abstractmethod
    def done(self) -> bool:
        """True once the result is ready (``wait`` will not block)."""

    @abstractmethod
    def wait(self, timeout: float | None = None, what: str = "an allreduce") -> torch.Tensor:
        """Block until the result is ready; raise `DataTimeoutError` after ``timeout`` s."""


class _DoneHandle(AsyncHandle):
    def __init__(self, result: torch.Tensor) -> None:
        self._result = result

    def done(self) -> bool:
        return True

    def wait(self, timeout: float | None = None, what: str = "an allreduce") -> torch.Tensor:
        return self._result


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


class Backend(ABC):
    """Rank facts and the library's collectives. Obtain one with `init()`."""

    name: str = ""

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

    @abstractmethod
    def allreduce_async(self, tensor: torch.Tensor, op: str = "sum",
                        name: str | None = None) -> AsyncHandle:
        """Start an allreduce of a small integer CPU tensor; ``op`` is sum, min or max."""

    def allreduce(self, tensor: torch.Tensor, op: str = "sum", name: str | None = None,
                  timeout: float | None = None) -> torch.Tensor:
        """Blocking allreduce; see `allreduce_async()`."""
        return self.allreduce_async(tensor, op, name).wait(timeout)

    @abstractmethod
    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        """Return rank ``root``'s ``obj`` on every rank (picklable objects)."""

    @abstractmethod
    def allgather_object(self, obj: Any) -> list[Any]:
        """Return every rank's ``obj``, indexed by rank."""

    @abstractmethod
    def barrier(self) -> None:
        """Block until every rank arrives."""

    def on_world_change(self) -> None:  # noqa: B027 - optional hook
        """The set of ranks changed (Horovod elastic): reset per-world bookkeeping."""

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release what this backend created (process groups, Horovod if we initialised it)."""

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

    def allreduce_async(self, tensor: torch.Tensor, op: str = "sum",
                        name: str | None = None) -> AsyncHandle:
        self._check(tensor, op)
        return _DoneHandle(tensor.clone())

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        if root != 0:
            raise ValueError(f"root must be in [0, 1) with the local backend, got {root}")
        return obj

    def allgather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def barrier(self) -> None:
        return None


_lock = threading.RLock()
_backend: Backend | None = None
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
    global _backend
    wanted = _normalise(backend)
    with _lock:
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
        return _backend


def get_backend() -> Backend:
    """The initialised backend, initialising it lazily (auto-detected) if needed."""
    return _backend if _backend is not None else init()


def shutdown() -> None:
    """Release the backend's resources; a later `init()` starts afresh."""
    global _backend
    with _lock:
        if _backend is not None:
            try:
                _backend.close()
            finally:
                _backend = None


_exiting = False


def exiting() -> bool:
    """True once the interpreter is shutting down: finalizers must not block then."""
    return _exiting


def _at_exit() -> None:
    global _exiting
    _exiting = True
    shutdown()


atexit.register(_at_exit)
