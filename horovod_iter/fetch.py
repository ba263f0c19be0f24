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
import ctypes
import itertools
import signal
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler, get_worker_info
from torch.utils.data._utils.collate import default_collate

from ._tree import ErrorBox
from .backend import get_backend
from .errors import DataTimeoutError, SampleError, ShardingError
from .gather import BatchFetcher
from .plan import EpochPlan, steps_for

__all__ = ["FetchOptions", "HostSource", "host_batches", "is_stateful", "plan_batches",
           "shard"]


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
    if type(iterable).__module__.split(".")[0] == "webdataset":
        raise ShardingError(
            f"horovod_iter.shard() over a WebDataset pipeline ({type(iterable).__name__}): "
            "WebDataset splits its shards by node and DataLoader worker itself, and shard() "
            "would split its samples again, losing most of the data. Use "
            "horovod_iter.ShardedDataset(urls, horovod_iter.integrations.webdataset.reader("
            "...)) (each shard read once, resumable on any world), or WebDataset's own "
            "splitting without shard()")
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
    persistent_workers: bool = False
    #: seconds to wait for a batch from a DataLoader worker (the loader's ``timeout``)
    timeout: float | None = None
    multiprocessing_context: Any = None
    generator: Any = None
    prefetch_factor: int | None = None
    in_order: bool = True


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
    """The index batches of the current pass (set anew per pass: persistent workers)."""

    def __init__(self, arrays: Iterator[np.ndarray]) -> None:
        self.arrays = arrays

    def __iter__(self) -> Iterator[np.ndarray]:
        return self.arrays


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

    def __init__(self, dataset: Any, opts: FetchOptions, resume: Any = None) -> None:
        self.dataset = dataset
        self.opts = opts
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
        if getattr(ds, "canonical", None):  # the dataset cuts the steps itself
            batches = ds.step_batches()
            if stateful and self.resume is not None:
                ds.load_state_dict(None)
            for samples in batches:
                position = {"consumer": consumer, "state": ds.state_dict()}
                yield collate(samples), position
            return
        bs, it = self.opts.batch_size, iter(ds)
        if stateful and self.resume is not None and getattr(ds, "elastic_state", False):
            ds.load_state_dict(None)  # in the main process (no workers): only this pass resumes
        while True:
            samples = list(itertools.islice(it, bs))
            if not samples or (self.opts.drop_last and len(samples) < bs):
                return
            position = {"consumer": consumer, "state": ds.state_dict() if stateful else None}
            yield collate(samples), position


class _WorkerSource(HostSource):
    """A torch DataLoader (with or without workers); ``close()`` stops its workers. A failure
    names the rank and the step (map-style failures come back as values, with their own
    message); iterable batches arrive with their consumer's position."""

    def __init__(self, dl: DataLoader[Any], count: int | None, rank: int, skip: int = 0,
                 tagged: bool = False) -> None:
        self._persistent = dl.persistent_workers
        self._timeout = dl.timeout
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
            raise self._error(e) from e
        if isinstance(batch, ErrorBox):
            self.close()
            batch.reraise()
        self._step += 1
        if self._tagged:
            batch, position = batch
            self.positions.append(position)  # type: ignore[union-attr]
        return batch

    def _error(self, e: Exception) -> Exception:
        """Our error for what came out of torch's DataLoader at this step."""
        text = str(e)
        where = f"rank {self._rank}, step {self._step} of this pass"
        if isinstance(e, RuntimeError) and "DataLoader timed out" in text:
            return DataTimeoutError(
                f"{where}: no batch from this rank's DataLoader workers within "
                f"{self._timeout} s (the loader's timeout): a worker is stuck in the dataset's "
                "code or deadlocked (e.g. at fork, by a lock another thread held); test with "
                "num_workers=0, or raise `timeout` if a batch is just slow")
        if isinstance(e, RuntimeError) and "DataLoader worker" in text and (
                "exited unexpectedly" in text or "killed by signal" in text):
            return SampleError(f"{where}: a DataLoader worker of this rank died: {text}")
        return SampleError(f"{where}: the dataset raised: {type(e).__name__}: {e}")

    def close(self) -> None:
        it, self._it = self._it, None
        shutdown = getattr(it, "_shutdown_workers", None)
        if callable(shutdown) and not self._persistent:  # persistent: the loader's to stop
            shutdown()


_PR_SET_PDEATHSIG = 1


def _find_prctl() -> Any:
    """libc's ``prctl``, looked up here in the parent: a ``dlopen``/``dlsym`` in a forked
    worker could deadlock on the loader's lock if another thread held it at the fork."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # no prctl: torch's own watchdog remains
        return None


_prctl = _find_prctl()


class _WorkerInit:
    """Runs first in each DataLoader worker of ours: the worker dies with its rank (Linux's
    parent-death signal), so a rank killed or ended by its launcher leaves no worker behind
    to hold the launcher's output open; then the user's ``worker_init_fn``."""

    def __init__(self, user: Callable[[int], None] | None) -> None:
        self.user = user

    def __call__(self, worker_id: int) -> None:
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if self.user is not None:
            self.user(worker_id)


def _loader_kwargs(opts: FetchOptions) -> dict[str, Any]:
    """DataLoader arguments shared by both worker paths."""
    workers = opts.num_workers
    extra: dict[str, Any] = {}
    if workers:
        extra = dict(multiprocessing_context=opts.multiprocessing_context,
                     prefetch_factor=opts.prefetch_factor, in_order=opts.in_order)
    return dict(num_workers=workers, pin_memory=opts.pin,
                worker_init_fn=_WorkerInit(opts.worker_init_fn) if workers else
                opts.worker_init_fn, generator=opts.generator,
                timeout=float(opts.timeout) if workers and opts.timeout else 0, **extra)


def host_batches(dataset: Any, opts: FetchOptions, *,
                 indices: tuple[Iterator[np.ndarray], int | None] | None = None,
                 resume: Any = None, skip: int = 0,
                 workers: dict[Any, DataLoader[Any]] | None = None) -> HostSource:
    """This rank's host batches: from index batches (map-style), or from the iterable itself
    (``indices=None``): resumed from ``resume`` (a stateful dataset) or by replaying ``skip``
    batches. ``workers`` keeps the DataLoader of persistent workers between passes."""
    if indices is not None:
        arrays, count = indices
        if opts.num_workers == 0:
            return _InlineSource(arrays, count, BatchFetcher(dataset, opts.collate_fn, opts.pin,
                                                             opts.rank, reuse=True))
        key = (opts.rank, opts.num_workers, opts.pin)
        dl = workers.get(key) if workers is not None and opts.persistent_workers else None
        if dl is None:
            fetcher = BatchFetcher(dataset, opts.collate_fn, False, opts.rank, threads=1)
            dl = DataLoader(_FetchedBatches(fetcher), batch_size=None, sampler=_Keys(arrays),
                            collate_fn=_whole_batch, persistent_workers=opts.persistent_workers,
                            **_loader_kwargs(opts))
            if workers is not None and opts.persistent_workers:
                workers.clear()  # another rank or layout: the old workers go
                workers[key] = dl
        dl.sampler.arrays = arrays  # type: ignore[attr-defined]
        return _WorkerSource(dl, count, opts.rank)
    batches = DataLoader(_IterableBatches(dataset, opts, resume), batch_size=None,
                         collate_fn=_whole_batch, **_loader_kwargs(opts))
    return _WorkerSource(batches, None, opts.rank, skip, tagged=True)
