"""DistributedLoader / DistributedIterator: sampler -> fetch/collate -> end-of-data sync ->
device prefetch -> trainer. What ``iter(strategy.experimental_distribute_dataset(ds))`` gives
TensorFlow users, for PyTorch under Horovod, torchrun or one process.
"""
from __future__ import annotations

import copy
import itertools
import logging
import math
import time
import weakref
from collections.abc import Iterator, Mapping
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler

from .backend import Backend, get_backend
from .errors import OutOfRangeError
from .fetch import BatchFetcher, SampleError, ThreadedIterator
from .prefetch import CudaPrefetcher, _resolve_device, tree_map
from .progress import Progress, format_stats
from .sampler import DistributedSampler, _is_int
from .sync import UNEVEN, EndOfDataSync, check_same_config

__all__ = ["DistributedIterator", "DistributedLoader"]

log = logging.getLogger("horovod_iter")

_STATE_TYPE = "horovod_iter.DistributedLoader"
_STATE_VERSION = 1
_TYPE, _VERSION, _EPOCH, _STEPS, _WORLD = "type", "version", "epoch", "steps", "world_size"
_BATCH, _GLOBAL_BATCH = "batch_size", "global_batch_size"
_FINISHED, _SAMPLER = "finished", "sampler"
_loader_ids = itertools.count()
# Steps per end-of-data allreduce when every rank's batch count is known. Issuing a collective
# costs far more than checking a flag (~0.6 ms on a busy 2-core host), so few, large chunks;
# the flags are computed, not fetched, so travelling 2 chunks ahead costs no memory. A stalled
# rank is still noticed: the others wait at most `timeout` once they pass its last chunk.
_CHUNK = 64


class _IndexBatches(Sampler[list[int]]):
    """This rank's index batches from a frozen sampler view, for DataLoader's batch_sampler."""

    def __init__(self, view: DistributedSampler, start: int, batch_size: int,
                 drop_last: bool) -> None:
        self.view, self.start, self.batch_size, self.drop_last = view, start, batch_size, drop_last

    def arrays(self) -> Iterator[np.ndarray]:
        count, b, slot = self.view._rank_count(), self.batch_size, self.start
        while slot < count:
            end = min(slot + b, count)
            if end - slot < b and self.drop_last:
                return
            yield self.view.indices(slot, end)
            slot = end

    def __iter__(self) -> Iterator[list[int]]:
        return (a.tolist() for a in self.arrays())

    def __len__(self) -> int:
        return _steps_for(self.view._rank_count() - self.start, self.batch_size, self.drop_last)


class _ArrayBatches(Sampler[np.ndarray]):
    """The index arrays of an :class:`_IndexBatches`, as keys for :class:`_FetchedBatches`."""

    def __init__(self, batches: _IndexBatches) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[np.ndarray]:
        return self.batches.arrays()

    def __len__(self) -> int:
        return len(self.batches)


class _FetchedBatches(torch.utils.data.Dataset[Any]):
    """Whole batches fetched inside DataLoader workers by a :class:`BatchFetcher` (so the
    worker path also gathers tensors in bulk and names the rank and index on errors)."""

    def __init__(self, fetcher: BatchFetcher) -> None:
        self.fetcher = fetcher

    def __getitem__(self, indices: np.ndarray) -> Any:
        try:
            return self.fetcher(indices)
        except SampleError as e:  # sent back as a value: DataLoader would bury the message
            return _WorkerFailure(str(e))


class _WorkerFailure:
    def __init__(self, message: str) -> None:
        self.message = message


class _WorkerBatches:
    """Iterate a DataLoader with workers; ``close()`` stops them. Over
    :class:`_FetchedBatches` a worker's SampleError is raised here with its own message."""

    def __init__(self, dl: DataLoader[Any]) -> None:
        self._it: Any = iter(dl)

    def __iter__(self) -> _WorkerBatches:
        return self

    def __next__(self) -> Any:
        if self._it is None:
            raise StopIteration
        batch = next(self._it)
        if isinstance(batch, _WorkerFailure):
            self.close()
            raise SampleError(batch.message + " (in a DataLoader worker)")
        return batch

    def close(self) -> None:
        it, self._it = self._it, None
        shutdown = getattr(it, "_shutdown_workers", None)
        if callable(shutdown):
            shutdown()


