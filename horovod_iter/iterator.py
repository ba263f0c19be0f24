"""DistributedIterator: one pass of a `DistributedLoader`, composing
``HostSource -> EndOfDataSync -> CudaPrefetcher`` and counting what it hands to the user.

Shutdown: ``close()`` (also by ``with``, a finished loop, or the next ``iter(loader)``) stops
DataLoader workers and hands the end-of-data messages in flight to the backend without waiting
(they complete by themselves where every rank issued them). ``__del__`` only drops things:
garbage collection can run on any thread at any time, including in a collective, so it never
waits on other ranks or joins a thread (torch guards its DataLoader iterators the same way),
and does nothing at all once the interpreter is exiting.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from . import backend as _backend
from ._tree import caller_self, first_tensor
from .errors import OutOfRangeError
from .fetch import HostSource
from .gather import BatchFetcher
from .prefetch import CudaPrefetcher
from .progress import Progress, format_stats
from .sampler import Cursor
from .sync import EndOfDataSync

if TYPE_CHECKING:
    from .loader import DistributedLoader

__all__ = ["DistributedIterator", "Pass"]

log = logging.getLogger("horovod_iter")

@dataclass
class Pass:
    """The position of one pass, as handed to the user: batches and samples of this epoch,
    and (our sampler) the slot cursor. It outlives its iterator: ``state_dict()`` reads it."""

    epoch: int
    batch_size: int
    world: int
    steps: int = 0
    samples: int = 0
    finished: bool = False
    cursor: Cursor | None = None
    #: iterable data: consumer -> its position after the last batch handed out
    positions: dict[int, Any] = dataclasses.field(default_factory=dict)
    #: iterable data: the saved dataset state this pass resumed from (positions are relative)
    base: Any = None
    #: how many handed-out batches a consumer that fetches ahead of the trainer holds unused
    #: (Lightning's prefetching fetcher, for data without len()); None: nobody does
    ahead: Callable[[], int] | None = None
    #: the last batches' (consumer, its previous position), to take them back
    history: collections.deque[Any] = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=_HISTORY))

    def handed(self, position: dict[str, Any] | None = None) -> None:
        self.steps += 1
        self.samples += self.batch_size
        if self.cursor is not None:
            self.cursor.advance(self.batch_size)
        if position is not None:
            c = position["consumer"]
            self.history.append((c, self.positions.get(c, _MISSING)))
            self.positions[c] = position["state"]
        else:
            self.history.append(None)

    def consumed(self) -> Pass:
        """The position as of the batches the trainer used: without those a fetch-ahead
        consumer holds (Lightning fetches one batch early when the data has no len())."""
        k = self.ahead() if self.ahead is not None else 0
        k = min(k, len(self.history), self.steps)
        if k <= 0:
            return self
        positions = dict(self.positions)
        for entry in reversed(list(self.history)[-k:]):
            if entry is not None:
                c, previous = entry
                if previous is _MISSING:
                    positions.pop(c, None)
                else:
                    positions[c] = previous
        cursor = None if self.cursor is None else Cursor(
            self.cursor.plan, max(0, self.cursor.slot - k * self.batch_size))
        return dataclasses.replace(self, steps=self.steps - k, finished=False, cursor=cursor,
                                   samples=max(0, self.samples - k * self.batch_size),
                                   positions=positions, ahead=None,
                                   history=collections.deque(maxlen=_HISTORY))


_MISSING = object()
_HISTORY = 16  # batches that can be taken back (Lightning holds 1)
_FETCHERS = {("lightning.pytorch.loops.fetchers", "_PrefetchDataFetcher"),
             ("pytorch_lightning.loops.fetchers", "_PrefetchDataFetcher")}


def fetching_ahead() -> Callable[[], int] | None:
    """If a framework's fetch-ahead consumer is calling ``iter()`` on the loader (found in
    the caller's frames, once per pass), a function giving how many batches it holds."""
    fetcher = caller_self(
        lambda obj: (type(obj).__module__, type(obj).__qualname__) in _FETCHERS,
        {m for m, _ in _FETCHERS}, skip=3)
    if fetcher is None:
        return None
    ref = weakref.ref(fetcher)
    return lambda: len(getattr(ref(), "batches", None) or ())


