"""The Horovod backend (``horovod.torch``); imported only when that backend is chosen.

Every op gets the next name of one sequence (Horovod matches ops across ranks by name), so ops
match by program order as under torch. Object collectives are built from Horovod's async
tensor ops (so they are bounded like the rest) and plain pickle (a class of the script arrives
as the same class). A failed collective is raised as `HorovodRankFailureError`, which is both our
`RankFailureError` and Horovod's ``HorovodInternalError``, so that
``hvd.elastic.run`` treats it as the rank failure it is and resets.
"""
from __future__ import annotations

import atexit
import itertools
from typing import Any, Callable

import torch

from .backend import AsyncHandle, Backend, ChainHandle, exit_now_if_failed
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


class _HorovodHandle(AsyncHandle):
    """A Horovod async op; ``then`` maps its result tensor to the value."""

    def __init__(self, backend: HorovodBackend, handle: Any,
                 then: Callable[[torch.Tensor], Any] | None = None) -> None:
        super().__init__(backend)
        self._handle = handle
        self._then = then

    def _ready(self) -> bool:
        return bool(hvd.poll(self._handle))

    def _collect(self) -> Any:
        out = hvd.synchronize(self._handle)
        return self._then(out) if self._then is not None else out


class HorovodBackend(Backend):
    """``horovod.torch``; calls ``hvd.init()`` if the user has not."""

    name = "horovod"

    def __init__(self) -> None:
        super().__init__()
        self._we_initialised = not hvd.is_initialized()
        if self._we_initialised:
            hvd.init()
        self._ops = {"sum": hvd.Sum, "min": hvd.Min, "max": hvd.Max}
        self._names = itertools.count()
        self._facts = self._read_facts()
        # ahead of Horovod's own exit handler (registered by hvd.init(), which ran first)
        atexit.register(exit_now_if_failed)

    @staticmethod
    def _read_facts() -> tuple[int, int, int, int]:
        return int(hvd.rank()), int(hvd.size()), int(hvd.local_rank()), int(hvd.local_size())

    def _fact(self, i: int) -> int:
        """Horovod's live value (elastic resets change it), or the last one once Horovod has
        shut down (a log line or an error message after the end must not raise)."""
        try:
            self._facts = self._read_facts()
        except ValueError:  # Horovod is shut down
            pass
        return self._facts[i]

    @property
    def rank(self) -> int:
        return self._fact(0)

    @property
    def size(self) -> int:
        return self._fact(1)

    @property
    def local_rank(self) -> int:
        return self._fact(2)

    @property
    def local_size(self) -> int:
        return self._fact(3)

    def failure_error(self, what: str, cause: BaseException) -> RankFailureError:
        cls = (HorovodRankFailureError if isinstance(cause, HorovodInternalError)
               else RankFailureError)
        return cls(f"rank {self.rank} of {self.size} (horovod backend): {what} failed, most "
                   f"likely because another rank died or raised: {cause}")

    def _on_failure(self) -> None:
        # hvd.init() may have run again (elastic) and registered its shutdown after ours
        atexit.unregister(exit_now_if_failed)
        atexit.register(exit_now_if_failed)

    def _name(self) -> str:
        # Horovod matches ops across ranks by name: one sequence for all our ops, so that
        # ops match by program order, as torch's do (a rank iterating a loader the others
        # do not meets their next message, and the mismatched headers say so at once)
        return f"horovod_iter.{next(self._names)}"

    def _start(self, what: str, start: Callable[[str], Any],
               then: Callable[[torch.Tensor], Any] | None = None) -> _HorovodHandle:
        try:
            return _HorovodHandle(self, start(self._name()), then)
        except Exception as e:  # Horovod shut down under us: a rank died or raised
            failure = self.failure_error(f"starting {what}", e)
            self.fail(str(failure))
            raise failure from e

    def _allreduce(self, tensor: torch.Tensor, op: str) -> AsyncHandle:
        return self._start("an allreduce", lambda name: hvd.allreduce_async_(
            tensor.clone(), name=name, op=self._ops[op]))

    def _broadcast_bytes(self, payload: bytes, root: int) -> AsyncHandle:
        def data(size: torch.Tensor) -> _HorovodHandle:
            buf = (torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload
                   else torch.zeros(int(size[0]), dtype=torch.uint8))
            return self._start("an object broadcast", lambda name: hvd.broadcast_async_(
                buf, root_rank=root, name=name), lambda t: t.numpy().tobytes())

        size = torch.tensor([len(payload)], dtype=torch.int64)
        return ChainHandle(self, self._start("an object broadcast", lambda name:
                                              hvd.broadcast_async_(size, root_rank=root,
                                                                   name=name)), data)

    def _allgather_bytes(self, payload: bytes) -> AsyncHandle:
        def data(sizes: torch.Tensor) -> _HorovodHandle:
            n = [int(k) for k in sizes.tolist()]
            buf = (torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload
                   else torch.zeros(0, dtype=torch.uint8))

            def split(t: torch.Tensor) -> list[bytes]:
                raw = t.numpy().tobytes()
                offsets = [sum(n[:r]) for r in range(len(n) + 1)]
                return [raw[offsets[r]:offsets[r + 1]] for r in range(len(n))]

            return self._start("an object gather", lambda name: hvd.allgather_async(
                buf, name=name), split)

        size = torch.tensor([len(payload)], dtype=torch.int64)
        return ChainHandle(self, self._start("an object gather", lambda name:
                                              hvd.allgather_async(size, name=name)), data)

    def on_world_change(self) -> None:
        # ranks that joined start their op-name sequence at 0: every rank does the same
        super().on_world_change()
        self._names = itertools.count()

    def close(self) -> None:
        super().close()
        if self._we_initialised and hvd.is_initialized():
            hvd.shutdown()
        self._we_initialised = False

    def abandon_at_exit(self) -> None:
        """Leave Horovod running: its shutdown joins a background thread that may wait on a
        dead rank (the process is ending; `exit_now_if_failed` ends it at once on an
        uncaught error)."""
        super().abandon_at_exit()
