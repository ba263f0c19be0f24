"""Host side of the pipeline: indices -> samples -> collated batch, off the trainer's thread.

* Whole batches are fetched at once where the dataset allows it: ``TensorDataset`` (and any
  dataset exposing ``tensors``) is gathered with ``index_select`` in parallel threads straight
  into freshly allocated pinned memory (torch's caching host allocator recycles those blocks once
  their copies are done); datasets with ``__getitems__`` get the whole index list, as
  ``torch.utils.data.DataLoader`` does; others are read sample by sample.
* With the default collate and a CUDA target, tensors are stacked directly into pinned memory
  (no second copy by a pinning thread).
* ``num_workers == 0``: a background thread runs the fetch ahead of the trainer. With workers,
  ``torch.utils.data.DataLoader`` does (its workers, transforms, collate functions and
  ``worker_init_fn`` behave as users know them).
"""
from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import get_worker_info
from torch.utils.data._utils.collate import collate as _collate
from torch.utils.data._utils.collate import default_collate, default_collate_fn_map

from .backend import get_backend

__all__ = ["BatchFetcher", "SampleError", "ThreadedIterator", "pinned_collate", "shard"]


def shard(iterable: Iterable[Any], rank: int | None = None,
          num_replicas: int | None = None) -> Iterator[Any]:
    """Yield this rank's (and this DataLoader worker's) share of ``iterable``: element ``i``
    goes to the consumer ``i mod (W * workers)``. Use it inside an ``IterableDataset``::

        class Lines(IterableDataset):
            def __iter__(self):
                return horovod_iter.shard(open(path))

    ``rank``/``num_replicas`` default to the backend's; the worker split comes from
    ``torch.utils.data.get_worker_info()``.
    """
    if rank is None or num_replicas is None:
        b = get_backend()
        rank = b.rank if rank is None else rank
        num_replicas = b.size if num_replicas is None else num_replicas
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ValueError(f"need 0 <= rank < num_replicas, got rank={rank}, "
                         f"num_replicas={num_replicas}")
    info = get_worker_info()
    workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
    stride, offset = num_replicas * workers, rank * workers + worker
    for i, item in enumerate(iterable):
        if i % stride == offset:
            yield item


def _pinned_tensor_collate(batch: Sequence[torch.Tensor], *,
                           collate_fn_map: dict | None = None) -> torch.Tensor:
    elem = batch[0]
    out = torch.empty((len(batch), *elem.shape), dtype=elem.dtype, pin_memory=True)
    return torch.stack(list(batch), 0, out=out)


_PINNED_MAP = {**default_collate_fn_map, torch.Tensor: _pinned_tensor_collate}


def pinned_collate(batch: list[Any]) -> Any:
    """``default_collate``, but tensors are stacked straight into pinned memory."""
    return _collate(batch, collate_fn_map=_PINNED_MAP)


def _structure(x: Any) -> Any:
    """A comparable description of a sample: containers, types, tensor shapes and dtypes."""
    if isinstance(x, torch.Tensor):
        return ("Tensor", tuple(x.shape), str(x.dtype))
    if isinstance(x, np.ndarray):
        return ("ndarray", x.shape, str(x.dtype))
    if isinstance(x, Mapping):
        return ("dict", tuple(sorted((str(k), _structure(v)) for k, v in x.items())))
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, tuple(_structure(v) for v in x))
    return type(x).__name__


def _first_odd_sample(samples: Sequence[Any]) -> tuple[int, Any, Any] | None:
    """(position, first sample's structure, its structure) of the first sample that differs."""
    if not samples:
        return None
    want = _structure(samples[0])
    for k, s in enumerate(samples[1:], 1):
        got = _structure(s)
        if got != want:
            return k, want, got
    return None


class SampleError(RuntimeError):
    """Reading or collating samples failed; the message names the rank and the indices."""


class BatchFetcher:
    """Turns an index array into a collated batch (see the module docstring)."""

    def __init__(self, dataset: Any, collate_fn: Callable[[list[Any]], Any] | None,
                 pin: bool, rank: int, threads: int | None = None) -> None:
        self.dataset = dataset
        self.rank = rank
        self.pin = pin
        self.user_collate = collate_fn
        self.collate = collate_fn or (pinned_collate if pin else default_collate)
        tensors = getattr(dataset, "tensors", None)
        self._tensors: tuple[torch.Tensor, ...] | None = None
        if (collate_fn is None and isinstance(tensors, (tuple, list)) and tensors
                and all(isinstance(t, torch.Tensor) and not t.is_cuda for t in tensors)
                and type(dataset).__getitem__ is torch.utils.data.TensorDataset.__getitem__):
            self._tensors = tuple(tensors)
        self._threads = threads or min(8, os.cpu_count() or 1)
        self._pool: ThreadPoolExecutor | None = None

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
            return [self._gather(t, indices) for t in self._tensors]
        getitems = getattr(self.dataset, "__getitems__", None)
        if callable(getitems):
            samples = getitems(indices.tolist())
        else:
            samples = []
            for i in indices.tolist():
                try:
                    samples.append(self.dataset[i])
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

    def _gather(self, t: torch.Tensor, indices: np.ndarray) -> torch.Tensor:
        idx = torch.from_numpy(np.ascontiguousarray(indices, dtype=np.int64))
        out = torch.empty((len(idx), *t.shape[1:]), dtype=t.dtype, pin_memory=self.pin)
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
            self._pool.shutdown(wait=True)
            self._pool = None


class _End:
    pass


class _Raised:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class ThreadedIterator:
    """Run ``make()``'s iterator in a daemon thread, ``depth`` items ahead; exceptions are
    re-raised in the consumer. ``close()`` stops and joins the thread."""

    def __init__(self, make: Callable[[], Iterator[Any]], depth: int = 2,
                 on_close: Callable[[], None] | None = None) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._on_close = on_close
        self._done = False
        self._thread = threading.Thread(target=self._run, args=(make,), daemon=True,
                                        name="horovod_iter-fetch")
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, make: Callable[[], Iterator[Any]]) -> None:
        try:
            for item in make():
                if not self._put(item):
                    return
            self._put(_End())
        except BaseException as e:  # delivered to the consumer
            self._put(_Raised(e))

    def __iter__(self) -> ThreadedIterator:
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if isinstance(item, _End):
            self._done = True
            raise StopIteration
        if isinstance(item, _Raised):
            self._done = True
            raise item.exc
        return item

    def close(self) -> None:
        self._done = True
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        if self._on_close is not None:
            self._on_close()
            self._on_close = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
