"""The torch.distributed backend; imported only when that backend is chosen.

The library's collectives run on a gloo process group of its own, so they never interleave
with the trainer's NCCL/gloo collectives. Under torchrun that group is built from torchrun's
agent store (a key prefix of our own) *without* touching the default process group: a loader
built before the trainer's own ``dist.init_process_group()`` leaves that call to the trainer.
Elsewhere (a hand-set ``MASTER_ADDR``/``RANK`` environment) the default group is initialised
if the trainer has not done it, and ours is made with ``new_group``.
"""
from __future__ import annotations

import ctypes
import datetime
import os
import socket
from typing import Any, Callable

import torch
import torch.distributed as dist

from .backend import AsyncHandle, Backend, ChainHandle
from .errors import BackendError

__all__ = ["TorchBackend"]

_GROUP_TIMEOUT_S = float(os.environ.get("HOROVOD_ITER_GROUP_TIMEOUT", "1800"))
_PREFIX = "horovod_iter/"


class _TorchHandle(AsyncHandle):
    """One or more gloo works in sequence; ``then`` maps the last result to the value."""

    def __init__(self, backend: TorchBackend, work: Any, result: Any,
                 then: Callable[[Any], Any] | None = None) -> None:
        super().__init__(backend)
        self._work = work
        self._result = result
        self._then = then

    def _ready(self) -> bool:
        return bool(self._work.is_completed())

    def _collect(self) -> Any:
        self._work.wait()
        return self._then(self._result) if self._then is not None else self._result


class TorchBackend(Backend):
    """``torch.distributed`` with a gloo group of the library's own (see the module doc)."""

    name = "torch"

    def __init__(self) -> None:
        super().__init__()
        if not dist.is_available():  # pragma: no cover - depends on the torch build
            raise BackendError("backend 'torch' needs a torch build with torch.distributed")
        self._we_initialised = False
        self._standalone_group = False  # built from the agent store, not registered in dist
        timeout = datetime.timedelta(seconds=_GROUP_TIMEOUT_S)
        if dist.is_initialized():
            self._rank, self._size = dist.get_rank(), dist.get_world_size()
            self._group: Any = dist.new_group(backend="gloo", timeout=timeout)
        else:
            missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
                       if v not in os.environ]
            if missing:
                raise BackendError(
                    "backend 'torch' needs torch.distributed initialised or torchrun's "
                    f"environment; {', '.join(missing)} not set. Launch with "
                    "`torchrun --nproc_per_node N train.py`, or call "
                    "torch.distributed.init_process_group() before horovod_iter.init()."
                )
            self._rank, self._size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
                store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                      is_master=False, timeout=timeout)
                self._group = dist.ProcessGroupGloo(dist.PrefixStore(_PREFIX, store),
                                                    self._rank, self._size, timeout)
                self._standalone_group = True
            else:
                use_nccl = torch.cuda.is_available() and dist.is_nccl_available()
                dist.init_process_group(backend="cpu:gloo,cuda:nccl" if use_nccl else "gloo")
                self._we_initialised = True
                self._group = dist.new_group(backend="gloo", timeout=timeout)
        self._local: tuple[int, int] | None = None
        env_local = (os.environ.get("LOCAL_RANK"), os.environ.get("LOCAL_WORLD_SIZE"))
        if env_local[0] is not None and env_local[1] is not None:
            self._local = (int(env_local[0]), int(env_local[1]))

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self._size

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

    def _allreduce(self, tensor: torch.Tensor, op: str) -> AsyncHandle:
        opts = dist.AllreduceOptions()
        ops: dict[str, Any] = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN,
                               "max": dist.ReduceOp.MAX}
        opts.reduceOp = ops[op]
        out = tensor.clone()
        return _TorchHandle(self, self._group.allreduce([out], opts), out)

    def _broadcast(self, t: torch.Tensor, root: int) -> _TorchHandle:
        opts = dist.BroadcastOptions()
        opts.rootRank = root
        return _TorchHandle(self, self._group.broadcast([t], opts), t)

    def _allgather(self, t: torch.Tensor) -> _TorchHandle:
        out = [torch.empty_like(t) for _ in range(self._size)]
        return _TorchHandle(self, self._group.allgather([out], [t]), out)

    def _broadcast_bytes(self, payload: bytes, root: int) -> AsyncHandle:
        def data(size: torch.Tensor) -> _TorchHandle:
            buf = (torch.frombuffer(bytearray(payload), dtype=torch.uint8) if self._rank == root
                   else torch.empty(int(size[0]), dtype=torch.uint8))
            handle = self._broadcast(buf, root)
            handle._then = lambda t: t.numpy().tobytes()
            return handle

        return ChainHandle(self, self._broadcast(
            torch.tensor([len(payload)], dtype=torch.int64), root), data)

    def _allgather_bytes(self, payload: bytes) -> AsyncHandle:
        def data(sizes: list[torch.Tensor]) -> _TorchHandle:
            n = [int(s[0]) for s in sizes]
            buf = torch.zeros(max(n), dtype=torch.uint8)
            if payload:
                buf[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
            handle = self._allgather(buf)
            handle._then = lambda parts: [t[:k].numpy().tobytes() for t, k in zip(parts, n)]
            return handle

        return ChainHandle(self, self._allgather(
            torch.tensor([len(payload)], dtype=torch.int64)), data)

    def close(self) -> None:
        super().close()
        group, self._group = self._group, None
        if group is not None and not self._standalone_group and dist.is_initialized():
            dist.destroy_process_group(group)
        if self._we_initialised and dist.is_initialized():
            dist.destroy_process_group()
            self._we_initialised = False

    def abandon_at_exit(self) -> None:
        """Keep our gloo group alive for good: its destructor would join worker threads that
        wait on a dead rank for the group timeout (gloo's ``abort()`` does not interrupt
        them). The process ends with the threads blocked, which is harmless."""
        super().abandon_at_exit()
        group, self._group = self._group, None
        if group is not None:
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(group))
