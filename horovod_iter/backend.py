"""Rank, size and the few collectives horovod_iter needs, over Horovod, torch.distributed or
a single process.

The rest of the library talks only to :class:`Backend`, so the same sampler and loader run
unchanged under ``horovodrun``, ``torchrun`` and plain ``python``.

Collectives offered (and nothing more): allreduce of a small integer tensor (sum, min, max),
blocking or asynchronous with a timeout; ``broadcast_object``; ``allgather_object``; ``barrier``.
Under torch.distributed they run on a dedicated gloo group created once, so they never
interleave with the trainer's own NCCL/gloo collectives; under Horovod every asynchronous op gets
a unique name.
"""
from __future__ import annotations

import atexit
import datetime
import itertools
import os
import socket
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
#: Backend names accepted by :func:`init`.
BACKENDS = ("horovod", "torch", "local")
_OPS = ("sum", "min", "max")
# Environment variables set by horovodrun (gloo), mpirun (Open MPI, MPICH/Intel MPI, PMIx).
_HOROVOD_ENV = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
_DEFAULT_GROUP_TIMEOUT_S = float(os.environ.get("HOROVOD_ITER_GROUP_TIMEOUT", "1800"))


class AsyncHandle(ABC):
    """An allreduce in flight. ``wait`` returns the reduced tensor."""

    @abstractmethod
    def done(self) -> bool:
        """True once the result is ready (``wait`` will not block)."""

    @abstractmethod
    def wait(self, timeout: float | None = None, what: str = "an allreduce") -> torch.Tensor:
        """Block until the result is ready; raise :class:`DataTimeoutError` after ``timeout`` s."""


class _DoneHandle(AsyncHandle):
    def __init__(self, result: torch.Tensor) -> None:
        self._result = result

    def done(self) -> bool:
        return True

    def wait(self, timeout: float | None = None, what: str = "an allreduce") -> torch.Tensor:
        return self._result


def _poll_until(done: Callable[[], bool], timeout: float | None) -> bool:
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


def _timeout_error(backend: Backend, what: str, timeout: float | None) -> DataTimeoutError:
    return DataTimeoutError(
        f"rank {backend.rank} of {backend.size} ({backend.name} backend) waited more than "
        f"{timeout} s for {what}: another rank is stalled, has died, or stopped iterating "
        "early. Check the other ranks' logs; raise `timeout` if they are just slow."
    )


class Backend(ABC):
    """Rank facts and the library's collectives. Obtain one with :func:`init`."""

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
        """Blocking allreduce; see :meth:`allreduce_async`."""
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


class _HorovodHandle(AsyncHandle):
    def __init__(self, backend: HorovodBackend, handle: Any) -> None:
        self._backend = backend
        self._handle = handle
        self._result: torch.Tensor | None = None

    def done(self) -> bool:
        return self._result is not None or bool(self._backend._hvd.poll(self._handle))

    def wait(self, timeout: float | None = None, what: str = "an allreduce") -> torch.Tensor:
        if self._result is None:
            hvd = self._backend._hvd
            if timeout is not None and not _poll_until(lambda: hvd.poll(self._handle), timeout):
                raise _timeout_error(self._backend, what, timeout)
            try:
                self._result = hvd.synchronize(self._handle)
            except Exception as e:  # HorovodInternalError: a rank died or raised
                raise _rank_failure_type(e)(
                    f"rank {self._backend.rank} of {self._backend.size} (horovod backend): "
                    f"{what} failed, most likely because another rank died or raised: {e}"
                ) from e
        return self._result


_RANK_FAILURE: type[DataTimeoutError] | None = None


def _rank_failure_type(e: Exception) -> type[DataTimeoutError]:
    """DataTimeoutError, and also Horovod's HorovodInternalError when ``e`` is one - so that
    ``hvd.elastic.run`` sees a failed collective of ours as the rank failure it is and resets."""
    global _RANK_FAILURE
    try:
        from horovod.common.exceptions import HorovodInternalError
    except ImportError:  # pragma: no cover
        return DataTimeoutError
    if not isinstance(e, HorovodInternalError):
        return DataTimeoutError
    if _RANK_FAILURE is None:
        _RANK_FAILURE = type("RankFailureError", (DataTimeoutError, HorovodInternalError),
                             {"__module__": __name__,
                              "__doc__": "A collective failed because a rank died."})
    return _RANK_FAILURE


