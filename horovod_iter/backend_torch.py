"""The torch.distributed backend; imported only when that backend is chosen.

The library's collectives run on a gloo process group of its own, so they never interleave
with the trainer's NCCL/gloo collectives. Under torchrun that group is built from torchrun's
agent store (a key prefix of our own) *without* touching the default process group: a loader
built before the trainer's own ``dist.init_process_group()`` leaves that call to the trainer.
Elsewhere (a hand-set ``MASTER_ADDR``/``RANK`` environment) the default group is initialised
if the trainer has not done it, and ours is made with ``new_group``.
"""
from __future__ import annotations

import datetime
import os
import pickle
import socket
from typing import Any

import torch
import torch.distributed as dist

from .backend import AsyncHandle, Backend, poll_until, timeout_error
from .errors import BackendError, RankFailureError

__all__ = ["TorchBackend"]

_GROUP_TIMEOUT_S = float(os.environ.get("HOROVOD_ITER_GROUP_TIMEOUT", "1800"))
_PREFIX = "horovod_iter/"


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
            if timeout is not None and not poll_until(self._work.is_completed, timeout):
                raise timeout_error(self._backend, what, timeout)
            try:
                self._work.wait()
            except RuntimeError as e:
                raise RankFailureError(
                    f"rank {self._backend.rank} of {self._backend.size} (torch backend): "
                    f"{what} failed, most likely because another rank died: {e}"
                ) from e
            self._finished = True
        return self._tensor


class TorchBackend(Backend):
    """``torch.distributed`` with a gloo group of the library's own (see the module doc)."""

    name = "torch"

    def __init__(self) -> None:
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

    def allreduce_async(self, tensor: torch.Tensor, op: str = "sum",
                        name: str | None = None) -> AsyncHandle:
        self._check(tensor, op)
        opts = dist.AllreduceOptions()
        ops: dict[str, Any] = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN,
                               "max": dist.ReduceOp.MAX}
        opts.reduceOp = ops[op]
        out = tensor.clone()
        work = self._group.allreduce([out], opts)
        return _TorchHandle(self, work, out)

    def _broadcast(self, t: torch.Tensor, root: int) -> torch.Tensor:
        opts = dist.BroadcastOptions()
        opts.rootRank = root
        self._group.broadcast([t], opts).wait()
        return t

    def _allgather(self, t: torch.Tensor) -> list[torch.Tensor]:
        out = [torch.empty_like(t) for _ in range(self._size)]
        self._group.allgather([out], [t]).wait()
        return out

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        payload = pickle.dumps(obj) if self._rank == root else b""
        size = self._broadcast(torch.tensor([len(payload)], dtype=torch.int64), root)
        buf = (torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload
               else torch.empty(int(size), dtype=torch.uint8))
        return pickle.loads(self._broadcast(buf, root).numpy().tobytes())

    def allgather_object(self, obj: Any) -> list[Any]:
        payload = pickle.dumps(obj)
        sizes = [int(s) for s in self._allgather(torch.tensor([len(payload)],
                                                              dtype=torch.int64))]
        buf = torch.zeros(max(sizes), dtype=torch.uint8)
        buf[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        return [pickle.loads(t[:n].numpy().tobytes())
                for t, n in zip(self._allgather(buf), sizes)]

    def barrier(self) -> None:
        self.allreduce(torch.zeros(1, dtype=torch.int32))

    def close(self) -> None:
        group, self._group = self._group, None
        if group is not None and not self._standalone_group and dist.is_initialized():
            dist.destroy_process_group(group)
        if self._we_initialised and dist.is_initialized():
            dist.destroy_process_group()
            self._we_initialised = False
