"""Host side of the pipeline: index batches -> samples -> collated batch, as a ``HostSource``.

`host_batches()` chooses the fetch path by dispatch and returns a source that carries its
own batch count (``None`` when unknown) and ``close()``:

* **index batches** (our sampler's plan, or a foreign sampler's indices grouped into batches):
  with ``num_workers=0`` fetched in the caller's thread, as torch's DataLoader does (no hand-off
  between threads); with workers, whole batches are fetched inside torch DataLoader workers.
  Either way a `BatchFetcher` gathers ``TensorDataset`` tensors in bulk with
  ``index_select`` (in parallel threads for large batches), gives ``__getitems__`` the whole
  index list, and names the rank and the index when a sample fails.
* **iterable data**: a torch DataLoader over the ``IterableDataset`` (its workers, collate and
  ``worker_init_fn`` as users know them); a failure names the rank and the step.

``shard`` splits a plain iterable by rank and DataLoader worker.
"""
from __future__ import annotations

import collections
import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler, get_worker_info
from torch.utils.data._utils.collate import collate as _collate
from torch.utils.data._utils.collate import default_collate, default_collate_fn_map

from ._tree import ErrorBox, tree_structure
from .backend import get_backend
from .errors import SampleError
from .plan import EpochPlan, steps_for

__all__ = ["BatchFetcher", "FetchOptions", "HostSource", "host_batches", "is_stateful",
           "pinned_collate", "plan_batches", "shard"]


def shard(iterable: Iterable[Any], rank: int | None = None,
          num_replicas: int | None = None) -> Iterator[Any]:
    """Yield this rank's (and this DataLoader worker's) share of ``iterable``: element ``i``
    goes to the consumer ``i mod (W * workers)``. Every consumer reads the whole stream; for
    sharded files use `ShardedDataset`, which reads each file once.

    Use it inside an ``IterableDataset``::

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
    return itertools.islice(iterable, offset, None, stride)


def _pinned_tensor_collate(batch: Sequence[torch.Tensor], *,
                           collate_fn_map: dict | None = None) -> torch.Tensor:
    elem = batch[0]
    out = torch.empty((len(batch), *elem.shape), dtype=elem.dtype, pin_memory=True)
    return torch.stack(list(batch), 0, out=out)


_PINNED_MAP = {**default_collate_fn_map, torch.Tensor: _pinned_tensor_collate}


def pinned_collate(batch: list[Any]) -> Any:
    """``default_collate``, but tensors are stacked straight into pinned memory."""
    return _collate(batch, collate_fn_map=_PINNED_MAP)


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
    """Turns an index array into a collated batch (see the module docstring)."""

    def __init__(self, dataset: Any, collate_fn: Callable[[list[Any]], Any] | None,
                 pin: bool, rank: int, threads: int | None = None) -> None:
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
        if self._getitems is not None:
            samples = self._getitems(indices.tolist())
        else:
            samples = []
            dataset = self.dataset
            for i in indices.tolist():
                try:
                    samples.append(dataset[i])
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
            self._pool.shutdown(wait=False)
            self._pool = None


@dataclass(frozen=True)
class FetchOptions:
    """How batches are made on this rank (the DataLoader-like arguments of the loader)."""

    batch_size: int
    drop_last: bool = False
    num_workers: int = 0
    collate_fn: Callable[[list[Any]], Any] | None = None
    worker_init_fn: Callable[[int], None] | None = None
    pin: bool = False
    rank: int = 0


class HostSource(Iterator[Any]):
    """This rank's host batches for one pass; ``num_batches`` is their count when known.

    Iterable data reports, for each batch it yields, its consumer's position after it
    (``positions``, in yield order), so that the loader can count the batches it hands out.
    """

    num_batches: int | None = None
    positions: collections.deque[dict[str, Any]] | None = None

    def close(self) -> None:
        """Release threads and worker processes; idempotent, never blocks on other ranks."""


def plan_batches(plan: EpochPlan, first: int, batch_size: int,
                 drop_last: bool) -> tuple[Iterator[np.ndarray], int]:
    """This rank's index batches of a plan from slot ``first``, and their count. Indices are
    computed a growing chunk of batches at a time (the permutation is vectorised: one index
    alone costs as much as thousands), the first chunk small so the first batch comes fast."""
    count = plan.count()
    if drop_last:
        count = first + (max(0, count - first) // batch_size) * batch_size

    def arrays() -> Iterator[np.ndarray]:
        slot, per_chunk = first, 4
        while slot < count:
            end = min(count, slot + per_chunk * batch_size)
            chunk = plan.indices(slot, end)
            for a in range(0, len(chunk), batch_size):
                yield chunk[a:a + batch_size]
            slot, per_chunk = end, min(per_chunk * 4, max(1, (1 << 16) // batch_size))

    return arrays(), steps_for(count - first, batch_size, drop_last)


def sampler_batches(sampler: Sampler[Any], skip: int, batch_size: int,
                    drop_last: bool) -> tuple[Iterator[np.ndarray], int | None]:
    """A foreign sampler's indices from the ``skip``-th on, grouped into batches."""
    it = itertools.islice(iter(sampler), skip, None)

    def arrays() -> Iterator[np.ndarray]:
        while True:
            batch = list(itertools.islice(it, batch_size))
            if not batch or (drop_last and len(batch) < batch_size):
                return
            yield np.asarray(batch, dtype=np.int64)

    try:
        n: int | None = steps_for(len(sampler) - skip, batch_size, drop_last)  # type: ignore[arg-type]
    except TypeError:
        n = None
    return arrays(), n


