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
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import backend as _backend
from ._tree import first_tensor
from .backend import Backend
from .errors import OutOfRangeError
from .fetch import HostSource
from .prefetch import CudaPrefetcher
from .progress import Progress, format_stats
from .sampler import Cursor
from .sync import EndOfDataSync, MessageCounter, Uneven

__all__ = ["DistributedIterator", "Pass", "PassOptions"]

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
    #: the batches of this pass the trainer really used, when a framework says so (it
    #: fetched the others ahead: Lightning, for data without len()); None: all it took
    used: int | None = None
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
        k = self.steps - self.used if self.used is not None else 0
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
                                   positions=positions, used=None,
                                   history=collections.deque(maxlen=_HISTORY))


@dataclass(frozen=True)
class PassOptions:
    """Everything one pass needs from its loader, as one value made when the pass starts
    (so this module knows nothing of the loader)."""

    backend: Backend
    uneven: Uneven
    #: seconds to wait for the other ranks (None: no limit)
    timeout: float | None
    #: names the pass's collectives (with ``ops``): the same on every rank
    name: str
    ops: MessageCounter
    #: this pass's number among the loader's passes
    serial: int
    #: what every rank must agree on (the first message checks it)
    config: dict[str, Any]
    #: makes an empty batch of the data's structure (map-style ``pad``)
    empty: Callable[[], Any] | None
    even_rows: int | None
    mark_padding: Callable[[Any, torch.Tensor], Any] | None
    lookahead_bytes: int
    device: torch.device
    prefetch: int
    pin_memory: bool
    device_transform: Callable[[Any], Any] | None
    progress: bool
    log_stats: bool
    #: a mix's realised shares of the batches handed out (``source_counts``...), if any
    mix_stats: Callable[[Pass], dict[str, Any]] | None = None
    #: called with the pass's figures when it closes
    on_close: Callable[[dict[str, Any]], None] | None = None


_MISSING = object()
_HISTORY = 16  # batches that can be taken back (Lightning holds 1)
def _rows(batch: Any) -> int:
    """Rows in a batch: the first dimension of its first tensor (1 for a 0-dim one)."""
    t = first_tensor(batch)
    return 0 if t is None else (int(t.shape[0]) if t.dim() else 1)


class DistributedIterator:
    """One pass over a `DistributedLoader` (create it with ``iter(loader)``).

    ``next()``/``get_next()`` hand out the next batch, already on the loader's device; at the
    end of data every rank stops at the same step. ``num_steps`` is the number of batches this
    pass yields when known (for a resumed pass: the rest of the epoch); ``len()`` is the
    loader's, as torch's DataLoader iterators have it. The pass starts at its first
    ``next()`` (torch's DataLoader reads its sampler then): an epoch set in between applies.
    """

    def __init__(self, start: Callable[[], tuple[Pass, HostSource, PassOptions]],
                 length: Callable[[], int]) -> None:
        self._start: Callable[[], tuple[Pass, HostSource, PassOptions]] | None = start
        self._length = length
        self._closed = False
        self._t0 = time.perf_counter()
        self._steps = 0
        self._samples = 0

    def _begin(self) -> None:
        """Start the pass: the loader lays it out, and the first message checks that every
        rank agrees on the configuration and the position it starts from."""
        start, self._start = self._start, None
        assert start is not None
        self._pass, source, o = start()
        self._source, self._opts = source, o
        self.num_steps: int | None = source.num_batches
        try:  # its first message is the configuration check
            self._sync = EndOfDataSync(
                source, o.backend, o.uneven, o.timeout, name=o.name, ops=o.ops,
                serial=o.serial, config=o.config, empty=o.empty,
                num_batches=source.num_batches, even_rows=o.even_rows,
                mark_padding=o.mark_padding, lookahead_bytes=o.lookahead_bytes)
        except BaseException:
            self._closed = True
            source.close()
            raise
        self._prefetcher = CudaPrefetcher(self._sync, o.device, o.prefetch,
                                          pin_memory=o.pin_memory,
                                          device_transform=o.device_transform)
        self._it = iter(self._prefetcher)
        self._progress = Progress(self.num_steps, f"epoch {self._pass.epoch}",
                                  o.progress and o.backend.rank == 0)

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
        return self._length()

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
            started = "_opts" in self.__dict__
            raise OutOfRangeError(
                f"end of data after step {self._pass.steps if started else 0}"
                + (f" (rank {self._opts.backend.rank})" if started else "")) from None

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
        p, s, mix = self._prefetcher, self._sync, self._opts.mix_stats
        return {
            "steps": self._steps, "samples": self._samples, "elapsed_s": elapsed,
            "data_wait_s": p.wait_s,
            # host and device waits may overlap in time
            "input_bound_fraction": min(1.0, p.wait_s / elapsed) if elapsed else 0.0,
            "device_wait_s": p.device_wait_s, "throttle_s": p.throttle_s,
            "pinned_bytes": p.pinned_bytes,
            "sync_wait_s": s.wait_s, "h2d_bytes": p.h2d_bytes,
            "h2d_gbps": p.h2d_bytes / elapsed / 1e9 if elapsed else 0.0,
            "padded_steps": s.padded_steps,
            "lookahead_max_batches": s.lookahead_max_batches,
            "lookahead_max_bytes": s.lookahead_max_bytes,
            **(mix(self._pass) if mix is not None else {}),
        }

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
        o = self._opts
        if o.on_close is not None:
            o.on_close(stats)
        self._progress.close(stats)
        if o.log_stats and log.isEnabledFor(logging.DEBUG):
            log.debug("rank %d, epoch %d: %s", o.backend.rank, self._pass.epoch,
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
                on_close = self._opts.on_close
                if on_close is not None:  # a pass left by `break`: the loader keeps its figures
                    with contextlib.suppress(Exception):
                        on_close(self.stats())
