"""End of data, synchronised by allreduce: all ranks stop (or pad) at the same step.

Per step, each rank contributes 1 if it has a batch and 0 if not, and the sum is allreduced:
``W`` means everyone has data, ``0`` nobody, anything between means the ranks ran out at
different steps, which ``uneven`` resolves:

* ``"stop"``: every rank stops at the first step at which any rank has no batch;
* ``"pad"``: ranks that ran out yield empty batches (same structure, zero rows) until all are
  done - every sample is seen exactly once;
* ``"error"``: every rank raises :class:`UnevenDataError`.

Look-ahead: the flag of step ``i + 1`` is allreduced asynchronously while the consumer works on
step ``i``: when batch ``i`` is handed out, batch ``i + 1`` has already been pulled and its
allreduce issued, so the wait at the next step normally finds it complete. Each rank issues
exactly one allreduce per step it hands out plus the one looked ahead, so ranks that consume the
same number of steps issue the same collectives - nothing is left half-issued.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any, Callable

import numpy as np
import torch

from .backend import AsyncHandle, Backend
from .errors import ConfigMismatchError, DataTimeoutError, UnevenDataError

__all__ = ["UNEVEN", "EndOfDataSync", "check_same_config", "empty_like_batch"]

log = logging.getLogger("horovod_iter")

UNEVEN = ("stop", "pad", "error")


def empty_like_batch(batch: Any) -> Any:
    """The same structure with zero rows: tensors and arrays sliced to ``[:0]``, lists of
    per-sample values emptied, other leaves kept."""
    if isinstance(batch, (torch.Tensor, np.ndarray)):
        return batch[:0]
    if isinstance(batch, Mapping):
        return type(batch)({k: empty_like_batch(v) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(empty_like_batch(v) for v in batch))
    if isinstance(batch, (list, tuple)):
        containers = (torch.Tensor, np.ndarray, Mapping, list, tuple)
        if batch and all(isinstance(v, containers) for v in batch):
            return type(batch)(empty_like_batch(v) for v in batch)
        return type(batch)()  # a list of per-sample values (strings, ints): no rows
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(batch, **{f.name: empty_like_batch(getattr(batch, f.name))
                                             for f in dataclasses.fields(batch) if f.init})
    return batch


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
    """

    def __init__(self, source: Iterator[Any], backend: Backend, uneven: str = "stop",
                 timeout: float | None = 300.0, name: str = "horovod_iter.eod",
                 empty: Callable[[], Any] | None = None) -> None:
        if uneven not in UNEVEN:
            raise ValueError(f"uneven must be one of {UNEVEN}, got {uneven!r}")
        self._source: Iterator[Any] | None = source
        self.backend = backend
        self.uneven = uneven
        self.timeout = timeout
        self.name = name
        self._empty = empty
        self._template: Any = None
        self._step = 0
        self._has = False
        self._batch: Any = None
        self._handle: AsyncHandle | None = None
        self._done = False
        self._started = False
        #: seconds spent waiting for the end-of-data allreduce
        self.wait_s = 0.0
        #: steps at which this rank yielded an empty (padding) batch
        self.padded_steps = 0

    def _look_ahead(self) -> None:
        """Pull this rank's batch for ``self._step`` and start its allreduce."""
        self._has, self._batch = False, None
        if self._source is not None:
            try:
                self._batch = next(self._source)
                self._has = True
                if self._template is None:
                    self._template = self._batch
            except StopIteration:
                self._source = None
        flag = torch.tensor([1 if self._has else 0], dtype=torch.int32)
        self._handle = self.backend.allreduce_async(flag, "sum", name=f"{self.name}.{self._step}")

    def __iter__(self) -> EndOfDataSync:
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        if not self._started:
            self._started = True
            self._look_ahead()
        assert self._handle is not None
        t0 = time.perf_counter()
        try:
            total = int(self._handle.wait(
                self.timeout, what=f"the other ranks' end-of-data flags of step {self._step} "
                f"(this rank {'has' if self._has else 'has no'} batch)")[0])
        except DataTimeoutError:
            self._handle = None
            self._done = True
            raise
        finally:
            self.wait_s += time.perf_counter() - t0
        self._handle = None
        size, step = self.backend.size, self._step
        if total == size:
            out = self._batch
        elif total == 0:
            self._finish()
            raise StopIteration
        elif self.uneven == "stop":
            if self._has:
                log.debug("rank %d: stopping at step %d; %d of %d ranks have data",
                          self.backend.rank, step, total, size)
            self._finish()
            raise StopIteration
        elif self.uneven == "error":
            self._finish()
            raise UnevenDataError(
                f"rank {self.backend.rank}: ranks ran out of data at different steps: at step "
                f"{step} only {total} of {size} ranks have a batch (this rank "
                f"{'has one' if self._has else 'has none'}). Use uneven='stop' to stop at the "
                "shortest rank, uneven='pad' to pad with empty batches, or shard the data evenly."
            )
        elif self._has:
            out = self._batch
        else:
            out = self._empty_batch(step)
            self.padded_steps += 1
        self._step += 1
        self._look_ahead()
        return out

    def _empty_batch(self, step: int) -> Any:
        if self._template is not None:
            return empty_like_batch(self._template)
        if self._empty is not None:
            self._template = self._empty()
            return empty_like_batch(self._template)
        self._finish()
        raise UnevenDataError(
            f"rank {self.backend.rank}: uneven='pad' needs one batch to learn the batch "
            f"structure, but this rank had no data at all (step {step}). Give every rank at "
            "least one sample, or use uneven='stop'."
        )

    def _finish(self) -> None:
        self._done = True
        self._source = None
        self._batch = None

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop; wait (briefly) for the allreduce in flight so no collective is abandoned."""
        handle, self._handle = self._handle, None
        self._finish()
        if handle is not None:
            try:
                handle.wait(timeout, what="the end-of-data allreduce in flight at close()")
            except Exception as e:  # the other ranks stopped at another step
                log.warning("rank %d: %s", self.backend.rank, e)