def _rows(batch: Any) -> int:
    """Rows in a batch: the first dimension of its first tensor (1 for a 0-dim one)."""
    t = first_tensor(batch)
    return 0 if t is None else (int(t.shape[0]) if t.dim() else 1)


class DistributedIterator:
    """One pass over a `DistributedLoader` (create it with ``iter(loader)``).

    ``next()``/``get_next()`` hand out the next batch, already on the loader's device; at the
    end of data every rank stops at the same step. ``num_steps`` is the number of batches this
    pass yields when known (for a resumed pass: the rest of the epoch); ``len()`` is the
    loader's, as torch's DataLoader iterators have it.
    """

    def __init__(self, loader: DistributedLoader,
                 start: Callable[[], tuple[Pass, HostSource, int]]) -> None:
        self._loader = loader
        self._start: Callable[[], tuple[Pass, HostSource, int]] | None = start
        self._closed = False
        self._t0 = time.perf_counter()
        self._steps = 0
        self._samples = 0

    def _begin(self) -> None:
        """Start the pass (at its first ``next()``, as torch's DataLoader reads its sampler
        then): the loader lays it out, and the first message checks that every rank agrees
        on the configuration and the position it starts from."""
        start, self._start = self._start, None
        assert start is not None
        loader = self._loader
        self._pass, source, serial = start()
        self._source = source
        pass_ = self._pass
        backend = loader.backend
        self.num_steps: int | None = source.num_batches
        # a MixedDataset's realised proportions: its sources of the slots handed out
        self._counted_slot = pass_.cursor.slot if pass_.cursor is not None else None
        self._source_counts: Any = None
        empty = None
        if not loader.is_iterable:  # pad: a rank with no batch copies the form of sample 0
            empty = functools.partial(BatchFetcher(loader.dataset, loader.collate_fn, False,
                                                   backend.rank), np.zeros(1, dtype=np.int64))
        try:  # its first message is the configuration check
            self._sync = EndOfDataSync(
                source, backend, loader.uneven, loader.sync_timeout,
                name=f"horovod_iter.{loader.id}", ops=loader.messages, serial=serial,
                config=loader.config(), empty=empty, num_batches=source.num_batches,
                even_rows=(pass_.batch_size or loader._even_rows) if loader.even_batches
                else None,
                mark_padding=loader.mark_padding, lookahead_bytes=loader.lookahead_bytes)
        except BaseException:
            self._closed = True
            source.close()
            raise
        self._prefetcher = CudaPrefetcher(self._sync, loader.device, loader.prefetch,
                                          pin_memory=loader.pin_memory,
                                          device_transform=loader.device_transform)
        self._it = iter(self._prefetcher)
        self._progress = Progress(self.num_steps, f"epoch {pass_.epoch}",
                                  loader.progress and backend.rank == 0)

    def __getattr__(self, name: str) -> Any:
        # the pass's facts (num_steps) exist once it started: asking for them starts it
        if name == "num_steps" and self.__dict__.get("_start") is not None \
                and not self.__dict__.get("_closed", True):
            self._begin()
            return self.__dict__[name]
        raise AttributeError(name)

    # -- protocol ---------------------------------------------------------------------
    def __iter__(self) -> DistributedIterator:
        return self

    def __len__(self) -> int:
        return len(self._loader)

    def __next__(self) -> Any:
        if self._closed:
            raise StopIteration
        if self._start is not None:
            try:
                self._begin()
            except BaseException:
                self._closed = True
                raise
        try:
            batch = next(self._it)
        except StopIteration:
            self._pass.finished = True
            self.close()
            raise
        except BaseException:
            self.close()
            raise
        positions = self._source.positions
        self._pass.handed(positions.popleft() if positions else None)
        self._steps += 1
        self._samples += _rows(batch)
        if self._progress.enabled:
            self._progress.update()
        return batch

    def get_next(self) -> Any:
        """The next batch; raises `OutOfRangeError` at the end of data, at the same
        step on every rank."""
        try:
            return next(self)
        except StopIteration:
            raise OutOfRangeError(
                f"end of data after step {self._pass.steps if '_pass' in self.__dict__ else 0} "
                f"(rank {self._loader.backend.rank})") from None

    def get_next_as_optional(self) -> Any | None:
        """The next batch, or ``None`` at the end of data."""
        try:
            return next(self)
        except StopIteration:
            return None

    def stats(self) -> dict[str, Any]:
        """Steps, samples, seconds waiting for data / in the end-of-data check, h2d bytes."""
        elapsed = time.perf_counter() - self._t0
        if "_sync" not in self.__dict__:  # not started
            return {"steps": 0, "samples": 0, "elapsed_s": elapsed}
        p, s = self._prefetcher, self._sync
        return {
            "steps": self._steps, "samples": self._samples, "elapsed_s": elapsed,
            "data_wait_s": p.wait_s, "input_bound_fraction": p.wait_s / elapsed if elapsed else 0.0,
            "sync_wait_s": s.wait_s, "h2d_bytes": p.h2d_bytes,
            "h2d_gbps": p.h2d_bytes / elapsed / 1e9 if elapsed else 0.0,
            "padded_steps": s.padded_steps,
            "lookahead_max_batches": s.lookahead_max_batches,
            "lookahead_max_bytes": s.lookahead_max_bytes,
            **self._mix_stats(),
        }

    def _mix_stats(self) -> dict[str, Any]:
        """``source_counts`` and ``source_proportions`` of a `MixedDataset`: the samples this
        rank handed out, by source (counted incrementally from the slots taken)."""
        ds, cursor = self._loader.dataset, self._pass.cursor
        of_steps = getattr(ds, "rank_source_counts", None)
        if callable(of_steps):  # a MixedStream: the shares follow from the step
            counts = of_steps(self._pass.steps)
            return {"source_counts": dict(zip(ds.names, counts)),
                    "source_proportions": ds.proportions(counts)}
        source_of = getattr(ds, "source_of", None)
        if cursor is None or self._counted_slot is None or not callable(source_of):
            return {}
        if self._source_counts is None:
            self._source_counts = np.zeros(len(ds.names), dtype=np.int64)
        if cursor.slot > self._counted_slot:
            idx = cursor.plan.indices(self._counted_slot, cursor.slot)
            self._source_counts += np.bincount(source_of(idx), minlength=len(ds.names))
            self._counted_slot = cursor.slot
        counts = self._source_counts.tolist()
        return {"source_counts": dict(zip(ds.names, counts)),
                "source_proportions": ds.proportions(counts)}

    def close(self) -> None:
        """Release workers, pinned buffers and streams; never waits on other ranks.
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        if "_prefetcher" not in self.__dict__:  # never started: nothing to release
            return
        try:
            self._prefetcher.close()
        finally:
            try:
                self._sync.close()
            finally:
                self._source.close()
        stats = self.stats()
        self._loader._ended(self)
        self._progress.close(stats)
        if self._loader.log_stats and log.isEnabledFor(logging.DEBUG):
            log.debug("rank %d, epoch %d: %s", self._loader.backend.rank, self._pass.epoch,
                      format_stats(stats))

    def abandon(self) -> None:
        """Close without waiting for the collectives in flight (their world is gone)."""
        if "_sync" in self.__dict__:
            self._sync.abandon()
        self.close()

    def __enter__(self) -> DistributedIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # the attributes go with the object (DataLoader workers by torch's own finalizer);
        # only make sure nothing will wait for the collectives in flight
        exiting = getattr(_backend, "exiting", None)
        if getattr(self, "_closed", True) or not callable(exiting):  # interpreter teardown
            return
        if not exiting():
            self._closed = True
            if "_sync" in self.__dict__:
                self._sync.abandon()
