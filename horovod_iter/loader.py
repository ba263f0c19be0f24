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

import contextlib
import functools
import itertools
import weakref
from collections.abc import Iterable, Mapping
from typing import Any, Callable

import torch
from torch.utils.data import IterableDataset, Sampler

from .backend import Backend, get_backend, init, is_provisional
from .batching import RankBatches
from .fetch import FetchOptions, HostSource
from .host_stage import ThreadedSource
from .iterator import DistributedIterator, Pass, PassOptions
from .loader_config import UNSET as _UNSET
from .loader_config import Unset as _Unset
from .loader_config import (
    check_arguments,
    check_batch_sampler,
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
    FINGERPRINT,
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
    check_fingerprint,
    gather_dataset_state,
    position_digest,
    validate,
)
from .mixing import MixedDataset
from .prefetch import resolve_device
from .sampler import is_int
from .sources import CanonicalSource, Deal, SamplerSource, Source, StatefulSource, choose_source
from .sync import LOOKAHEAD_BYTES, MessageCounter, Uneven, agree_on_state

__all__ = ["DistributedIterator", "DistributedLoader"]

#: loaders made per backend: a loader's number names its ops, the same on every rank
_loader_ids: weakref.WeakKeyDictionary[Backend, itertools.count[int]] = \
    weakref.WeakKeyDictionary()