class HorovodBackend(Backend):
    """``horovod.torch``; calls ``hvd.init()`` if the user has not."""

    name = "horovod"

    def __init__(self) -> None:
        try:
            import horovod.torch as hvd
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise BackendError(
                "backend 'horovod' needs Horovod with PyTorch support: install it with "
                "`pip install horovod_iter[horovod]` (built with HOROVOD_WITH_PYTORCH=1), or run "
                "`bash scripts/setup.sh`, then launch with `horovodrun -np N python train.py`. "
                f"(import error: {e})"
            ) from e
        self._hvd = hvd
        self._we_initialised = not hvd.is_initialized()
        if self._we_initialised:
            hvd.init()
        self._ops = {"sum": hvd.Sum, "min": hvd.Min, "max": hvd.Max}
        self._names = itertools.count()
        from .elastic import register

        register()  # hvd.elastic.TorchState(loader=...) knows our loader and sampler

    @property
    def rank(self) -> int:
        return int(self._hvd.rank())

    @property
    def size(self) -> int:
        return int(self._hvd.size())

    @property
    def local_rank(self) -> int:
        return int(self._hvd.local_rank())

    @property
    def local_size(self) -> int:
        return int(self._hvd.local_size())

    def allreduce_async(self, tensor: torch.Tensor, op: str = "sum",
                        name: str | None = None) -> AsyncHandle:
        self._check(tensor, op)
        # Horovod matches ops across ranks by name: callers that issue ops in a rank-dependent
        # order must pass their own names; the counter is fine for ops issued in program order.
        name = name or f"horovod_iter.allreduce.{next(self._names)}"
        try:
            handle = self._hvd.allreduce_async_(tensor.clone(), name=name, op=self._ops[op])
        except Exception as e:  # Horovod shut down under us: a rank died or raised
            raise _rank_failure_type(e)(
                f"rank {self.rank} of {self.size} (horovod backend): could not start allreduce "
                f"{name!r}, most likely because another rank died or raised: {e}"
            ) from e
        return _HorovodHandle(self, handle)

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        return self._hvd.broadcast_object(obj, root_rank=root,
                                          name=f"horovod_iter.bcast.{next(self._names)}")

    def allgather_object(self, obj: Any) -> list[Any]:
        name = f"horovod_iter.gather.{next(self._names)}"
        return list(self._hvd.allgather_object(obj, name=name))

    def barrier(self) -> None:
        self._hvd.barrier()

    def close(self) -> None:
        if self._we_initialised and self._hvd.is_initialized():
            self._hvd.shutdown()
        self._we_initialised = False


class _TorchHandle(AsyncHandle):
    def __init__(self, backend: TorchBackend, work: Any, tensor: torch.Tensor) -> None:
        self._backend = backend
        self._work = work
        self._tensor = tensor
        self._finished = False

    def done(self) -> bool:
        return self._finished or bool(self._work.is_completed())

    def wait(self, timeout: float | None = None, what: str = "an allreduce") -> torch.Tensor:
        if not self._finished:
            if timeout is not None and not _poll_until(self._work.is_completed, timeout):
                raise _timeout_error(self._backend, what, timeout)
            try:
                self._work.wait()
            except RuntimeError as e:
                raise DataTimeoutError(
                    f"rank {self._backend.rank} of {self._backend.size} (torch backend): "
                    f"{what} failed, most likely because another rank died: {e}"
                ) from e
            self._finished = True
        return self._tensor


