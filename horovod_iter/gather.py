"""Index array -> collated batch, as fast as the dataset allows (the fetch paths' one tool).

* ``TensorDataset`` (and any dataset exposing ``tensors`` with torch's ``__getitem__``) is
  gathered with ``index_select``, in parallel threads for large batches. With ``pin``, into a
  pinned block that torch's caching host allocator recycles once its copy to the GPU is done;
  on the CPU into a new tensor, or, only when asked for (``reuse=True``, the loader's
  ``reuse_cpu_buffers=True``: a batch is then valid until the next step), into a buffer of
  ours written again once nothing refers to it (`_reuse`). Warm pages make the gather faster.
* datasets with ``__getitems__`` get the whole index list, as torch's DataLoader does;
  others are read sample by sample.
* with the default collate and a CUDA target, CPU tensors are stacked straight into pinned
  memory; tensors already on a GPU (a GPU-resident dataset) are stacked where they are (only
  CPU memory can be pinned).

A failure names the rank and the index (and which sample's structure differs from the first).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import get_worker_info
from torch.utils.data._utils.collate import collate as _collate
from torch.utils.data._utils.collate import default_collate, default_collate_fn_map

from . import _reuse
from ._tree import tree_map, tree_structure
from .errors import SampleError

__all__ = ["BatchFetcher", "pin_leaves", "pinned_collate"]

_torch_tensor_collate = default_collate_fn_map[torch.Tensor]


def _pinned_tensor_collate(batch: Sequence[torch.Tensor], *,
                           collate_fn_map: dict | None = None) -> torch.Tensor:
    if any(t.device.type != "cpu" for t in batch):  # a GPU-resident dataset: torch's stack
        return _torch_tensor_collate(batch, collate_fn_map=collate_fn_map)
    elem = batch[0]
    # a new block of torch's caching host allocator for every batch: it is not handed out
    # again before the copy to the GPU that reads it has finished (never refilled in flight)
    out = torch.empty((len(batch), *elem.shape), dtype=elem.dtype, pin_memory=True)
    return torch.stack(list(batch), 0, out=out)


_PINNED_MAP = {**default_collate_fn_map, torch.Tensor: _pinned_tensor_collate}


def pinned_collate(batch: list[Any]) -> Any:
    """``default_collate``, but CPU tensors are stacked straight into pinned memory (tensors
    on a GPU are stacked there, as ``default_collate`` does)."""
    return _collate(batch, collate_fn_map=_PINNED_MAP)


def _pin_leaf(t: torch.Tensor) -> torch.Tensor:
    return t.pin_memory() if t.device.type == "cpu" and not t.is_pinned() else t


def pin_leaves(batch: Any) -> Any:
    """``batch`` with its CPU tensors pinned (copied into pinned memory unless they are
    already) and every other leaf as it is: a tensor already on a GPU stays there, where
    torch's ``pin_memory()`` (the DataLoader's ``pin_memory=True``) raises for it."""
    return tree_map(_pin_leaf, batch)


def _first_odd_sample(samples: Sequence[Any]) -> tuple[int, Any, Any] | None:
    """(position, first sample's structure, its structure) of the first sample that differs."""
    if not samples:
        return None
    want = tree_structure(samples[0])
    for k, s in enumerate(samples[1:], 1):
        got = tree_structure(s)
        if got != want:
            return k, want, got
    return None


class BatchFetcher:
    """Turns an index array into a collated batch (see the module docstring).

    ``reuse``: write CPU batches of a ``TensorDataset`` into buffers of ours again (opt-in,
    the loader's ``reuse_cpu_buffers=True``): a batch is then valid only until the next one
    is fetched; only where batches stay in this process, never in a DataLoader worker (its
    batch lives on in shared memory that the worker must not write again). Off by default:
    a kept batch is never overwritten.
    """

    def __init__(self, dataset: Any, collate_fn: Callable[[list[Any]], Any] | None,
                 pin: bool, rank: int, threads: int | None = None,
                 reuse: bool = False) -> None:
        self.dataset = dataset
        self.rank = rank
        self.pin = pin
        self.collate = collate_fn or (pinned_collate if pin else default_collate)
        tensors = getattr(dataset, "tensors", None)
        self._tensors: tuple[torch.Tensor, ...] | None = None
        if (collate_fn is None and isinstance(tensors, (tuple, list)) and tensors
                and all(isinstance(t, torch.Tensor) and not t.is_cuda for t in tensors)
                and type(dataset).__getitem__ is torch.utils.data.TensorDataset.__getitem__):
            self._tensors = tuple(tensors)
        getitems = getattr(dataset, "__getitems__", None)
        self._getitems = getitems if callable(getitems) else None
        self._threads = threads or min(8, os.cpu_count() or 1)
        self._pool: ThreadPoolExecutor | None = None
        #: CPU output buffers written again once nothing refers to them (opt-in, `_reuse`)
        self.buffers: _reuse.BufferPool | None = None
        if reuse and not pin and self._tensors is not None and _reuse.supported():
            self.buffers = _reuse.BufferPool(len(self._tensors))

    def __call__(self, indices: np.ndarray) -> Any:
        try:
            return self._fetch(indices)
        except SampleError:
            raise
        except Exception as e:
            shown = indices[:8].tolist()
            more = "..." if len(indices) > 8 else ""
            raise SampleError(
                f"rank {self.rank}: fetching or collating the batch of sample indices "
                f"{shown}{more} failed: {type(e).__name__}: {e}"
            ) from e

    def _fetch(self, indices: np.ndarray) -> Any:
        if self._tensors is not None:
            # default_collate of TensorDataset samples gives a list of stacked tensors
            return [self._gather(t, indices, k) for k, t in enumerate(self._tensors)]
        samples: list[Any]
        if self._getitems is not None:
            samples = self._getitems(indices.tolist())
        else:
            samples = []
            append, dataset, i = samples.append, self.dataset, None
            try:  # one try around the loop: the per-sample path costs what torch's does
                for i in indices.tolist():
                    append(dataset[i])
            except Exception as e:
                raise SampleError(f"rank {self.rank}: dataset[{i}] raised "
                                  f"{type(e).__name__}: {e}") from e
        try:
            return self.collate(samples)
        except Exception as e:
            odd = _first_odd_sample(samples)
            if odd is None:
                raise
            k, want, got = odd
            raise SampleError(
                f"rank {self.rank}: dataset[{int(indices[k])}] does not have the structure of "
                f"dataset[{int(indices[0])}] in the same batch ({got} vs {want}), so the batch "
                f"cannot be collated ({type(e).__name__}: {e}). Make every sample the same "
                "structure and shape, or pass a collate_fn that handles them"
            ) from e

    def _output(self, k: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if get_worker_info() is not None:
            # in a DataLoader worker: straight into shared memory, as default_collate does
            # there, so sending the batch to the main process copies nothing
            numel = 1
            for d in shape:
                numel *= d
            storage = torch.UntypedStorage._new_shared(numel * dtype.itemsize)
            return torch.empty(0, dtype=dtype).set_(storage).view(shape) if numel else \
                torch.empty(shape, dtype=dtype)
        if self.buffers is not None:
            return self.buffers.take(k, shape, dtype)
        # pinned memory comes from torch's caching host allocator, which recycles a block
        # once its copy to the GPU is done
        return torch.empty(shape, dtype=dtype, pin_memory=self.pin)

    def _gather(self, t: torch.Tensor, indices: np.ndarray, k: int) -> torch.Tensor:
        idx = torch.from_numpy(np.ascontiguousarray(indices, dtype=np.int64))
        out = self._output(k, (len(idx), *t.shape[1:]), t.dtype)
        nbytes = out.numel() * out.element_size()
        if self._threads <= 1 or nbytes < (4 << 20):
            return torch.index_select(t, 0, idx, out=out)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="horovod_iter-gather")
        bounds = np.linspace(0, len(idx), self._threads + 1).astype(int)
        futures = [self._pool.submit(torch.index_select, t, 0, idx[a:b], out=out[a:b])
                   for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        for f in futures:
            f.result()
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