def _whole_batch(batch: Any) -> Any:
    return batch


def _steps_for(count: int, batch_size: int, drop_last: bool) -> int:
    count = max(0, count)
    return count // batch_size if drop_last else math.ceil(count / batch_size)


def _rows(batch: Any, default: int) -> int:
    """Rows in a batch: the first dimension of its first tensor."""
    found: list[int] = []
    tree_map(lambda t: found.append(t.shape[0] if t.dim() else 1) if not found else None, batch)
    return found[0] if found else default


def _positive_int(name: str, value: Any) -> int:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


class DistributedLoader:
    """Iterate a dataset in data-parallel training or evaluation, every rank in lockstep.

    Each rank gets a disjoint slice of every epoch (map-style datasets through
    :class:`DistributedSampler`; an ``IterableDataset`` is used as given - shard it with
    :func:`horovod_iter.shard`); batches are fetched off the trainer's thread, checked for the
    end of data with one asynchronous allreduce per step, and copied to ``device`` on a side
    CUDA stream ``prefetch`` batches ahead.

    Args:
        dataset: a map-style dataset or an ``IterableDataset``.
        batch_size: samples per rank per step. Exactly one of this and ``global_batch_size``.
        global_batch_size: samples per step over all ranks (TensorFlow's meaning); each rank
            gets ``global_batch_size / W`` and it must divide evenly.
        shuffle, seed, drop_last: as for :class:`DistributedSampler` (map-style only);
            ``drop_last`` also drops a short last batch.
        sampler: your own sampler instead of ours (map-style only); any torch ``Sampler``
            works, but only ours resumes in O(1) and on another world size.
        num_workers, collate_fn, worker_init_fn: as for ``torch.utils.data.DataLoader``.
        pin_memory: pin host batches; ``None`` means "when ``device`` is CUDA".
        device: where batches go; ``None`` means the current CUDA device, or CPU.
        prefetch: batches copied ahead of the one being consumed.
        uneven: what happens when ranks run out at different steps: ``"stop"`` (all stop at
            the first step any rank has no batch; map-style data is padded as torch does, so
            nothing is lost), ``"pad"`` (ranks that ran out yield empty batches until all are
            done; no sample duplicated - for exact evaluation) or ``"error"``.
        timeout: seconds a rank waits for the others at a step before raising
            :class:`DataTimeoutError` naming the step (``None``: no limit).
        backend: a :class:`Backend`, or a backend name for :func:`horovod_iter.init`.
        progress: show a progress bar on rank 0 (tqdm if installed, else INFO log lines under
            the ``horovod_iter`` logger) and log the epoch's :meth:`stats` at its end.
        log_stats: log every rank's :meth:`stats` at DEBUG (INFO on rank 0 with ``progress``)
            at the end of each iteration.

    Example:
        >>> loader = DistributedLoader(dataset, batch_size=64, device="cuda")
        >>> for epoch in range(start_epoch, epochs):
        ...     loader.set_epoch(epoch)
        ...     for x, y in loader:
        ...         train_step(x, y)
        ...     torch.save({"loader": loader.state_dict(), ...}, path)
    """

    def __init__(self, dataset: Any, batch_size: int | None = None, *,
                 global_batch_size: int | None = None, shuffle: bool = True,
                 seed: int | None = 0, drop_last: bool = False,
                 sampler: Sampler[Any] | None = None, num_workers: int = 0,
                 collate_fn: Callable[[list[Any]], Any] | None = None,
                 pin_memory: bool | None = None, device: Any = None, prefetch: int = 2,
                 uneven: str = "stop", timeout: float | None = 300.0,
                 worker_init_fn: Callable[[int], None] | None = None,
                 backend: Backend | str | None = None, progress: bool = False,
                 log_stats: bool = True) -> None:
        from .backend import init

        self.backend = backend if isinstance(backend, Backend) else (
            init(backend) if backend is not None else get_backend())
        world = self.backend.size
        if (batch_size is None) == (global_batch_size is None):
            raise ValueError("pass exactly one of batch_size (per rank) and global_batch_size "
                             f"(over all ranks); got batch_size={batch_size!r}, "
                             f"global_batch_size={global_batch_size!r}")
        if global_batch_size is not None:
            g = _positive_int("global_batch_size", global_batch_size)
            if g % world:
                raise ValueError(
                    f"global_batch_size={g} is not divisible by the {world} ranks; use a "
                    f"multiple of {world} (e.g. {max(world, g - g % world)}) or batch_size"
                )
            self.batch_size = g // world
            self._global = True
            self._global_size = g
        else:
            self.batch_size = _positive_int("batch_size", batch_size)
            self._global = False
        if uneven not in UNEVEN:
            raise ValueError(f"uneven must be one of {UNEVEN}, got {uneven!r}")
        if not _is_int(prefetch) or prefetch < 0:
            raise ValueError(f"prefetch must be an int >= 0, got {prefetch!r}")
        if not _is_int(num_workers) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(
                timeout, (int, float)) or not timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds or None, "
                             f"got {timeout!r}")
        for flag, value in (("drop_last", drop_last), ("progress", progress),
                            ("log_stats", log_stats), ("shuffle", shuffle)):
            if not isinstance(value, (bool, np.bool_)):
                raise TypeError(f"{flag} must be a bool, got {value!r}")
        if uneven == "pad" and drop_last:
            raise ValueError("uneven='pad' counts every sample exactly once and drop_last=True "
                             "drops samples; choose one")
        self.dataset = dataset
        self.is_iterable = isinstance(dataset, IterableDataset)
        if not self.is_iterable:
            if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
                raise TypeError(
                    f"dataset must be a map-style dataset (with __getitem__ and __len__) or a "
                    f"torch IterableDataset, got {type(dataset).__name__}")
            if len(dataset) == 0:
                raise ValueError(
                    f"rank {self.backend.rank}: the dataset is empty (len 0), so there is "
                    "nothing to iterate; check the path or the split it was built from")
        if self.is_iterable:
            if sampler is not None:
                raise ValueError("sampler is for map-style datasets; an IterableDataset decides "
                                 "its own order (shard it with horovod_iter.shard)")
            self.sampler: Sampler[Any] | None = None
        elif sampler is None:
            self.sampler = DistributedSampler(dataset, world, self.backend.rank, shuffle=shuffle,
                                              seed=seed, drop_last=drop_last,
                                              pad=uneven != "pad")
        else:
            self.sampler = sampler
        self.drop_last = bool(drop_last)
        self.num_workers = int(num_workers)
        self.collate_fn = collate_fn
        self.worker_init_fn = worker_init_fn
        self.prefetch = int(prefetch)
        self.uneven = uneven
        self.timeout = None if timeout is None else float(timeout)
        self.progress = bool(progress)
        self.log_stats = bool(log_stats)
        self._device_arg = device
        self._pin_arg = pin_memory
        self.epoch = 0
        self._steps = 0          # batches handed to the trainer in this epoch
        self._finished = False   # the epoch ran to its end
        self._hold_finished = False
        self._skip = 0           # batches to skip on the next iteration (non-seekable resume)
        self._id = next(_loader_ids)
        self._serial = 0
        self._active: weakref.ReferenceType[DistributedIterator] | None = None
        self._last_stats: dict[str, Any] = {}

    # -- facts ------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return _resolve_device(self._device_arg)

    @property
    def pin_memory(self) -> bool:
        if self._pin_arg is not None:
            return bool(self._pin_arg) and torch.cuda.is_available()
        return self.device.type == "cuda"

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.backend.size

    def _ours(self) -> DistributedSampler | None:
        return self.sampler if isinstance(self.sampler, DistributedSampler) else None

    def __len__(self) -> int:
        """Steps every rank takes in the next iteration (the rest of the epoch if resumed)."""
        self._follow_world()
        s = self._ours()
        if s is not None:
            lengths = s.rank_lengths()
            counts = [_steps_for(c, self.batch_size, self.drop_last) for c in lengths]
            return min(counts) if self.uneven == "stop" else max(counts)
        if self.sampler is not None:
            n = len(self.sampler)  # type: ignore[arg-type]
            return max(0, _steps_for(n, self.batch_size, self.drop_last) - self._skip)
        raise TypeError("len() of a DistributedLoader over an IterableDataset is unknown; "
                        "give the dataset a map-style form to know the number of steps")

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (its order, for shuffled map-style data). Call it every epoch; a
        resumed run may call it with the saved epoch without losing its position."""
        if not _is_int(epoch) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        if int(epoch) != self.epoch:
            self._steps, self._finished, self._hold_finished, self._skip = 0, False, False, 0
        self.epoch = int(epoch)
        if self.sampler is not None and hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        elif hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def _config(self) -> dict[str, Any]:
        s = self._ours()
        return {
            "dataset": "iterable" if self.is_iterable else len(self.dataset),
            "batch_size": self.batch_size, "world_size": self.backend.size,
            "uneven": self.uneven, "drop_last": self.drop_last, "prefetch": self.prefetch,
            "epoch": self.epoch, "steps_done": self._steps,
            "sampler": None if s is None else {
                "seed": s.seed, "shuffle": s.shuffle, "pad": s.pad, "start": s._start,
                "slots": s._slots},
        }

    # -- iteration --------------------------------------------------------------------
    def _follow_world(self) -> None:
        """The backend's world changed under us (a Horovod elastic reset that skipped the
        state sync, e.g. ranks only removed): every surviving rank holds the same committed
        position, so each lays the rest of the epoch out over the new world by itself."""
        s = self._ours()
        b = self.backend
        if s is None or (s.num_replicas, s.rank) == (b.size, b.rank):
            return
        log.info("rank %d: world changed from %d to %d ranks; re-partitioning the rest of "
                 "epoch %d", b.rank, s.num_replicas, b.size, self.epoch)
        state = self.state_dict(follow=False)
        self._rebind_world(b.size, b.rank)
        self.load_state_dict(state)

    def __iter__(self) -> DistributedIterator:
        self._follow_world()
        previous = self._active() if self._active is not None else None
        if previous is not None:
            previous.close()
        it = DistributedIterator(self)
        self._active = weakref.ref(it)
        return it

    def _handed(self) -> None:
        self._steps += 1
        s = self._ours()
        if s is not None:
            s.record(self.batch_size)

    def _ended(self) -> None:
        self._finished = True

    def _abandon_active(self) -> None:
        """Close the iteration in flight without waiting for its collectives (they belong to
        a Horovod world that is gone: elastic reset)."""
        active = self._active() if self._active is not None else None
        if active is not None:
            active._sync.abandon()
            active.close()
        self._active = None

    def _rebind_world(self, size: int, rank: int) -> None:
        """Adopt a new world (elastic reset); call :meth:`load_state_dict` next."""
        if self._global:
            if self._global_size % size:
                raise ValueError(
                    f"global_batch_size={self._global_size} is not divisible by the new world "
                    f"size {size}; set --min-np/--max-np (or the host slots) so it divides, or "
                    "use batch_size (per rank)")
            self.batch_size = self._global_size // size
        s = self._ours()
        if s is not None:
            s.num_replicas, s.rank = int(size), int(rank)

    def stats(self) -> dict[str, Any]:
        """Figures of the current (or last) iteration: steps, samples, seconds the trainer
        waited for data and for the end-of-data check, host->device bytes."""
        active = self._active() if self._active is not None else None
        return active.stats() if active is not None else dict(self._last_stats)

    # -- state ------------------------------------------------------------------------
    def state_dict(self, *, follow: bool = True) -> dict[str, Any]:
        """The position as of the last batch handed to the trainer (prefetched batches are
        not consumed); JSON-serialisable."""
        if follow:
            self._follow_world()
        s = self._ours()
        world = s.num_replicas if s is not None else self.backend.size
        return {
            _TYPE: _STATE_TYPE, _VERSION: _STATE_VERSION, _EPOCH: self.epoch,
            _STEPS: self._steps, _WORLD: world, _BATCH: self.batch_size,
            _GLOBAL_BATCH: self.batch_size * world if self._global else None,
            _FINISHED: self._finished,
            _SAMPLER: None if s is None else s.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: the next iteration yields exactly the batches an uninterrupted run would
        have yielded next - with any prefetch depth and worker count, and (map-style data with
        our sampler) on another world size or backend."""
        if not isinstance(state, Mapping):
            raise TypeError(f"loader state must be a dict from state_dict(), got "
                            f"{type(state).__name__}")
        if state.get(_TYPE) != _STATE_TYPE:
            raise ValueError(f"not a horovod_iter loader state (type={state.get(_TYPE)!r}); "
                             "pass the dict returned by DistributedLoader.state_dict()")
        if state.get(_VERSION) != _STATE_VERSION:
            raise ValueError(f"loader state version {state.get(_VERSION)!r} is not supported "
                             f"(expected {_STATE_VERSION})")
        for key in (_EPOCH, _STEPS, _WORLD, _BATCH):
            if not _is_int(state.get(key)) or state[key] < 0:
                raise ValueError(f"invalid loader state: {key!r} must be an int >= 0, "
                                 f"got {state.get(key)!r}")
        if not isinstance(state.get(_FINISHED), bool):
            raise ValueError(f"invalid loader state: 'finished' must be a bool, "
                             f"got {state.get(_FINISHED)!r}")
        same_world = state[_WORLD] == self.backend.size
        s = self._ours()
        if s is not None:
            if not isinstance(state.get(_SAMPLER), Mapping):
                raise ValueError("loader state has no sampler state; it was saved by a loader "
                                 "over an IterableDataset or with a foreign sampler")
            s.load_state_dict(state[_SAMPLER])
        elif not same_world:
            raise ValueError(
                f"loader state was saved on {state[_WORLD]} ranks; without horovod_iter's "
                f"sampler (IterableDataset or a foreign sampler) it can only be resumed on "
                f"{state[_WORLD]} ranks, not {self.backend.size}"
            )
        self.epoch = int(state[_EPOCH])
        self._steps = int(state[_STEPS]) if same_world else 0
        self._finished = bool(state[_FINISHED])
        self._hold_finished = self._finished
        self._skip = 0 if s is not None else int(state[_STEPS])