class DistributedLoader:
    """Iterate a dataset in data-parallel training or evaluation, every rank in lockstep.

    Each rank gets a disjoint slice of every epoch (map-style datasets through
    `DistributedSampler`; an ``IterableDataset`` is used as given: shard it with
    `ShardedDataset` or `split_stream()`). The end of data is agreed by the ranks with
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
            ``generator`` seeds our sampler's shuffle (one seed drawn from it, as torch's
            ``RandomSampler`` draws; seed it alike on every rank: the ranks compare it).
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
        fetch_thread: with ``num_workers=0``, fetch, collate and pin the next
            ``max(1, prefetch)`` batches on a thread of ours while the step runs, so a loop
            that syncs every step costs the larger of fetch and step, not their sum. Pays
            where the fetch releases the GIL (``TensorDataset`` gathers, zlib/numpy/PIL
            decoders, file reads); per-sample Python gains nothing (use ``num_workers``).
            Batches, order, ``state_dict()`` and errors (at their step) are unchanged. The
            dataset runs on that thread: its global-RNG draws interleave with the trainer's,
            and the trainer thread's thread-local settings (``torch.no_grad()``) do not apply
            there. Not with ``num_workers > 0``.
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
            CPU bool tensor, True for a padding row; move it to the device of a GPU-resident
            batch's tensors before combining them), called on every batch:
            `mask_labels` (labels -100, HF's "ignore") or `flag_padding` (a mask key).
        lookahead_bytes: host memory the batches pulled ahead of the end-of-data check may
            hold (iterable data; tensors, arrays, bytes, str and containers counted, see
            ``stats()["lookahead_max_bytes"]``); at least one batch is always pulled ahead.
            Default 256 MiB. Smaller: less memory, more frequent checks.
        backend: a `Backend`, or a backend name for `init()`.
        progress: show a progress bar on rank 0 (tqdm if installed, else INFO log lines under
            the ``horovod_iter`` logger) and log the pass's `stats()` at its end.
        log_stats: log every rank's `stats()` at DEBUG at the end of each pass.
        reuse_cpu_buffers: write CPU batches of a ``TensorDataset`` (``num_workers=0``) into
            reused buffers: about 3x faster gathers, but a batch is then valid only until
            the next step (clone what you keep). Off by default.

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
                 device: Any = None, prefetch: int = 2, fetch_thread: bool = False,
                 device_transform: Callable[[Any], Any] | None = None,
                 uneven: Uneven = "stop", even_batches: bool = False,
                 mark_padding: Callable[[Any, torch.Tensor], Any] | None = None,
                 lookahead_bytes: int = LOOKAHEAD_BYTES,
                 backend: Backend | str | None = None,
                 progress: bool = False, log_stats: bool = True,
                 reuse_cpu_buffers: bool = False) -> None:
        self._backend_arg = backend
        self._backend = backend if isinstance(backend, Backend) else (
            init(backend) if backend is not None else get_backend())
        world = self._backend.size
        warn_foreign_world(self._backend, uneven=uneven, even_batches=even_batches,
                           global_batch_size=global_batch_size)
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
        #: with even_batches, the rows every padded batch is filled to (a batch sampler's
        #: batch_size; else the loader's per-rank batch)
        self._even_rows = check_even_batches(even_batches, mark_padding, uneven=uneven,
                                             batch_sampler=batch_sampler)
        self.even_batches = even_batches
        self.mark_padding = mark_padding
        self.lookahead_bytes = positive_int("lookahead_bytes", lookahead_bytes)
        if not isinstance(reuse_cpu_buffers, bool):
            raise TypeError(f"reuse_cpu_buffers must be a bool, got {reuse_cpu_buffers!r}")
        self.reuse_cpu_buffers = reuse_cpu_buffers
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
        self._batch_sampler = check_batch_sampler(batch_sampler, dataset, self.backend,
                                                  uneven=uneven)
        self._sampler = None if batch_sampler is not None else loader_sampler(
            dataset, sampler, self.backend, shuffle=shuffle, seed=seed,
            drop_last=self.drop_last, uneven=uneven, generator=generator)
        #: the data kind's strategy, chosen once
        self._source: Source = choose_source(dataset, self._sampler, self._batch_sampler)
        self._epoch_relay = _EpochRelay(self)
        self.num_workers = int(num_workers)
        self.collate_fn = collate_fn
        self.worker_init_fn = worker_init_fn
        self.prefetch = int(prefetch)
        if not isinstance(fetch_thread, bool):
            raise TypeError(f"fetch_thread must be a bool, got {fetch_thread!r}")
        if fetch_thread and int(num_workers) > 0:
            raise ValueError(
                f"fetch_thread=True fetches on a thread of this process, for num_workers=0; "
                f"with num_workers={num_workers} the DataLoader workers already fetch ahead "
                "of the step: choose one (workers for per-sample Python work, the thread for "
                "fetches that release the GIL: tensor gathers, C decoders, file reads)")
        self.fetch_thread = fetch_thread
        self.device_transform = device_transform
        #: seconds a rank waits for the others (and for its DataLoader workers); None: no limit
        self.sync_timeout = None if timeout is None else float(timeout)
        self._source.bound_reads(self.sync_timeout)
        self.progress = bool(progress)
        self.log_stats = bool(log_stats)
        self._device_arg = device
        # a bad or unavailable device fails here, not at the first batch
        resolve_device(device, self._backend.local_rank)
        self._pin_arg = pin_memory
        self.epoch = 0
        self._pending: Resume | None = None  # set by a load, taken by the next iter()
        self._opening: Resume | None = None  # what a pass made by iter() but not begun resumes
        self._start_digest: str | None = None  # the loaded position the last pass started at
        self._pass: Pass | None = None       # the latest pass of this epoch
        self._active: weakref.ReferenceType[DistributedIterator] | None = None
        #: this loader's number in the process (names its Horovod ops)
        self.id = next(_loader_ids.setdefault(self._backend, itertools.count()))
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

    def _deal(self) -> Deal:
        """The world and batching of the next pass, as one small value for the source."""
        b = self.backend
        return Deal(b.size, b.rank, self._rank_batch, self.drop_last, self.uneven,
                    self.num_workers, self.in_order)

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
    def sampler(self) -> Any:
        """torch's attribute: the sampler of map-style data (ours unless you gave one).
        For iterable data (torch has a placeholder there) an object whose ``set_epoch`` is the
        loader's: frameworks that set the epoch on ``loader.sampler`` (Lightning) reshuffle
        streams too."""
        return self._sampler if self._sampler is not None else self._epoch_relay

    @property
    def batch_sampler(self) -> Any:
        """The batches of indices this rank reads (torch's attribute, which frameworks read:
        Lightning checks it for shuffling, accelerate's ``skip_first_batches`` re-batches
        from it): the given batch sampler, or one over this rank's slice of the current
        epoch, from its beginning. ``None`` for iterable data."""
        if self._batch_sampler is not None:
            return self._batch_sampler
        if self._sampler is None:
            return None
        return RankBatches(self, self._rank_batch)

    @property
    def global_batch_size(self) -> int:
        return self._rank_batch * self.backend.size

    @property
    def steps(self) -> int:
        """Batches handed out in the current epoch (local: no collective, unlike
        ``state_dict()`` of sharded data)."""
        p = self._position()
        return p.steps if p is not None else 0

    def _position(self) -> Pass | Resume | None:
        """A pending load, else the start of a pass not begun yet, else the latest pass of
        this epoch (None: the epoch's beginning)."""
        return self._pending or self._opening or self._pass

    @property
    def device(self) -> torch.device:
        return resolve_device(self._device_arg, self.backend.local_rank)

    @property
    def pin_memory(self) -> bool:
        if self._pin_arg is not None:
            return bool(self._pin_arg) and torch.cuda.is_available()
        return self.device.type == "cuda"

    def __len__(self) -> int:
        """Batches of a full pass of the current epoch on this rank (constant in the loop)."""
        return self._source.num_batches(self._deal())

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the next pass: of the next ``iter()``, or of a pass whose
        first batch is not taken yet (torch's rule: an epoch set between ``iter()`` and the
        first ``next()`` applies to that pass). Call it every epoch. Setting the epoch a
        pending load is in keeps the load; another epoch discards it."""
        if not is_int(epoch) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        if int(epoch) != self.epoch:
            self._pending = self._opening = self._pass = None
        self.epoch = int(epoch)
        self._epoch_relay.requested = None
        self._source.set_epoch(self.epoch)

    def config(self) -> dict[str, Any]:
        """What every rank must agree on at a pass's start (checked with one allreduce): the
        source's fingerprint, the settings that decide which sample lands where, and the
        position the pass starts from."""
        deal = self._deal()
        return {
            **self._source.config(deal),
            "batch_size": deal.batch, "world_size": deal.world, "uneven": self.uneven,
            "drop_last": self.drop_last, "epoch": self.epoch,
            "even_batches": self.even_batches, "iteration": self._iterations,
            "resume": self._start_digest,
        }

    # -- iteration --------------------------------------------------------------------
    def _follow_world(self) -> None:
        """The backend's world changed under us (a Horovod elastic reset that skipped the
        state sync, e.g. ranks only removed): every surviving rank holds the same committed
        position, so each lays the rest of the epoch out over the new world by itself."""
        deal = self._deal()
        if not self._source.world_moved(deal):
            return
        self.abandon()
        if isinstance(self._source, SamplerSource):
            self.load_state_dict(self.state_dict())
        else:
            self._source.move_world(deal)
            if self._pending is None and self._gathered is not None:
                self.load_state_dict(self._gathered)  # the last state every rank agreed on

    def __iter__(self) -> DistributedIterator:
        """A new pass. It starts at its first ``next()`` (torch's rule): an epoch set in
        between applies to it."""
        self._follow_world()  # before the position of the pass in flight is let go
        self._close_pass()
        # the position is now the new pass's start: the pending load (this iter() takes it,
        # torchdata's rule) or the epoch's beginning
        self._opening, self._pending, self._pass = self._pending, None, None
        it = DistributedIterator(self._start, self.__len__)
        self._active = weakref.ref(it)
        return it

    def _start(self) -> tuple[Pass, HostSource, PassOptions]:
        """Begin the pass of the current epoch: from a pending load, else its start."""
        outside = self._epoch_relay.requested
        if outside is None:
            outside = self._source.epoch_set_outside()
        if outside is not None and outside != self.epoch:
            # a framework set the epoch on loader.sampler (Lightning does): follow it
            self.set_epoch(outside)
        self._source.set_epoch(self.epoch)
        resume, self._opening = self._opening, None
        self._start_digest = resume.digest if resume is not None else None
        deal = self._deal()
        opts = FetchOptions(deal.batch, self.drop_last, self.num_workers, self.collate_fn,
                            self.worker_init_fn, self.pin_memory, deal.rank,
                            self.persistent_workers, self.sync_timeout,
                            self.multiprocessing_context, self.generator, self.prefetch_factor,
                            self.in_order, reuse_cpu_buffers=self.reuse_cpu_buffers)
        pass_ = Pass(self.epoch, deal.batch, deal.world,
                     steps=resume.steps if resume else 0,
                     samples=resume.samples if resume else 0)
        device = self.device
        # torch's DataLoader pins on the current CUDA device of the thread that starts its
        # workers: this rank's GPU, not GPU 0 of a rank that never called set_device
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            source = self._source.open(deal, opts, pass_, resume, self._workers)
        if self.fetch_thread:
            source = ThreadedSource(source, max(1, self.prefetch), device=device)
        self._pass = pass_
        self._iterations += 1
        try:
            options = PassOptions(
                backend=self.backend, uneven=self.uneven, timeout=self.sync_timeout,
                name=f"horovod_iter.{self.id}", ops=self.messages, serial=self._iterations,
                config=self.config(), empty=self._source.empty(self.collate_fn, deal.rank),
                even_rows=(deal.batch or self._even_rows) if self.even_batches else None,
                mark_padding=self.mark_padding, lookahead_bytes=self.lookahead_bytes,
                device=self.device, prefetch=self.prefetch, pin_memory=self.pin_memory,
                device_transform=self.device_transform, progress=self.progress,
                log_stats=self.log_stats, mix_stats=self._source.mix_stats(pass_),
                on_close=self._ended)
        except BaseException:
            source.close()
            raise
        return pass_, source, options

    def _close_pass(self) -> None:
        active = self._active() if self._active is not None else None
        self._active = None
        if active is not None:
            active.close()

    def set_consumed(self, steps: int) -> None:
        """Say how many batches of the current pass the trainer really used, when a framework
        fetches ahead of it (Lightning does for data without ``len()``; its callback
        `horovod_iter.integrations.lightning.LoaderProgress` calls this): `state_dict()`
        then leaves the others unconsumed."""
        if not is_int(steps) or steps < 0:
            raise ValueError(f"steps must be an int >= 0, got {steps!r}")
        if self._pass is not None:
            self._pass.used = int(steps)

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
        JSON-serialisable, the same on every rank, and of the same shape for a fresh and a
        used loader (DCP loads into a fresh one's); it carries the source's fingerprint, so
        it loads only into a loader that deals the samples alike. Changes nothing."""
        p = self._position()
        if isinstance(p, Pass):
            p = p.consumed()  # not what a framework fetched ahead of its trainer
        deal = self._deal()
        world = p.world if isinstance(p, Pass) else deal.world
        # first: a gather of the dataset's positions sends a message (counted below)
        parts = self._source.state(p, deal, self._collect)
        state = {
            TYPE: STATE_TYPE, VERSION: STATE_VERSION, EPOCH: self.epoch,
            STEPS: p.steps if p else 0, SAMPLES: p.samples if p else 0,
            FINISHED: p.finished if p else False, WORLD: world,
            BATCH: p.batch_size if isinstance(p, Pass) else deal.batch,
            GLOBAL_BATCH: self._global_size, UNEVEN_MODE: self.uneven,
            ITERATIONS: self._iterations, MESSAGES: self.messages.value,
            SAMPLER: parts.get(SAMPLER), DATASET: parts.get(DATASET),
            BATCH_SAMPLER: parts.get(BATCH_SAMPLER),
            FINGERPRINT: self._source.fingerprint(),
        }
        if self.is_iterable and isinstance(self._source, (StatefulSource, CanonicalSource)):
            self._gathered = state
        return state

    def _collect(self, positions: Mapping[int, Any], base: Any) -> Any:
        """Every rank's consumer positions as the dataset's state: a collective, after one
        message that checks every rank calls it at the same step."""
        p = self._pass
        agree = functools.partial(agree_on_state, self.backend, name=f"horovod_iter.{self.id}",
                                  ops=self.messages, serial=self._iterations,
                                  step=p.consumed().steps if p is not None else 0,
                                  timeout=self.sync_timeout)
        return gather_dataset_state(self.dataset, self.backend, self._deal().consumers,
                                    positions, base, agree, timeout=self.sync_timeout)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Make the next pass resume exactly where ``state`` was saved: it yields the
        batches an uninterrupted run would have yielded next - with any prefetch depth and
        worker count, and (map-style data with our sampler, `ShardedDataset`) on another
        world size, backend, ``batch_size`` or ``uneven``. Positions are in samples.

        Call it on every rank with the same state (the ranks check that they start from the
        same position). A state saved for other data (another kind, length, mix, shard
        list, seed...) is refused, naming what differs."""
        s = validate(state)
        check_fingerprint(s.get(FINGERPRINT), self._source.fingerprint())
        dataset = self._source.load(s, self._deal())
        self.abandon()
        self.epoch = s[EPOCH]
        self._pass = self._opening = None
        # the ranks' pass and message numbers agree again (elastic sync: all load rank 0's)
        self._iterations = max(self._iterations, s[ITERATIONS])
        self.messages.value = max(self.messages.value, s[MESSAGES])
        self._pending = Resume(s[STEPS], s[SAMPLES], s[FINISHED], dataset, position_digest(s))

    def _ended(self, stats: dict[str, Any]) -> None:
        """Called by a pass when it closes: keep its figures."""
        self._last_stats = stats


class _EpochRelay:
    """``loader.sampler`` of iterable data: a framework's ``set_epoch`` on it reaches the
    loader (Lightning sets the epoch on ``dataloader.sampler`` only). Like a sampler's
    epoch, it applies to the next pass to start, never to the one in flight."""

    def __init__(self, loader: DistributedLoader) -> None:
        self._loader = weakref.ref(loader)
        #: the epoch asked for, not yet taken by a pass (None: none asked)
        self.requested: int | None = None

    @property
    def epoch(self) -> int:
        if self.requested is not None:
            return self.requested
        loader = self._loader()
        return loader.epoch if loader is not None else 0

    def set_epoch(self, epoch: int) -> None:
        if not is_int(epoch) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.requested = int(epoch)

    def __repr__(self) -> str:
        return "<the epoch of a DistributedLoader over iterable data>"