class _InlineSource(HostSource):
    """Index batches fetched in the caller's thread (``num_workers=0``)."""

    def __init__(self, arrays: Iterator[np.ndarray], count: int | None,
                 fetcher: BatchFetcher) -> None:
        self._arrays: Iterator[np.ndarray] | None = arrays
        self._fetch = fetcher
        self.num_batches = count

    def __next__(self) -> Any:
        if self._arrays is None:
            raise StopIteration
        return self._fetch(next(self._arrays))

    def close(self) -> None:
        self._arrays = None
        self._fetch.close()


class _FetchedBatches(torch.utils.data.Dataset[Any]):
    """Whole batches fetched inside DataLoader workers by a `BatchFetcher`."""

    def __init__(self, fetcher: BatchFetcher) -> None:
        self.fetcher = fetcher

    def __getitem__(self, indices: np.ndarray) -> Any:
        try:
            return self.fetcher(indices)
        except SampleError as e:  # sent back as a value: DataLoader would bury the message
            return ErrorBox(SampleError(f"{e} (in a DataLoader worker)"))


class _Keys(Sampler[np.ndarray]):
    def __init__(self, arrays: Iterator[np.ndarray]) -> None:
        self._arrays = arrays

    def __iter__(self) -> Iterator[np.ndarray]:
        return self._arrays


def _whole_batch(batch: Any) -> Any:
    return batch


def is_stateful(dataset: Any) -> bool:
    """torchdata's ``Stateful`` protocol: ``state_dict()`` and ``load_state_dict()``."""
    return callable(getattr(dataset, "state_dict", None)) and callable(
        getattr(dataset, "load_state_dict", None))


