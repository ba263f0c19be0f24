"""The Horovod backend (``horovod.torch``); imported only when that backend is chosen.

Every asynchronous op gets a unique name (Horovod matches ops across ranks by name). A failed
collective is raised as `HorovodRankFailureError`, which is both our
`RankFailureError` and Horovod's ``HorovodInternalError``, so that
``hvd.elastic.run`` treats it as the rank failure it is and resets.
"""
from __future__ import annotations

import itertools
from typing import Any

import torch

from .backend import AsyncHandle, Backend, poll_until, timeout_error
from .errors import BackendError, RankFailureError

try:
    import horovod.torch as hvd
    from horovod.common.exceptions import HorovodInternalError
except ImportError as e:  # pragma: no cover - depends on the environment
    raise BackendError(
        "backend 'horovod' needs Horovod with PyTorch support: install it with "
        "`pip install horovod_iter[horovod]` (built with HOROVOD_WITH_PYTORCH=1), or run "
        "`bash scripts/setup.sh`, then launch with `horovodrun -np N python train.py`. "
        f"(import error: {e})"
    ) from e

__all__ = ["HorovodBackend", "HorovodRankFailureError"]


class HorovodRankFailureError(RankFailureError, HorovodInternalError):
    """A collective of ours failed because a rank died or raised (also a
    ``HorovodInternalError``, so Horovod elastic resets on it)."""


def _failure(backend: HorovodBackend, what: str, e: Exception) -> RankFailureError:
    cls = HorovodRankFailureError if isinstance(e, HorovodInternalError) else RankFailureError
    return cls(f"rank {backend.rank} of {backend.size} (horovod backend): {what} failed, most "
               f"likely because another rank died or raised: {e}")


class _HorovodHandle(AsyncHandle):
    def __init__(self, backend: HorovodBackend, handle: Any) -> None:
        self._backend = backend
        self._handle = handle
        self._result: torch.Tensor | None = None

    def done(self) -> bool:
        return self._result is not None or bool(hvd.poll(self._handle))

    def wait(self, timeout: float | None = None, what: str = "an allreduce") -> torch.Tensor:
        if self._result is None:
            if timeout is not None and not poll_until(lambda: hvd.poll(self._handle), timeout):
                raise timeout_error(self._backend, what, timeout)
            try:
                self._result = hvd.synchronize(self._handle)
            except Exception as e:  # HorovodInternalError: a rank died or raised
                raise _failure(self._backend, what, e) from e
        return self._result


class HorovodBackend(Backend):
    """``horovod.torch``; calls ``hvd.init()`` if the user has not."""

    name = "horovod"

    def __init__(self) -> None:
        self._we_initialised = not hvd.is_initialized()
        if self._we_initialised:
            hvd.init()
        self._ops = {"sum": hvd.Sum, "min": hvd.Min, "max": hvd.Max}
        self._names = itertools.count()

    @property
    def rank(self) -> int:
        return int(hvd.rank())

    @property
    def size(self) -> int:
        return int(hvd.size())

    @property
    def local_rank(self) -> int:
        return int(hvd.local_rank())

    @property
    def local_size(self) -> int:
        return int(hvd.local_size())

    def allreduce_async(self, tensor: torch.Tensor, op: str = "sum",
                        name: str | None = None) -> AsyncHandle:
        self._check(tensor, op)
        # Horovod matches ops across ranks by name: callers that issue ops in a rank-dependent
        # order must pass their own names; the counter is fine for ops issued in program order.
        name = name or f"horovod_iter.allreduce.{next(self._names)}"
        try:
            handle = hvd.allreduce_async_(tensor.clone(), name=name, op=self._ops[op])
        except Exception as e:  # Horovod shut down under us: a rank died or raised
            raise _failure(self, f"starting allreduce {name!r}", e) from e
        return _HorovodHandle(self, handle)

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        return hvd.broadcast_object(obj, root_rank=root,
                                    name=f"horovod_iter.bcast.{next(self._names)}")

    def allgather_object(self, obj: Any) -> list[Any]:
        name = f"horovod_iter.gather.{next(self._names)}"
        return list(hvd.allgather_object(obj, name=name))

    def barrier(self) -> None:
        hvd.barrier()

    def on_world_change(self) -> None:
        # ranks that joined start their op-name counter at 0: every rank does the same
        self._names = itertools.count()

    def close(self) -> None:
        if self._we_initialised and hvd.is_initialized():
            hvd.shutdown()
        self._we_initialised = False
