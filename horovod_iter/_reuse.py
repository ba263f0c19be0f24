"""Opt-in reuse of CPU batch buffers (the loader's ``reuse_cpu_buffers=True``).

Gathering a batch into warm pages is several times faster than into fresh ones, but a reused
buffer is written again by a later batch. So reuse is off unless asked for, and its contract is
stated, not guessed: with it on, **a CPU batch is valid until the next step**; clone what you
keep longer (``x.clone()``).

Within that contract a guard remains: a buffer is reused only when refcounts say that nothing
but the pool refers to it (no Python reference, no view, no numpy array, no autograd graph).
Those refcounts are torch internals (``Tensor._use_count``, ``torch._C._storage_Use_Count``),
so their rules are probed once against this torch build, and if they do not hold nothing is
reused. The guard is not the contract: a holder refcounts cannot see (a raw ``data_ptr()`` kept
by an extension) is not protected.

Only for CPU batches made in the caller's process: pinned memory is recycled by torch's caching
host allocator once its copy's event completes, and a DataLoader worker's batch lives in shared
memory.
"""
from __future__ import annotations

import functools
import sys

import torch

__all__ = ["BufferPool", "is_free", "supported"]


def is_free(pool: list[torch.Tensor], i: int) -> bool:
    """True if nothing but ``pool`` refers to ``pool[i]``: no Python reference (a batch the
    user kept), no other tensor on its storage (a view, a numpy array), no autograd graph or
    C++ holder of the tensor itself. Any doubt: not free."""
    try:
        impl_refs: int = pool[i]._use_count()  # type: ignore[attr-defined]
        return (sys.getrefcount(pool[i]) == 2 and impl_refs == 1
                and torch._C._storage_Use_Count(pool[i].untyped_storage()._cdata) == 2)
    except Exception:  # pragma: no cover - a torch without these introspection hooks
        return False


@functools.cache
def supported() -> bool:
    """The refcount rules of `is_free` hold in this torch build (probed once; else never
    reuse): a fresh buffer is free, one with a view or a Python reference is not."""
    try:
        pool = [torch.empty(4)]
        free = is_free(pool, 0)
        view = pool[0][1:]
        held = is_free(pool, 0)
        del view
        kept = pool[0]
        held2 = is_free(pool, 0)
        del kept
        return free and not held and not held2 and is_free(pool, 0)
    except Exception:  # pragma: no cover
        return False


class BufferPool:
    """Up to ``slots`` CPU buffers for each of ``outputs`` outputs (a ``TensorDataset``'s
    tensors): `take` hands back a free one of the shape and dtype, else a new one, which
    replaces the oldest when the pool is full (that one is the user's now)."""

    def __init__(self, outputs: int, slots: int = 4) -> None:
        self._pools: list[list[torch.Tensor]] = [[] for _ in range(outputs)]
        self._slots = slots
        #: buffers made and buffers handed out again (what reuse saves is the difference)
        self.allocations = 0
        self.reuses = 0

    def take(self, k: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A buffer for output ``k``; its contents are garbage (the caller writes all of it)."""
        pool = self._pools[k]
        for i in range(len(pool)):
            if pool[i].shape == shape and pool[i].dtype == dtype and is_free(pool, i):
                self.reuses += 1
                return pool[i]
        out = torch.empty(shape, dtype=dtype)
        self.allocations += 1
        if len(pool) >= self._slots:
            pool.pop(0)
        pool.append(out)
        return out
