"""DistributedLoader: the composition sampler -> fetch/collate -> end-of-data sync -> device
prefetch -> trainer, and its position. What ``iter(strategy.experimental_distribute_dataset(
ds))`` gives TensorFlow users, for PyTorch under Horovod, torchrun or one process.

The position model (the contract; docs/checkpoints.md says it for users):

* every ``iter(loader)`` starts the current epoch from its beginning, as torch's DataLoader
  does - after a finished pass, a ``break``, a peek, or ``drop_last`` alike;
* the one exception: the first ``iter()`` after `load_state_dict()`
  (and after a Horovod elastic restore/sync or a world change, which are loads) resumes at the
  loaded position; the iteration after it starts over (torchdata ``StatefulDataLoader``'s rule);
* ``len(loader)`` is the batch count of a full pass of the current epoch on this rank;
* ``set_epoch()`` affects the next ``iter()``, never a pass in flight;
* the position counts the batches handed to the user, never prefetched ones.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import warnings
import weakref
from collections.abc import Iterable, Mapping
from typing import Any, Callable

import torch
from torch.utils.data import IterableDataset, Sampler

from .backend import Backend, get_backend, init, is_provisional
from .batching import LengthGroupedBatchSampler, RankBatches, batch_sampler_batches
from .errors import ShardingError
from .fetch import (
    FetchOptions,
    HostSource,
    host_batches,
    is_stateful,
    plan_batches,
    sampler_batches,
)
from .iterator import DistributedIterator, Pass, fetching_ahead
from .loader_config import UNSET as _UNSET
from .loader_config import Unset as _Unset
from .loader_config import (
    check_arguments,
    check_batch_sampler,
    check_even,
    check_even_batches,
    check_worker_options,
    loader_sampler,
    positive_int,
    warn_foreign_world,
)
from .loader_state import (
    BATCH,
    BATCH_SAMPLER,
    DATASET,
    EPOCH,
    FINISHED,
    GLOBAL_BATCH,
    ITERATIONS,
    MESSAGES,
    SAMPLER,
    SAMPLES,
    STATE_TYPE,
    STATE_VERSION,
    STEPS,
    TYPE,
    UNEVEN_MODE,
    VERSION,
    WORLD,
    Resume,
    check_dataset_state,
    gather_dataset_state,
    validate,
)
from .mixing import MixedDataset
from .plan import steps_for
from .prefetch import resolve_device
from .sampler import DistributedSampler, is_int
from .sync import LOOKAHEAD_BYTES, MessageCounter, Uneven, agree_on_state

__all__ = ["DistributedIterator", "DistributedLoader"]

_loader_ids = itertools.count()


class DistributedLoader:
    """Iterate a dataset in data-parallel training or evaluation, every rank in lockstep.

    Each rank gets a disjoint slice of every epoch (map-style datasets through
    `DistributedSampler`; an ``IterableDataset`` is used as given: shard it with
    `ShardedDataset` or `shard()`). The end of data is agreed by the ranks with
    asynchronous allreduces of has-data flags that travel ahead of the steps (for map-style
    data 64 steps per collective), and batches are copied to ``device`` on a side CUDA stream
    ``prefetch`` batches ahead.

    It takes every argument of ``torch.utils.data.DataLoader`` (torch 2.13), by name and in
    torch's positional order, with torch's meaning; the rest are keyword-only.

    Args:
        dataset: a map-style dataset or an ``IterableDataset``.
        batch_size: samples per rank per step (torch's default 1). Not with
            ``global_batch_size``.
        shuffle: as for `DistributedSampler` (map-style only); ``None`` (the default)
            shuffles, as torch's ``DistributedSampler`` does, unless a ``batch_sampler``
            decides the order.
        sampler: your own sampler instead of ours (map-style only). Ours resumes in O(1) and
            on another world size; any other resumes on the same world size by skipping
            the indices already consumed (no data is read for them).
        batch_sampler: batches of indices instead of ``batch_size``/``shuffle``/``sampler``/
            ``drop_last`` (torch's rule): `LengthGroupedBatchSampler` (resumes on any world
            size), or any batch sampler that yields this rank's share (e.g. built over
            `DistributedSampler`; resumes on the same world size by skipping batches).
        num_workers, collate_fn, worker_init_fn, multiprocessing_context, generator,
            prefetch_factor, persistent_workers, in_order: as for
            ``torch.utils.data.DataLoader`` (``persistent_workers`` map-style only).
        pin_memory: pin host batches; ``None`` means "when ``device`` is CUDA".
        pin_memory_device: accepted for torch's signature (deprecated there); ``device``
            says where batches go.
        drop_last: as for `DistributedSampler`; also drops a short last batch.
        timeout: seconds a rank waits for the others, and for a batch from its DataLoader
            workers, before raising `DataTimeoutError` naming the step (``None`` or torch's
            ``0``: no limit). Kept as ``sync_timeout``; ``loader.timeout`` is torch's
            attribute (the worker timeout a DataLoader built from this loader would take).
        global_batch_size: samples per step over all ranks (TensorFlow's meaning); each rank
            gets ``global_batch_size / W`` and it must divide evenly.
        seed: as for `DistributedSampler` (map-style only).
        device: where batches go; ``None`` means the current CUDA device, or CPU.
        prefetch: batches copied to the GPU ahead of the one being consumed.
        device_transform: a function of a device batch, run on the copy's side stream (see
            `CudaPrefetcher`); in line on CPU.
        uneven: when ranks run out at different steps: ``"stop"`` (all stop at the first step
            any rank has no batch; map-style data is padded as torch does, so nothing is lost),
            ``"pad"`` (ranks that ran out yield empty batches until all are done; every sample
            exactly once - for evaluation) or ``"error"`` (raise `UnevenDataError` on
            every rank instead of padding or stopping).
        even_batches: with ``uneven="pad"``, every batch has ``batch_size`` rows on every
            rank (filled with copies of real rows instead of short or empty batches), so
            that gathers of equal shapes - ``accelerator.gather_for_metrics``, HF
            ``Trainer.evaluate()``, ``all_gather`` - take them. Needs ``mark_padding``.
        mark_padding: ``mark_padding(batch, mask) -> batch`` marks the copies (``mask``: a
            bool tensor, True for a padding row), called on every batch:
            `mask_labels` (labels -100, HF's "ignore") or `flag_padding` (a mask key).
        lookahead_bytes: host memory the batches pulled ahead of the end-of-data check may
            hold (iterable data; tensors, arrays, bytes, str and containers counted, see
            ``stats()["lookahead_max_bytes"]``); at least one batch is always pulled ahead.
            Default 256 MiB. Smaller: less memory, more frequent checks.
        backend: a `Backend`, or a backend name for `init()`.
        progress: show a progress bar on rank 0 (tqdm if installed, else INFO log lines under
            the ``horovod_iter`` logger) and log the pass's `stats()` at its end.
        log_stats: log every rank's `stats()` at DEBUG at the end of each pass.

    Example:
        ```python
        loader = DistributedLoader(dataset, batch_size=64, device="cuda")
        for epoch in range(start_epoch, epochs):
            loader.set_epoch(epoch)
            for x, y in loader:
                train_step(x, y)
            torch.save({"loader": loader.state_dict(), ...}, path)
        ```
    """

    def __init__(self, dataset: Any, batch_size: int | _Unset | None = _UNSET,
                 shuffle: bool | None = None, sampler: Sampler[Any] | None = None,
                 batch_sampler: Sampler[list[int]] | Iterable[list[int]] | None = None,
                 num_workers: int = 0,
                 collate_fn: Callable[[list[Any]], Any] | None = None,
                 pin_memory: bool | None = None, drop_last: bool = False,
                 timeout: float | None = 300.0,
                 worker_init_fn: Callable[[int], None] | None = None,
                 multiprocessing_context: Any = None, generator: torch.Generator | None = None,
                 *, prefetch_factor: int | None = None, persistent_workers: bool = False,
                 pin_memory_device: str = "", in_order: bool = True,
                 global_batch_size: int | None = None, seed: int | None = 0,
                 device: Any = None, prefetch: int = 2,
                 device_transform: Callable[[Any], Any] | None = None,
                 uneven: Uneven = "stop", even_batches: bool = False,
                 mark_padding: Callable[[Any, torch.Tensor], Any] | None = None,
                 lookahead_bytes: int = LOOKAHEAD_BYTES,
                 backend: Backend | str | None = None,
                 progress: bool = False, log_stats: bool = True) -> None:
        self._backend_arg = backend
        self._backend = backend if isinstance(backend, Backend) else (
            init(backend) if backend is not None else get_backend())
        world = self._backend.size
        warn_foreign_world(self._backend)
        if batch_sampler is not None:
            # torch's rule: a batch sampler decides the batches alone
            if (not isinstance(batch_size, _Unset) and batch_size != 1) or shuffle or \
                    sampler is not None or drop_last or global_batch_size is not None:
                raise ValueError(
                    "batch_sampler option is mutually exclusive with batch_size, "
                    "global_batch_size, shuffle, sampler, and drop_last (torch's rule); got "
                    f"batch_size={batch_size!r}, shuffle={shuffle!r}, sampler={sampler!r}, "
                    f"drop_last={drop_last!r}")
            batch_size = 1
        if isinstance(batch_size, _Unset):
            batch_size = None if global_batch_size is not None else 1  # torch's default
        if batch_size is None and global_batch_size is None:
            raise ValueError(
                "batch_size=None (torch's 'no automatic batching') is not supported: the end "
                "of data is agreed per batch; pass batch_size=1 and unwrap, or a "
                "batch_sampler")
        if batch_size is not None and global_batch_size is not None:
            raise ValueError("pass one of batch_size (per rank) and global_batch_size "
                             f"(over all ranks), not both; got batch_size={batch_size!r}, "
                             f"global_batch_size={global_batch_size!r}")
        if shuffle is None:
            shuffle = batch_sampler is None  # our sampler shuffles, as torch's distributed one
        if timeout == 0 and not isinstance(timeout, bool):
            timeout = None  # torch's 0: no limit
        self._global_size: int | None = None
        self._batch_size = 0
        if global_batch_size is not None:
            self._global_size = positive_int("global_batch_size", global_batch_size)
            self._per_rank(world)
        else:
            self._batch_size = positive_int("batch_size", batch_size)
        self.multiprocessing_context = multiprocessing_context
        self.generator = generator
        self.prefetch_factor = check_worker_options(
            num_workers=num_workers, prefetch_factor=prefetch_factor, in_order=in_order,
            pin_memory_device=pin_memory_device,
            multiprocessing_context=multiprocessing_context)
        self.in_order = in_order
        self.pin_memory_device = pin_memory_device
        check_arguments(uneven=uneven, prefetch=prefetch, num_workers=num_workers,
                        timeout=timeout, drop_last=drop_last, progress=progress,
                        log_stats=log_stats, shuffle=shuffle,
                        device_transform=device_transform)
        check_even_batches(even_batches, mark_padding, uneven=uneven,
                           batch_sampler=batch_sampler is not None)
        self.even_batches = even_batches
        self.mark_padding = mark_padding
        self.lookahead_bytes = positive_int("lookahead_bytes", lookahead_bytes)
        if not isinstance(persistent_workers, bool):
            raise TypeError(f"persistent_workers must be a bool, got {persistent_workers!r}")
        if persistent_workers and (num_workers == 0 or isinstance(dataset, IterableDataset)):
            raise ValueError(
                "persistent_workers=True needs num_workers > 0 and a map-style dataset (an "
                "IterableDataset's epoch and resume state reach only new workers); got "
                f"num_workers={num_workers}, dataset {type(dataset).__name__}")
        if persistent_workers and isinstance(dataset, MixedDataset):
            raise ValueError(
                "persistent_workers=True keeps the workers' copy of a MixedDataset at the "
                "epoch they were started in, and its draws depend on the epoch; use "
                "persistent_workers=False")
        self.persistent_workers = persistent_workers
        self._workers: dict[Any, Any] = {}  # the DataLoader of persistent workers
        self.dataset = dataset
        self.is_iterable = isinstance(dataset, IterableDataset)
        self.uneven: Uneven = uneven
        self.drop_last = bool(drop_last)
        self._batch_sampler = check_batch_sampler(batch_sampler, dataset, self.backend)
        self.sampler = None if batch_sampler is not None else loader_sampler(
            dataset, sampler, self.backend, shuffle=shuffle, seed=seed,
            drop_last=self.drop_last, uneven=uneven)
        self.num_workers = int(num_workers)
        self.collate_fn = collate_fn
        self.worker_init_fn = worker_init_fn
        self.prefetch = int(prefetch)
        self.device_transform = device_transform
        #: seconds a rank waits for the others (and for its DataLoader workers); None: no limit
        self.sync_timeout = None if timeout is None else float(timeout)
        self.progress = bool(progress)
        self.log_stats = bool(log_stats)
        self._device_arg = device
        self._pin_arg = pin_memory
        self.epoch = 0
        self._pending: Resume | None = None  # set by a load, taken by the next iter()
        self._pass: Pass | None = None       # the latest pass of this epoch
        self._active: weakref.ReferenceType[DistributedIterator] | None = None
        #: this loader's number in the process (names its Horovod ops)
        self.id = next(_loader_ids)
        #: numbers the end-of-data messages of all its passes
        self.messages = MessageCounter()
        self._iterations = 0
        self._gathered: dict[str, Any] | None = None  # the last state_dict() (iterables)
        self._last_stats: dict[str, Any] = {}

    # -- facts ------------------------------------------------------------------------
    @property
    def backend(self) -> Backend:
        """The ranks this loader iterates over. Without an explicit ``backend=``, a local one
        found before a launcher set up the ranks (a loader built before Lightning's
        ``trainer.fit()``) is replaced by the real one at the next ``iter()``: the loader
        then lays the epoch out over the real ranks instead of reading everything on each."""
        if self._backend_arg is None and is_provisional(self._backend):
            self._backend = get_backend()
        return self._backend

    def _per_rank(self, world: int) -> int:
        g = self._global_size
        if g is None:
            return self._batch_size
        if g % world:
            raise ValueError(
                f"global_batch_size={g} is not divisible by the {world} ranks; use a "
                f"multiple of {world} (e.g. {max(world, g - g % world)}) or batch_size "
                "(per rank); under Horovod elastic, choose --min-np/--max-np so it divides")
        return g // world

    @property
    def timeout(self) -> float:
        """torch's attribute: the seconds to wait for a batch from a DataLoader worker (0:
        none), i.e. ``sync_timeout`` with workers, 0 without - what a DataLoader built from
        this loader's attributes (accelerate's ``skip_first_batches``) must be given. The
        ranks' own bound is ``sync_timeout``."""
        return float(self.sync_timeout or 0) if self.num_workers > 0 else 0.0

    @property
    def _rank_batch(self) -> int:
        """Samples per rank per step for our own batching (0 with a batch sampler)."""
        return 0 if self._batch_sampler is not None else self._per_rank(self.backend.size)

    @property
    def batch_size(self) -> int | None:
        """Samples per rank per step (``global_batch_size / W`` if that was given); ``None``
        with a ``batch_sampler``, as torch's DataLoader has it."""
        return None if self._batch_sampler is not None else self._rank_batch

    @property
    def batch_sampler(self) -> Any:
        """The batches of indices this rank reads (torch's attribute, which frameworks read:
        Lightning checks it for shuffling, accelerate's ``skip_first_batches`` re-batches
        from it): the given batch sampler, or one over this rank's slice of the current
        epoch, from its beginning. ``None`` for iterable data."""
        if self._batch_sampler is not None:
            return self._batch_sampler
        if self.sampler is None:
            return None
        return RankBatches(self, self._rank_batch)

    @property
    def global_batch_size(self) -> int:
        return self._rank_batch * self.backend.size

    @property
    def steps(self) -> int:
        """Batches handed out in the current epoch (local: no collective, unlike
        ``state_dict()`` of sharded data)."""
        p = self._pending or self._pass
        return p.steps if p is not None else 0

    @property
    def device(self) -> torch.device:
        return resolve_device(self._device_arg)

    @property
    def pin_memory(self) -> bool:
        if self._pin_arg is not None:
            return bool(self._pin_arg) and torch.cuda.is_available()
        return self.device.type == "cuda"

    def _own_sampler(self) -> DistributedSampler | None:
        return self.sampler if isinstance(self.sampler, DistributedSampler) else None

    def __len__(self) -> int:
        """Batches of a full pass of the current epoch on this rank (constant in the loop)."""
        b, own = self.backend, self._own_sampler()
        bs = self._rank_batch
        bsampler = self._batch_sampler
        if isinstance(bsampler, LengthGroupedBatchSampler):
            counts = bsampler.counts(0)
            return min(counts) if self.uneven == "stop" else max(counts)
        if bsampler is not None:
            return len(bsampler)  # this rank's (a foreign batch sampler's others are unknown)
        if own is not None:
            plan = dataclasses.replace(own.plan(), world=b.size, rank=b.rank)
            counts = [steps_for(c, bs, self.drop_last) for c in plan.counts]
            return min(counts) if self.uneven == "stop" else max(counts)
        if self._canonical():
            lay = self.dataset.layout(b.size, max(1, self.num_workers))
            steps = [lay.rank_batches(r) for r in range(b.size)]
            return min(steps) if self.uneven == "stop" else max(steps)
        per_consumer = getattr(self.dataset, "consumer_counts", None)
        if self.is_iterable and callable(per_consumer) and \
                getattr(self.dataset, "sizes", None) is not None:
            # every rank's batch count (each worker batches its own stream): the same len()
            # on every rank - the steps the ranks take together
            w = max(1, self.num_workers)
            counts = per_consumer(b.size * w)
            steps = [sum(steps_for(counts[r * w + k], bs, self.drop_last) for k in range(w))
                     for r in range(b.size)]
            return min(steps) if self.uneven == "stop" else max(steps)
        source: Any = self.sampler if self.sampler is not None else self.dataset
        try:
            n = len(source)
        except TypeError:
            raise TypeError("len() of a DistributedLoader over an IterableDataset without "
                            "__len__ is unknown; give the dataset a __len__ (this rank's "
                            "samples) or use a map-style dataset") from None
        return steps_for(n, bs, self.drop_last)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the next ``iter()`` (its order, for shuffled map-style data).
        Call it every epoch. Setting the epoch a pending load is in keeps the load; another
        epoch discards it."""
        if not is_int(epoch) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        if int(epoch) != self.epoch:
            self._pending = self._pass = None
        self.epoch = int(epoch)
        self._propagate_epoch()

    def _propagate_epoch(self) -> None:
        target: Any = self.sampler if self.sampler is not None else (
            self._batch_sampler if self._batch_sampler is not None else self.dataset)
        if callable(getattr(target, "set_epoch", None)):
            target.set_epoch(self.epoch)
        if isinstance(self.dataset, MixedDataset):  # its draws depend on the epoch too
            self.dataset.set_epoch(self.epoch)

    def config(self) -> dict[str, Any]:
        """What every rank must agree on at ``iter()`` (checked with one allreduce)."""
        own = self._own_sampler()
        return {
            "dataset": self._dataset_fingerprint(),
            "batch_size": self._rank_batch, "world_size": self.backend.size,
            "batch_sampler": None if self._batch_sampler is None else
            type(self._batch_sampler).__qualname__,
            "uneven": self.uneven, "drop_last": self.drop_last, "epoch": self.epoch,
            "even_batches": self.even_batches,
            "iteration": self._iterations,
            "sampler": None if own is None else own.state_dict(),
        }

    def _dataset_fingerprint(self) -> Any:
        if not self.is_iterable:
            return len(self.dataset)
        fingerprint = getattr(self.dataset, "fingerprint", None)
        return fingerprint() if callable(fingerprint) else "iterable"

    # -- iteration --------------------------------------------------------------------
    def _follow_world(self) -> None:
        """The backend's world changed under us (a Horovod elastic reset that skipped the
        state sync, e.g. ranks only removed): every surviving rank holds the same committed
        position, so each lays the rest of the epoch out over the new world by itself."""
        own, b = self._own_sampler(), self.backend
        if own is not None and (own.num_replicas, own.rank) != (b.size, b.rank):
            self.abandon()
            self.load_state_dict(self.state_dict())
        ds = self.dataset
        if self.is_iterable and callable(getattr(ds, "set_world", None)) and (
                getattr(ds, "num_replicas", b.size), getattr(ds, "rank", b.rank)) != (
                b.size, b.rank):
            self.abandon()
            ds.set_world(b.size, b.rank)
            if self._pending is None and self._gathered is not None:
                self.load_state_dict(self._gathered)  # the last state every rank agreed on

    def __iter__(self) -> DistributedIterator:
        self._follow_world()
        self._close_pass()
        own = self._own_sampler()
        followed = own if own is not None else self._batch_sampler
        if isinstance(getattr(followed, "epoch", None), int) and followed.epoch != self.epoch:
            # a framework set the epoch on loader.sampler (Lightning does): follow it
            self.set_epoch(followed.epoch)
        self._propagate_epoch()
        resume, self._pending = self._pending, None
        bs = self._rank_batch
        opts = FetchOptions(bs, self.drop_last, self.num_workers, self.collate_fn,
                            self.worker_init_fn, self.pin_memory, self.backend.rank,
                            self.persistent_workers, self.sync_timeout,
                            self.multiprocessing_context, self.generator, self.prefetch_factor,
                            self.in_order)
        own = self._own_sampler()
        pass_ = Pass(self.epoch, bs, self.backend.size,
                     steps=resume.steps if resume else 0,
                     samples=resume.samples if resume else 0,
                     cursor=own.begin_iteration() if own is not None else None)
        if pass_.cursor is not None:
            c = pass_.cursor
            if self.uneven == "error":
                check_even(c.plan, c.slot, self.backend.rank)
            source = host_batches(self.dataset, opts, indices=plan_batches(
                c.plan, c.slot, bs, self.drop_last), workers=self._workers)
        elif self._batch_sampler is not None:
            pass_.base = pass_.steps  # ours counts its position from the pass's start
            source = host_batches(self.dataset, opts, indices=batch_sampler_batches(
                self._batch_sampler, pass_.steps), workers=self._workers)
        elif self.sampler is not None:
            source = host_batches(self.dataset, opts, indices=sampler_batches(
                self.sampler, pass_.samples, bs, self.drop_last), workers=self._workers)
        elif is_stateful(self.dataset):
            pass_.base = resume.dataset if resume else None
            if self._canonical():
                if not self.in_order:
                    raise ValueError("the canonical layout of a ShardedDataset needs the "
                                     "workers' batches in order: use in_order=True")
                self.dataset.layout(self.backend.size, max(1, self.num_workers))  # checks
            else:
                self._check_shard_layout(pass_.base)
            source = host_batches(self.dataset, opts, resume=pass_.base)
        elif resume is not None and resume.finished:
            source = _Empty()
        else:
            if pass_.steps:
                warnings.warn(
                    f"resuming an IterableDataset without state by replaying {pass_.steps} "
                    "batches (O(steps), and only exact if it yields the same stream again); "
                    "give it state_dict()/load_state_dict() or use horovod_iter.ShardedDataset",
                    stacklevel=2)
            source = host_batches(self.dataset, opts, skip=pass_.steps)
        pass_.ahead = fetching_ahead()
        self._pass = pass_
        self._iterations += 1
        it = DistributedIterator(self, pass_, source, self._iterations)
        self._active = weakref.ref(it)
        return it

    def _canonical(self) -> bool:
        """A dataset with a canonical layout (``ShardedDataset(canonical_ranks=)``): tell it
        the global batch its steps are cut for."""
        if not (self.is_iterable and getattr(self.dataset, "canonical", None)):
            return False
        self.dataset.set_batching(self._rank_batch * self.backend.size, self.drop_last)
        return True

    def _check_shard_layout(self, base: Any) -> None:
        """A rank without a shard stops every rank at step 0 under ``stop``/``error``: refuse a
        fresh epoch that would train on nothing; warn for a resumed one that would drop the
        shards left (the same on every rank: the layout is a pure function)."""
        counts_of = getattr(self.dataset, "shard_counts", None)
        if self.uneven == "pad" or not callable(counts_of):
            return
        w = max(1, self.num_workers)
        size = self.backend.size
        per_consumer = counts_of(size * w, base)
        per_rank = [sum(per_consumer[r * w:(r + 1) * w]) for r in range(size)]
        if min(per_rank) > 0:
            return
        empty = [r for r, n in enumerate(per_rank) if n == 0]
        n = len(getattr(self.dataset, "shards", ()))
        what = (f"{n} shards over {size} ranks x {w} worker(s) = {size * w} consumers (each "
                f"reads whole shards), so rank(s) {empty} get none")
        fix = ("use uneven='pad' (every sample once; ranks without data get empty batches), "
               "split the data into at least as many shards as ranks x workers, or use "
               "fewer workers")
        if base is None:
            raise ShardingError(
                f"rank {self.backend.rank}: {what}, and uneven={self.uneven!r} would stop every "
                f"rank at step 0: the epoch would train on nothing. {fix}")
        left = sum(per_rank)
        warnings.warn(
            f"rank {self.backend.rank}: the resumed epoch {self.epoch} has {left} shard(s) "
            f"left: {what}, and uneven={self.uneven!r} stops every rank at once, so they are "
            f"not read this epoch; {fix}", RuntimeWarning, stacklevel=3)

    def _close_pass(self) -> None:
        active = self._active() if self._active is not None else None
        self._active = None
        if active is not None:
            active.close()

    def close(self) -> None:
        """Close the pass in flight (its workers, streams and collectives) and stop the
        persistent workers, if any. The loader stays usable: the next ``iter()`` starts
        afresh."""
        self._close_pass()
        workers, self._workers = self._workers, {}
        for dl in workers.values():
            it = getattr(dl, "_iterator", None)
            shutdown = getattr(it, "_shutdown_workers", None)
            if callable(shutdown):
                shutdown()

    def abandon(self) -> None:
        """Close the pass in flight without waiting for its collectives: their world is gone
        (a Horovod elastic reset). Its position is kept for `state_dict()`."""
        active = self._active() if self._active is not None else None
        self._active = None
        if active is not None:
            active.abandon()

    def stats(self) -> dict[str, Any]:
        """Figures of the current (or last) pass: steps, samples, seconds the trainer
        waited for data and for the end-of-data check, host->device bytes."""
        active = self._active() if self._active is not None else None
        return active.stats() if active is not None else dict(self._last_stats)

    # -- state ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The position as of the last batch handed to the user (prefetched batches are not
        consumed): a pending load, else the latest pass of this epoch, else its beginning.
        JSON-serialisable, the same on every rank; changes nothing."""
        own = self._own_sampler()
        p = self._pending or self._pass
        if isinstance(p, Pass):
            p = p.consumed()  # not what a framework fetched ahead of its trainer
        world = p.world if isinstance(p, Pass) else self.backend.size
        dataset = self._dataset_state(p)  # first: it may send a message (counted below)
        state = {
            TYPE: STATE_TYPE, VERSION: STATE_VERSION, EPOCH: self.epoch,
            STEPS: p.steps if p else 0, SAMPLES: p.samples if p else 0,
            FINISHED: p.finished if p else False, WORLD: world,
            BATCH: p.batch_size if isinstance(p, Pass) else self._rank_batch,
            GLOBAL_BATCH: self._global_size, UNEVEN_MODE: self.uneven,
            ITERATIONS: self._iterations, MESSAGES: self.messages.value,
            SAMPLER: None if own is None else (
                own.state_at(p.cursor) if isinstance(p, Pass) and p.cursor is not None
                else own.state_dict()),
            DATASET: dataset,
            BATCH_SAMPLER: self._batch_sampler_state(p),
        }
        if self.is_iterable and is_stateful(self.dataset):
            self._gathered = state
        return state

    def _batch_sampler_state(self, p: Pass | Resume | None) -> Any:
        bs = self._batch_sampler
        if not isinstance(bs, LengthGroupedBatchSampler):
            return None
        if isinstance(p, Pass):
            return bs.state_dict(steps=p.steps - (p.base or 0))
        return bs.state_dict()

    def _dataset_state(self, p: Pass | Resume | None) -> Any:
        if not (self.is_iterable and is_stateful(self.dataset)):
            return None
        if isinstance(p, Resume):
            return p.dataset
        if p is None:  # nothing handed out this epoch, on any rank: no need to gather
            return None
        if self._canonical():  # a count: every rank knows every rank's position
            return self.dataset.canonical_state(p.steps, p.base, p.world,
                                                max(1, self.num_workers), p.positions)
        agree = functools.partial(agree_on_state, self.backend, name=f"horovod_iter.{self.id}",
                                  ops=self.messages, serial=self._iterations, step=p.steps,
                                  timeout=self.sync_timeout)
        return gather_dataset_state(self.dataset, self.backend, self._consumers(), p.positions,
                                    p.base, agree, timeout=self.sync_timeout)

    def _consumers(self) -> int:
        return self.backend.size * max(1, self.num_workers)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Make the next ``iter()`` resume exactly where ``state`` was saved: it yields the
        batches an uninterrupted run would have yielded next - with any prefetch depth and
        worker count, and (map-style data with our sampler) on another world size, backend,
        ``batch_size`` or ``uneven``. Positions are in samples."""
        s = validate(state)
        own, b = self._own_sampler(), self.backend
        same_world = s[WORLD] == b.size
        if own is not None:
            if not isinstance(s.get(SAMPLER), Mapping):
                raise ValueError("loader state has no sampler state; it was saved by a loader "
                                 "over an IterableDataset or with a foreign sampler")
            if (own.num_replicas, own.rank) != (b.size, b.rank):
                own.set_world(b.size, b.rank)
            own.load_state_dict(s[SAMPLER])
        elif isinstance(self._batch_sampler, LengthGroupedBatchSampler):
            if not isinstance(s.get(BATCH_SAMPLER), Mapping):
                raise ValueError("loader state has no batch sampler state; it was saved by a "
                                 "loader without this LengthGroupedBatchSampler")
            self._batch_sampler.set_world(b.size, b.rank)
            self._batch_sampler.load_state_dict(s[BATCH_SAMPLER])
        elif self.is_iterable and is_stateful(self.dataset):
            pass  # the dataset's own state says where; checked below
        elif not same_world:
            raise ValueError(
                f"loader state was saved on {s[WORLD]} ranks; without horovod_iter's "
                f"sampler or state (an IterableDataset without state_dict(), or a foreign "
                f"sampler) it can only be resumed on {s[WORLD]} ranks, not {b.size}; use "
                "horovod_iter.ShardedDataset or DistributedSampler to resume on any")
        elif self.sampler is None and self._batch_sampler is None and \
                s[BATCH] != self._rank_batch and s[STEPS]:
            raise ValueError(
                f"loader state was saved with batch_size={s[BATCH]} (per rank) over an "
                f"IterableDataset, which resumes by replaying whole batches; build the loader "
                f"with batch_size={s[BATCH]} (or global_batch_size={s[BATCH] * b.size}) to "
                "resume, and change it at the next epoch")
        self.abandon()
        self.epoch = s[EPOCH]
        self._pass = None
        # the ranks' pass and message numbers agree again (elastic sync: all load rank 0's)
        self._iterations = max(self._iterations, s[ITERATIONS])
        self.messages.value = max(self.messages.value, s[MESSAGES])
        dataset = None
        if self.is_iterable and is_stateful(self.dataset):
            self._canonical()  # a canonical layout checks the state against its global batch
            dataset = check_dataset_state(self.dataset, s.get(DATASET), self._consumers())
        self._pending = Resume(s[STEPS], s[SAMPLES], s[FINISHED], dataset)

    def _ended(self, it: DistributedIterator) -> None:
        """Called by a pass when it closes: keep its figures."""
        self._last_stats = it.stats()


class _Empty(HostSource):
    """The rest of a pass that was saved finished: nothing."""

    num_batches = 0

    def __next__(self) -> Any:
        raise StopIteration