class _IterableBatches(IterableDataset[Any]):
    """Batches an ``IterableDataset`` inside each DataLoader worker (or the main process),
    and sends each batch with its consumer's position after it: a stateful dataset's own
    ``state_dict()``, taken with the batches it produced (torchdata does the same).

    ``resume``: for a stateful dataset, what to load before iterating: one merged state
    (datasets with ``elastic_state``, e.g. ``ShardedDataset``) or a list indexed by consumer.
    """

    def __init__(self, dataset: Any, opts: FetchOptions, world: int,
                 resume: Any = None) -> None:
        self.dataset = dataset
        self.opts = opts
        self.world = world
        self.resume = resume

    def __iter__(self) -> Iterator[tuple[Any, dict[str, Any]]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        consumer = self.opts.rank * workers + worker
        ds = self.dataset
        stateful = is_stateful(ds)
        if stateful and self.resume is not None:
            if getattr(ds, "elastic_state", False):
                ds.load_state_dict(self.resume)
            elif self.resume[consumer] is not None:
                ds.load_state_dict(self.resume[consumer])
        collate = self.opts.collate_fn or default_collate
        bs, it = self.opts.batch_size, iter(ds)
        if stateful and self.resume is not None and getattr(ds, "elastic_state", False):
            ds.load_state_dict(None)  # in the main process (no workers): only this pass resumes
        while True:
            samples = list(itertools.islice(it, bs))
            if not samples or (self.opts.drop_last and len(samples) < bs):
                return
            position = {"consumer": consumer, "consumers": self.world * workers,
                        "state": ds.state_dict() if stateful else None}
            yield collate(samples), position


class _WorkerSource(HostSource):
    """A torch DataLoader (with or without workers); ``close()`` stops its workers. A failure
    names the rank and the step (map-style failures come back as values, with their own
    message); iterable batches arrive with their consumer's position."""

    def __init__(self, dl: DataLoader[Any], count: int | None, rank: int, skip: int = 0,
                 tagged: bool = False) -> None:
        self._it: Any = iter(dl)
        self.num_batches = count
        self._rank = rank
        self._step = 0
        self._tagged = tagged
        self.positions = collections.deque() if tagged else None
        for _ in range(skip):  # an iterable without state cannot seek: replay (O(steps))
            if next(self, None) is None:
                break
        if self.positions is not None:
            self.positions.clear()
        self._step = 0

    def __next__(self) -> Any:
        if self._it is None:
            raise StopIteration
        try:
            batch = next(self._it)
        except StopIteration:
            self.close()
            raise
        except Exception as e:
            self.close()
            raise SampleError(f"rank {self._rank}: the dataset raised at step {self._step} of "
                              f"this pass: {type(e).__name__}: {e}") from e
        if isinstance(batch, ErrorBox):
            self.close()
            batch.reraise()
        self._step += 1
        if self._tagged:
            batch, position = batch
            self.positions.append(position)  # type: ignore[union-attr]
        return batch

    def close(self) -> None:
        it, self._it = self._it, None
        shutdown = getattr(it, "_shutdown_workers", None)
        if callable(shutdown):
            shutdown()


def host_batches(dataset: Any, opts: FetchOptions, *,
                 indices: tuple[Iterator[np.ndarray], int | None] | None = None,
                 world: int = 1, resume: Any = None, skip: int = 0) -> HostSource:
    """This rank's host batches: from index batches (map-style), or from the iterable itself
    (``indices=None``): resumed from ``resume`` (a stateful dataset) or by replaying ``skip``
    batches."""
    if indices is not None:
        arrays, count = indices
        if opts.num_workers == 0:
            return _InlineSource(arrays, count, BatchFetcher(dataset, opts.collate_fn, opts.pin,
                                                             opts.rank))
        fetcher = BatchFetcher(dataset, opts.collate_fn, False, opts.rank, threads=1)
        dl = DataLoader(_FetchedBatches(fetcher), batch_size=None, sampler=_Keys(arrays),
                        num_workers=opts.num_workers, collate_fn=_whole_batch,
                        pin_memory=opts.pin, worker_init_fn=opts.worker_init_fn)
        return _WorkerSource(dl, count, opts.rank)
    batches = DataLoader(_IterableBatches(dataset, opts, world, resume), batch_size=None,
                         num_workers=opts.num_workers, collate_fn=_whole_batch,
                         pin_memory=opts.pin, worker_init_fn=opts.worker_init_fn)
    return _WorkerSource(batches, None, opts.rank, skip, tagged=True)
