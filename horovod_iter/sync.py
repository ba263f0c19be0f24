"""End of data, synchronised by allreduce: all ranks stop (or pad) at the same step.

Per step, each rank contributes 1 if it has a batch and 0 if not, and the sum is allreduced:
``W`` means everyone has data, ``0`` nobody, anything between means the ranks ran out at
different steps, which ``uneven`` resolves:

* ``"stop"``: every rank stops at the first step at which any rank has no batch;
* ``"pad"``: ranks that ran out yield empty batches (same structure, zero rows) until all are
  done - every sample is seen exactly once;
* ``"error"``: every rank raises :class:`UnevenDataError`.

Two ways to send the flags, both asynchronous so the wait normally finds them complete:

* **known length** (map-style data with our sampler): this rank's batch count is known, so the
  flag of step ``i`` is just ``i < num_batches``. The flags of ``chunk`` steps travel in one
  allreduce, issued ``lookahead`` steps ahead of the step handed out: one collective per
  ``chunk`` steps, and no batch is pulled early for it.
* **unknown length** (iterable data, user samplers): the flag of step ``i + 1`` needs batch
  ``i + 1``, so it is pulled and its allreduce issued while the consumer works on step ``i``
  (``lookahead`` batches held).

Either way every rank issues the same named collectives in the same order for the steps they
hand out, and ``close()`` waits for those in flight - nothing is left half-issued.
"""
from __future__ import annotations

import collections
import hashlib
import json
import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any, Callable, Literal

import torch

from ._tree import ErrorBox, empty_like
from .backend import AsyncHandle, Backend
from .errors import ConfigMismatchError, RankFailureError, SampleError, UnevenDataError

__all__ = ["UNEVEN", "EndOfDataSync", "Uneven", "check_same_config"]

log = logging.getLogger("horovod_iter")

Uneven = Literal["stop", "pad", "error"]
UNEVEN: tuple[Uneven, ...] = ("stop", "pad", "error")


def _fingerprint(config: Mapping[str, Any]) -> int:
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "little") >> 1


def check_same_config(backend: Backend, config: Mapping[str, Any], timeout: float | None,
                      name: str) -> None:
    """Raise :class:`ConfigMismatchError` on every rank if any rank's ``config`` differs.

    One allreduce (min and max of a 63-bit hash) in the common case; only on a mismatch do the
    ranks gather their configs, to say exactly which field differs where.
    """
    if backend.size == 1:
        return
    h = _fingerprint(config)
    both = backend.allreduce_async(torch.tensor([h, -h], dtype=torch.int64), "min",
                                   name=f"{name}.config").wait(
        timeout, what="the configuration check at the start of iteration")
    if int(both[0]) == h and -int(both[1]) == h:
        return
    configs = backend.allgather_object(dict(config))
    diffs = []
    for key in sorted({k for c in configs for k in c}):
        values = [c.get(key) for c in configs]
        if any(v != values[0] for v in values):
            diffs.append(f"{key}: " + ", ".join(f"rank {r}={v!r}" for r, v in enumerate(values)))
    raise ConfigMismatchError(
        f"rank {backend.rank}: the ranks are configured differently, so their data would not "
        "line up (or their collectives would hang): " + "; ".join(diffs)
        + ". Build the loader with the same arguments and dataset on every rank."
    )