class DistributedIterator:
    """One pass over a :class:`DistributedLoader` (create it with ``iter(loader)``).

    ``next()``/``get_next()`` hand out the next batch, already on the loader's device; at the
    end of data every rank stops at the same step. Closing it (``close()``, leaving a ``with``
    block, breaking out of a ``for`` loop and dropping it, or garbage collection) stops the
    fetch thread or DataLoader workers, waits for the end-of-data allreduce in flight and
    releases pinned buffers and CUDA streams.
    """

    def __init__(self, loader: DistributedLoader) -> None:
        self._loader = loader
        self._closed = False
        self._t0 = time.perf_counter()
        self._steps = 0
        self._samples = 0
        self._host: Any = None
        self._fetcher: BatchFetcher | None = None
        self._num_batches: int | None = None
        backend = loader.backend
        name = f"horovod_iter.{loader._id}.{loader._serial}"
        loader._serial += 1
        check_same_config(backend, loader._config(), loader.timeout, name)
        self._device = loader.device
        pin = loader.pin_memory
        self._host = self._host_batches(pin)
        empty = None
        if not loader.is_iterable and len(loader.dataset) > 0:
            ds = loader.dataset
            empty = lambda: BatchFetcher(ds, loader.collate_fn, False, backend.rank)(  # noqa: E731
                np.zeros(1, dtype=np.int64))
        # map-style with our sampler: this rank's batch count is known, so the flags of
        # _CHUNK steps go in one allreduce issued two chunks ahead; else one flag per step
        known = {"num_batches": self._num_batches, "chunk": _CHUNK, "lookahead": 2 * _CHUNK} \
            if self._num_batches is not None else {"lookahead": 2}
        self._sync = EndOfDataSync(self._host, backend, loader.uneven, loader.timeout,
                                   name=name, empty=empty, **known)
        self._prefetcher = CudaPrefetcher(self._sync, self._device, loader.prefetch,
                                          pin_memory=pin)
        iter(self._prefetcher)
        try:
            total: int | None = len(loader)
        except TypeError:
            total = None
        self._progress = Progress(total, f"horovod_iter epoch {loader.epoch}",
                                  loader.progress and backend.rank == 0)

    def _host_batches(self, pin: bool) -> Iterator[Any]:
        """This rank's host batches, fetched off the trainer's thread."""
        ld = self._loader
        rank = ld.backend.rank
        ours = ld._ours()
        if ours is None:
            if ld._hold_finished:  # resumed at the very end of an epoch: the rest is empty
                ld._hold_finished = False
                return iter(())
            if ld._finished:  # a finished epoch iterated again starts over, as torch does
                ld._steps, ld._finished = 0, False
        if ours is not None:
            start = ours._begin()  # the sampler applies the same two rules
            if start == 0 and ours._start == 0:
                ld._steps = 0
            ld._finished = False
            batches = _IndexBatches(copy.copy(ours), start, ld.batch_size, ld.drop_last)
            self._num_batches = len(batches)
            if ld.num_workers == 0:
                fetcher = BatchFetcher(ld.dataset, ld.collate_fn, pin, rank)
                self._fetcher = fetcher
                return ThreadedIterator(lambda: map(fetcher, batches.arrays()),
                                        depth=max(1, ld.prefetch), on_close=fetcher.close)
            in_worker = BatchFetcher(ld.dataset, ld.collate_fn, False, rank, threads=1)
            dl = DataLoader(_FetchedBatches(in_worker), batch_size=None,
                            sampler=_ArrayBatches(batches), num_workers=ld.num_workers,
                            collate_fn=_whole_batch, pin_memory=pin,
                            worker_init_fn=ld.worker_init_fn)
            return _WorkerBatches(dl)
        dl = DataLoader(ld.dataset, batch_size=ld.batch_size, sampler=ld.sampler,
                        num_workers=ld.num_workers, collate_fn=ld.collate_fn, pin_memory=pin,
                        drop_last=ld.drop_last, worker_init_fn=ld.worker_init_fn)
        skip, ld._skip = ld._skip, 0
        if ld.num_workers == 0:
            return ThreadedIterator(lambda: itertools.islice(iter(dl), skip, None),
                                    depth=max(1, ld.prefetch))
        workers = _WorkerBatches(dl)
        for _ in range(skip):  # an iterable cannot seek: replay (O(steps))
            next(workers, None)
        return workers

    # -- protocol ---------------------------------------------------------------------
    def __iter__(self) -> DistributedIterator:
        return self

    def __next__(self) -> Any:
        if self._closed:
            raise StopIteration
        try:
            batch = next(self._prefetcher)
        except StopIteration:
            self._loader._ended()
            self.close()
            raise
        except BaseException:
            self.close()
            raise
        self._loader._handed()
        self._steps += 1
        self._progress.update()
        self._samples += _rows(batch, self._loader.batch_size)
        return batch

    def get_next(self) -> Any:
        """The next batch; raises :class:`OutOfRangeError` at the end of data, at the same
        step on every rank."""
        try:
            return next(self)
        except StopIteration:
            raise OutOfRangeError(
                f"end of data after step {self._loader._steps} (rank {self._loader.backend.rank})"
            ) from None

    def get_next_as_optional(self) -> Any | None:
        """The next batch, or ``None`` at the end of data."""
        try:
            return next(self)
        except StopIteration:
            return None

    def stats(self) -> dict[str, Any]:
        """Steps, samples, seconds waiting for data / in the end-of-data check, h2d bytes."""
        elapsed = time.perf_counter() - self._t0
        p, s = self._prefetcher, self._sync
        return {
            "steps": self._steps, "samples": self._samples, "elapsed_s": elapsed,
            "data_wait_s": p.wait_s, "input_bound_fraction": p.wait_s / elapsed if elapsed else 0.0,
            "sync_wait_s": s.wait_s, "h2d_bytes": p.h2d_bytes,
            "h2d_gbps": p.h2d_bytes / elapsed / 1e9 if elapsed else 0.0,
            "padded_steps": s.padded_steps,
        }

    def close(self) -> None:
        """Release workers, threads, pinned buffers and streams; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            stats = self._loader._last_stats = self.stats()
            self._progress.close(stats)
            if self._loader.log_stats:
                log.debug("rank %d, epoch %d: %s", self._loader.backend.rank,
                          self._loader.epoch, format_stats(stats))
            self._prefetcher.close()  # closes the sync too (waits for its allreduce)
        finally:
            host, self._host = self._host, None
            if hasattr(host, "close"):  # fetch thread or DataLoader workers
                host.close()

    def __enter__(self) -> DistributedIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