class TorchBackend(Backend):
    """``torch.distributed``; initialises the default group from torchrun's environment if the
    user has not, and runs the library's collectives on its own gloo group."""

    name = "torch"

    def __init__(self) -> None:
        import torch.distributed as dist

        if not dist.is_available():  # pragma: no cover - depends on the torch build
            raise BackendError("backend 'torch' needs a torch build with torch.distributed")
        self._dist = dist
        self._we_initialised = False
        if not dist.is_initialized():
            missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
                       if v not in os.environ]
            if missing:
                raise BackendError(
                    "backend 'torch' needs torch.distributed initialised or torchrun's "
                    f"environment; {', '.join(missing)} not set. Launch with "
                    "`torchrun --nproc_per_node N train.py`, or call "
                    "torch.distributed.init_process_group() before horovod_iter.init()."
                )
            use_nccl = torch.cuda.is_available() and dist.is_nccl_available()
            dist.init_process_group(backend="cpu:gloo,cuda:nccl" if use_nccl else "gloo")
            self._we_initialised = True
        timeout = datetime.timedelta(seconds=_DEFAULT_GROUP_TIMEOUT_S)
        # A group of our own, created once and collectively on every rank: the library's
        # collectives can then never be matched against the trainer's.
        self._group = dist.new_group(backend="gloo", timeout=timeout)
        self._local: tuple[int, int] | None = None
        env_local = (os.environ.get("LOCAL_RANK"), os.environ.get("LOCAL_WORLD_SIZE"))
        if env_local[0] is not None and env_local[1] is not None:
            self._local = (int(env_local[0]), int(env_local[1]))

    @property
    def rank(self) -> int:
        return int(self._dist.get_rank())

    @property
    def size(self) -> int:
        return int(self._dist.get_world_size())

    def _local_facts(self) -> tuple[int, int]:
        if self._local is None:
            hosts = self.allgather_object(socket.gethostname())
            me = hosts[self.rank]
            self._local = (hosts[: self.rank].count(me), hosts.count(me))
        return self._local

    @property
    def local_rank(self) -> int:
        return self._local_facts()[0]

    @property
    def local_size(self) -> int:
        return self._local_facts()[1]

    def allreduce_async(self, tensor: torch.Tensor, op: str = "sum",
                        name: str | None = None) -> AsyncHandle:
        self._check(tensor, op)
        ops = {"sum": self._dist.ReduceOp.SUM, "min": self._dist.ReduceOp.MIN,
               "max": self._dist.ReduceOp.MAX}
        out = tensor.clone()
        work = self._dist.all_reduce(out, op=ops[op], group=self._group, async_op=True)
        return _TorchHandle(self, work, out)

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        box = [obj]
        self._dist.broadcast_object_list(box, src=root, group=self._group)
        return box[0]

    def allgather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.size
        self._dist.all_gather_object(out, obj, group=self._group)
        return out

    def barrier(self) -> None:
        self._dist.barrier(group=self._group)

    def close(self) -> None:
        dist = self._dist
        if not dist.is_initialized():
            return
        if self._group is not None:
            dist.destroy_process_group(self._group)
            self._group = None
        if self._we_initialised:
            dist.destroy_process_group()
            self._we_initialised = False


_lock = threading.RLock()
_backend: Backend | None = None
_FACTORIES: dict[str, Callable[[], Backend]] = {
    "horovod": HorovodBackend,
    "torch": TorchBackend,
    "local": LocalBackend,
}


def _horovod_importable() -> bool:
    try:
        import horovod.torch  # noqa: F401
    except ImportError:
        return False
    return True


def _detect() -> str:
    """Which backend the launch environment implies (see :func:`init`)."""
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
    one already initialised raises :class:`BackendError`.

    Example:
        >>> import horovod_iter as hi
        >>> b = hi.init()
        >>> print(b.name, b.rank, b.size)
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
        _backend = _FACTORIES[name]()
        return _backend


def get_backend() -> Backend:
    """The initialised backend, initialising it lazily (auto-detected) if needed."""
    return _backend if _backend is not None else init()


def shutdown() -> None:
    """Release the backend's resources; a later :func:`init` starts afresh."""
    global _backend
    with _lock:
        if _backend is not None:
            try:
                _backend.close()
            finally:
                _backend = None


atexit.register(shutdown)