class EndOfDataSync:
    """Iterate ``source`` in lockstep with the other ranks (see the module docstring).

    Args:
        source: this rank's batches.
        backend: the ranks to agree with.
        uneven: ``"stop"``, ``"pad"`` or ``"error"``.
        timeout: seconds to wait for the other ranks at a step before raising
            :class:`DataTimeoutError` (``None``: forever).
        name: unique among this process's iterations and the same on every rank (names the
            Horovod ops).
        empty: makes the empty batch for ``pad`` when this rank never had a batch to copy the
            structure from; without it such a rank raises.
        num_batches: this rank's batch count when it is known up front (map-style data). The
            flags are then a function of the step: no batch is pulled early, and the flags of
            ``chunk`` steps travel in one allreduce.
        chunk: steps per allreduce (needs ``num_batches`` when > 1).
        lookahead: steps whose flags are in flight ahead of the step being handed out (>= 1).
            Without ``num_batches`` it holds that many batches.
    """

    def __init__(self, source: Iterator[Any], backend: Backend, uneven: Uneven = "stop",
                 timeout: float | None = 300.0, name: str = "horovod_iter.eod",
                 empty: Callable[[], Any] | None = None, num_batches: int | None = None,
                 chunk: int = 1, lookahead: int = 2) -> None:
        if uneven not in UNEVEN:
            raise ValueError(f"uneven must be one of {UNEVEN}, got {uneven!r}")
        if not isinstance(lookahead, int) or lookahead < 1:
            raise ValueError(f"lookahead must be an int >= 1, got {lookahead!r}")
        if not isinstance(chunk, int) or chunk < 1 or (chunk > 1 and num_batches is None):
            raise ValueError(f"chunk must be 1, or an int >= 1 with num_batches; got {chunk!r}")
        self._source: Iterator[Any] | None = source
        self.backend = backend
        self.uneven = uneven
        self.timeout = timeout
        self.name = name
        self.num_batches = num_batches
        self.chunk = chunk
        self.lookahead = lookahead
        self._empty = empty
        self._template: Any = None
        self._step = 0      # the next step to hand out
        self._issued = 0    # flags of steps < _issued are allreduced (or in flight)
        self._chunks: collections.deque[tuple[int, AsyncHandle]] = collections.deque()
        self._totals: dict[int, int] = {}    # step -> ranks with data, for waited chunks
        # pulled ahead (unknown length): (has batch, batch) or ErrorBox, steps _step.._issued-1
        self._pulled: collections.deque[tuple[bool, Any] | ErrorBox] = collections.deque()
        self._failed = False
        self._done = False
        #: seconds spent waiting for the end-of-data allreduce
        self.wait_s = 0.0
        #: steps at which this rank yielded an empty (padding) batch
        self.padded_steps = 0

    # -- this rank's data -----------------------------------------------------------------
    def _pull(self) -> tuple[bool, Any]:
        """This rank's next batch, (False, None) at its end."""
        if self._source is not None:
            try:
                batch = next(self._source)
                if self._template is None:
                    self._template = batch
                return True, batch
            except StopIteration:
                self._source = None
        return False, None

    def _issue(self) -> None:
        """Start the allreduce of the flags of the next ``chunk`` steps."""
        first = self._issued
        if self.num_batches is not None:
            flags = [1 if first + k < self.num_batches else 0 for k in range(self.chunk)]
        else:
            try:
                entry = self._pull()
            except Exception as e:  # no flag for this step: the others will time out
                self._failed = True
                self._pulled.append(ErrorBox(e))
                return
            self._pulled.append(entry)
            flags = [1 if entry[0] else 0]
        try:
            handle = self.backend.allreduce_async(torch.tensor(flags, dtype=torch.int32),
                                                  "sum", name=f"{self.name}.{first}")
        except RankFailureError as e:  # a rank died: say where we were
            self._finish()
            self._chunks.clear()
            e.args = (f"{e} (while sending the end-of-data flags of step {first}"
                      f"{f' to {first + len(flags) - 1}' if len(flags) > 1 else ''})",)
            raise
        self._chunks.append((first, handle))
        self._issued = first + len(flags)

    def _fill(self) -> None:
        while self._issued < self._step + 1 + self.lookahead and not self._failed:
            self._issue()

    def _total(self, step: int, has: bool) -> int:
        """Ranks with data at ``step``, waiting for its chunk if needed."""
        while step not in self._totals:
            first, handle = self._chunks.popleft()
            t0 = time.perf_counter()
            try:
                sums = handle.wait(
                    self.timeout, what=f"the other ranks' end-of-data flags of step {step} "
                    f"(this rank {'has' if has else 'has no'} batch)")
            except RankFailureError:
                self._finish()
                self._chunks.clear()  # the ranks are out of step: nothing more to wait for
                raise
            finally:
                self.wait_s += time.perf_counter() - t0
            self._totals.update((first + k, int(v)) for k, v in enumerate(sums.tolist()))
        return self._totals.pop(step)

    # -- iteration ------------------------------------------------------------------------
    def __iter__(self) -> EndOfDataSync:
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        self._fill()
        step, size = self._step, self.backend.size
        if self.num_batches is None:
            entry = self._pulled.popleft()
            if isinstance(entry, ErrorBox):
                self._finish()
                entry.reraise()
            has, batch = entry
        else:
            has, batch = step < self.num_batches, None
        total = self._total(step, has)
        if has and self.num_batches is not None:
            has, batch = self._pull()
            if not has:
                self._finish()
                raise SampleError(
                    f"rank {self.backend.rank}: expected {self.num_batches} batches but the "
                    f"source ended after {step}; did the dataset's length change during the "
                    "epoch, or does the sampler yield fewer indices than its len()?"
                )
        if total == size:
            out = batch
        elif total == 0:
            self._finish()
            self._confirm_end(step)
            raise StopIteration
        elif self.uneven == "stop":
            if has:
                log.debug("rank %d: stopping at step %d; %d of %d ranks have data",
                          self.backend.rank, step, total, size)
            self._finish()
            self._confirm_end(step)
            raise StopIteration
        elif self.uneven == "error":
            self._finish()
            raise UnevenDataError(
                f"rank {self.backend.rank}: ranks ran out of data at different steps: at step "
                f"{step} only {total} of {size} ranks have a batch (this rank "
                f"{'has one' if has else 'has none'}). Use uneven='stop' to stop at the "
                "shortest rank, uneven='pad' to pad with empty batches, or shard the data evenly."
            )
        elif has:
            out = batch
        else:
            out = self._empty_batch(step)
            self.padded_steps += 1
        self._step += 1
        self._fill()  # the next flags travel while the consumer works on this batch
        return out

    def _confirm_end(self, step: int) -> None:
        """One collective per pass: every rank ended at ``step``. The flags travel ahead of the
        steps, so a rank that stalls early would otherwise go unnoticed by the others until
        their next collective, possibly after the epoch (and the job) ended."""
        if self.backend.size == 1:
            return
        t0 = time.perf_counter()
        try:
            both = self.backend.allreduce_async(
                torch.tensor([step, -step], dtype=torch.int64), "min",
                name=f"{self.name}.end").wait(
                self.timeout, what=f"the other ranks to reach the end of data at step {step}")
        finally:
            self.wait_s += time.perf_counter() - t0
        if int(both[0]) != step or -int(both[1]) != step:
            raise RankFailureError(
                f"rank {self.backend.rank}: the ranks ended the pass at different steps "
                f"({int(both[0])} to {-int(both[1])}, this rank {step}); iterate the loader on "
                "every rank alike")

    def _empty_batch(self, step: int) -> Any:
        if self._template is not None:
            return empty_like(self._template)
        if self._empty is not None:
            self._template = self._empty()
            return empty_like(self._template)
        self._finish()
        raise UnevenDataError(
            f"rank {self.backend.rank}: uneven='pad' needs one batch to learn the batch "
            f"structure, but this rank had no data at all (step {step}). Give every rank at "
            "least one sample, or use uneven='stop'."
        )

    def _finish(self) -> None:
        self._done = True
        self._source = None
        self._pulled.clear()

    def abandon(self) -> None:
        """Stop and forget the allreduces in flight without waiting (their world is gone)."""
        self._finish()
        self._chunks.clear()

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop; wait (briefly) for the allreduces in flight so no collective is abandoned.

        Every rank that stopped at the same step issued the same flags, so they complete.
        """
        self._finish()
        chunks, self._chunks = self._chunks, collections.deque()
        for _, handle in chunks:
            try:
                handle.wait(timeout, what="an end-of-data allreduce in flight at close()")
            except Exception as e:  # the other ranks stopped at another step
                log.warning("rank %d: %s", self.backend.rank, e)
                break
