"""End of data, agreed by the ranks: all stop (or pad) at the same step, and nothing escapes.

The ranks exchange small *messages*: one ``min``-allreduce of an int64 vector (``_FIELDS``):

* a header - kind, pass serial, step, configuration hash - sent as ``(x, -x)`` pairs, so the
  result says whether every rank sent the same (min == max). Every collective of a loader has
  this one shape and name sequence, so when the ranks drift apart (one rank iterating a loader
  that the others do not, a different configuration) the very next message pairs mismatched
  headers and every rank in it raises `ConfigMismatchError` at once;
* what each rank knows of its data: ``known`` (batches it has, counted from the pass start)
  and ``end`` (its batch count once its data ended). Their min and max tell every rank, from
  the same messages, the steps at which all ranks have data (``< min known``), at which some
  rank has none (``>= min end``), and where the last rank ends (``max end``).

Map-style data knows its batch count up front: the first message (sent at ``iter()``, also the
configuration check) decides the whole pass. Iterable data pulls batches ahead (two periods,
so the collective's latency is hidden) and reports them every ``every`` steps: up to 64, as
many as a 256 MB look-ahead holds, the smallest proposal of the ranks. Either way a message
goes as a heartbeat (map-style: about every 0.1 s, 1 to 1024 steps; at most two in flight),
and every pass ends with an
``END`` message that confirms all ranks ended at the same step - so a rank that stalls or dies
is noticed within ``timeout``, also in an epoch shorter than the heartbeat period. Ranks that
run out at different steps are resolved by ``uneven``:

* ``"stop"``: every rank stops at the first step at which any rank has no batch;
* ``"pad"``: ranks that ran out yield empty batches (same structure, zero rows; a rank that
  never had data learns the structure from the others, in one collective) until all are done;
* ``"error"``: every rank raises `UnevenDataError`.

Every decision is a function of the step and of messages all ranks have completed, so every
rank issues the same messages in the same order. ``close()`` never waits: a message in flight
completes by itself where every rank issued it, and pairs with (and trips) the next message of
a rank that did not. Every wait is bounded by ``timeout``; a failed, timed-out or mismatched
message marks the backend failed (the exit path then abandons the group).
"""
from __future__ import annotations

import collections
import hashlib
import itertools
import json
import logging
import sys
import time
import warnings
import weakref
from collections.abc import Iterator, Mapping
from typing import Any, Callable, Literal

import torch

from ._tree import ErrorBox, batch_rows, empty_like, fill_rows, first_rows, host_bytes, tree_map
from .backend import AsyncHandle, Backend
from .errors import ConfigMismatchError, RankFailureError, SampleError, UnevenDataError

__all__ = ["LOOKAHEAD_BYTES", "UNEVEN", "EndOfDataSync", "MessageCounter", "Uneven",
           "agree_on_state", "config_hash"]

log = logging.getLogger("horovod_iter")

Uneven = Literal["stop", "pad", "error"]
UNEVEN: tuple[Uneven, ...] = ("stop", "pad", "error")
INF = 1 << 62
_CONFIG, _FLAGS, _END, _STATE, _TEMPLATE = 1, 2, 3, 4, 5
_KINDS = {_CONFIG: "the configuration check", _FLAGS: "a heartbeat", _END: "the end of data",
          _STATE: "state_dict()", _TEMPLATE: "the padding template exchange"}
# message layout: (x, -x) header pairs, then data fields reduced with min
_KIND, _SERIAL, _STEP, _HASH = 0, 2, 4, 6
_KNOWN, _END_AT, _EVERY, _FAILED_AT = 8, 10, 12, 13
_FIELDS = 14
LOOKAHEAD_BYTES = 256 << 20  # host memory the iterable look-ahead may hold by default
_MAX_EVERY = 64             # iterables: steps between reports (the look-ahead is twice that)
_MIN_BEAT, _MAX_BEAT = 1, 1024  # map-style: steps between heartbeats
_FIRST_BEAT = 8             # before the step rate is known
_BEAT_S = 0.1               # aim for a message about every this many seconds


#: loaders already warned that uneven="stop" left batches untrained: their message counters
#: (one per loader, shared by its passes), else their names
_STOP_WARNED: weakref.WeakSet[Any] = weakref.WeakSet()
_STOP_WARNED_NAMES: set[str] = set()


def _user_level() -> int:
    """``stacklevel`` of the nearest frame outside this package, for a ``warnings.warn``
    made by the caller: the user's loop, not the pipeline's stage that noticed."""
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_back is not None and (
            frame.f_globals.get("__name__", "").split(".")[0] == "horovod_iter"):
        frame, level = frame.f_back, level + 1
    return level


class MessageCounter(Iterator[int]):
    """Numbers a loader's messages (they name its Horovod ops); ``value`` is the next one.

    It also keeps the pace its passes' messages settled on - the agreed period ``every`` and
    the ``latency`` of a message - so that the next pass of the loader starts from them
    instead of warming up again (a short pass between far hosts was mostly warm-up: 30 steps
    of 5 ms took 3.7 s at 200 ms RTT). The period is proposed in the pass's first message and
    agreed there, so every rank starts from the same one."""

    def __init__(self, value: int = 0) -> None:
        self.value = value
        self.every: int | None = None
        self.latency = 0.0

    def __next__(self) -> int:
        self.value += 1
        return self.value - 1


def agree_on_state(backend: Backend, *, name: str, ops: Iterator[int], serial: int, step: int,
                   timeout: float | None) -> None:
    """One message of the loader's sequence before a collective ``state_dict()`` (sharded
    data): every rank must send it at the same step. A rank that calls ``state_dict()`` alone
    (``if rank == 0: loader.state_dict()``) meets the others' next message instead - a
    mismatched header, an error on every rank in it - or nobody, and times out; it never
    waits forever in the gather that follows."""
    msg = [_STATE, -_STATE, serial, -serial, step, -step, 0, 0, 0, 0, INF, -INF, _MAX_BEAT, INF]
    res = backend.allreduce_async(torch.tensor(msg, dtype=torch.int64), "min",
                                  name=f"{name}.{next(ops)}").wait(
        timeout, what=f"the other ranks at state_dict() (pass {serial}, step {step}); "
                      "call loader.state_dict() on every rank at the same step").tolist()
    if any(res[f] != -res[f + 1] for f in (_KIND, _SERIAL, _STEP)):
        error = ConfigMismatchError(
            f"rank {backend.rank}: loader.state_dict() of sharded or stateful iterable data "
            "gathers every rank's position: call loader.state_dict() on every rank at the "
            "same step (as with Horovod's state.commit()), not on one rank only; the dict is "
            "then the same everywhere and rank 0 can save it alone")
        backend.fail(str(error))  # the ranks' collectives are out of step
        raise error


def config_hash(config: Mapping[str, Any]) -> int:
    """A 62-bit hash of a JSON-able configuration."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "little") >> 2


class EndOfDataSync(Iterator[Any]):
    """Iterate ``source`` in lockstep with the other ranks (see the module docstring).

    Args:
        source: this rank's batches for one pass.
        backend: the ranks to agree with.
        uneven: ``"stop"``, ``"pad"`` or ``"error"``.
        timeout: seconds to wait for the other ranks before raising
            `DataTimeoutError` (``None``: forever).
        name: names the Horovod ops (with ``ops``); the same on every rank.
        ops: the loader's message counter, shared by its passes (so that a rank one pass
            ahead pairs its messages with the others' and the mismatch is seen).
        serial: this pass's number among the loader's passes, the same on every rank.
        config: what every rank must agree on; checked by the first message.
        empty: makes an empty batch for ``pad`` (map-style data) when this rank has none to
            copy the structure from.
        num_batches: this rank's batch count, when known up front (map-style data).
        every: steps between heartbeats (and look-ahead reports).
        even_rows: with ``pad``, fill every batch to this many rows with copies of a real row
            (its own first row; for an empty batch, the first row of a batch seen before or of
            another rank's), so that every rank's batch has the same shape at every step
            (``batch_size``; with a batch sampler, its ``batch_size``: see
            `check_even_batches`). A rank that ran out thus never gets an empty batch.
        lookahead_bytes: host memory the batches pulled ahead (iterable data) may hold, as
            `host_bytes` estimates it (tensors, arrays, bytes, str, containers); at least one
            batch ahead is always pulled.
        mark_padding: with ``even_rows``, ``mark_padding(batch, mask)`` returns the batch with
            its padding rows marked (``mask``: bool, one per row, True for a copy); called on
            every batch, so that the marks are in every batch alike.
    """

    def __init__(self, source: Iterator[Any], backend: Backend, uneven: Uneven = "stop",
                 timeout: float | None = 300.0, *, name: str = "horovod_iter.eod",
                 ops: Iterator[int] | None = None, serial: int = 0,
                 config: Mapping[str, Any] | None = None,
                 empty: Callable[[], Any] | None = None, num_batches: int | None = None,
                 every: int = _MAX_EVERY, even_rows: int | None = None,
                 mark_padding: Callable[[Any, torch.Tensor], Any] | None = None,
                 lookahead_bytes: int = LOOKAHEAD_BYTES) -> None:
        if uneven not in UNEVEN:
            raise ValueError(f"uneven must be one of {UNEVEN}, got {uneven!r}")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        if even_rows is not None and (not isinstance(even_rows, int) or even_rows < 1):
            raise ValueError(f"even_rows must be an int >= 1 (the rows every batch is filled "
                             f"to) or None, got {even_rows!r}")
        self._source: Iterator[Any] | None = source
        self.backend = backend
        self.uneven = uneven
        self.timeout = timeout
        self.name = name
        self._ops = ops if ops is not None else itertools.count()
        self.serial = serial
        self.num_batches = num_batches
        self._config = config
        self._empty = empty
        self._even_rows = even_rows
        self._mark = mark_padding
        self._template: Any = None   # pad: an empty copy of a batch (one row with even_rows)
        self._step = 0
        self._buffer: collections.deque[Any] = collections.deque()  # pulled, not handed
        self._pulled = 0                      # batches pulled (iterable) from the pass start
        self._ended_at: int | None = num_batches  # this rank's batch count once known
        self._failed = False
        self._budget = lookahead_bytes
        self._sizes: collections.deque[int] = collections.deque()  # of the buffered batches
        self._held = 0                        # bytes of the buffered batches
        self._pulled_bytes = 0                # of all batches pulled (their mean sizes
        #                                       the period between messages)
        self._issued = 0                      # messages of this pass (the look-ahead ramps up)
        self._ramp = 1                        # ... from here: the period the first message
        #                                       agreed (the last pass's, on a loader's later passes)
        #: most batches / bytes the look-ahead held at once (iterable data)
        self.lookahead_max_batches = 0
        self.lookahead_max_bytes = 0
        self._inflight: collections.deque[tuple[int, int, AsyncHandle]] = \
            collections.deque()               # (kind, step issued, handle)
        # what every rank knows, from completed messages
        self._all_have = 0        # every rank has data at steps < this
        self._some_have = 0       # some rank has data at steps < this
        self._first_end = INF     # some rank has no data from this step on
        self._last_end = INF      # every rank's data ended by this step (INF: not known)
        self._first_failed = INF  # some rank's data raised at this step
        self._every = min(every, _FIRST_BEAT)
        self._beat_t, self._beat_step = time.perf_counter(), 0
        self._beat_wait = 0.0     # wait_s at the last proposal (the trainer's time excludes it)
        # how long our messages take, issue to completion (decaying); from the last pass
        self._pace = ops if isinstance(ops, MessageCounter) else MessageCounter()
        self._latency = self._pace.latency
        self._timing: collections.deque[tuple[AsyncHandle, float]] = collections.deque()
        self._next_issue = 0
        self._template_shared = False
        self._done = False
        #: seconds spent waiting for the other ranks
        self.wait_s = 0.0
        #: steps at which this rank yielded an empty (padding) batch
        self.padded_steps = 0
        self._issue(_CONFIG)      # at the pass's start: also the configuration check,
        # waited for before anything else is issued: on a mismatch every rank then has the
        # same collectives behind it when they gather the configurations to explain it
        self._wait_oldest()

    # -- messages -------------------------------------------------------------------------
    def _pull_ahead(self, upto: int) -> None:
        """Iterable data: pull batches until ``upto`` are known or the data ends."""
        while self._ended_at is None and self._pulled < upto and self._source is not None:
            if self._held >= self._budget and self._pulled > self._step:
                return  # the memory budget: one batch ahead at least, never more than it
            try:
                batch = next(self._source)
            except StopIteration:
                self._ended_at = self._pulled
                self._source = None
                return
            except Exception as e:  # delivered at its step; the others learn we ended there
                self._buffer.append(ErrorBox(e))
                self._sizes.append(0)
                self._ended_at, self._failed, self._source = self._pulled, True, None
                return
            size = host_bytes(batch)
            self._remember(batch)
            self._buffer.append(batch)
            self._sizes.append(size)
            self._held += size
            self._pulled_bytes += size
            self._pulled += 1
            self.lookahead_max_batches = max(self.lookahead_max_batches, len(self._buffer))
            self.lookahead_max_bytes = max(self.lookahead_max_bytes, self._held)

    def _proposal(self) -> int:
        """Steps between messages this rank proposes (the ranks take the smallest): about
        every 0.1 s of steps, so that a stalled rank is noticed within ``timeout`` plus two
        periods whatever the step time (a message per step when steps are slower than 0.1 s;
        issuing a collective costs ~1 ms on a busy host, so fast steps send one per up to
        1024 steps). The step time is the trainer's own, without our waits (else one wait
        shortens the period, which makes more waits); and since a message has two periods
        to complete before a rank waits for it, a period covers 0.75 x the time our messages
        take (hosts far apart, Horovod's negotiation). Iterable data also keeps the
        look-ahead (two periods) within its memory budget, and at most 64 steps."""
        now, steps = time.perf_counter(), self._step - self._beat_step
        own = (now - self._beat_t) - (self.wait_s - self._beat_wait)
        period = max(_BEAT_S, 0.75 * self._latency)
        if not steps:  # no step rate yet: the period the loader's messages last agreed on
            beat = self._pace.every or _FIRST_BEAT
        else:
            beat = _MAX_BEAT if own <= 0 else int(steps / own * period)
        self._beat_t, self._beat_step, self._beat_wait = now, self._step, self.wait_s
        if self.num_batches is not None:
            return max(_MIN_BEAT, min(_MAX_BEAT, beat))
        cap = _MAX_EVERY
        if self._pulled_bytes:
            cap = min(cap, self._budget * self._pulled // (2 * self._pulled_bytes))
        return max(1, min(cap, beat))

    def _issue(self, kind: int) -> None:
        step = self._step
        ahead = 2 * self._every  # two periods: hides the latency
        if self.num_batches is None:
            # iterables ramp up (1, 2, 4, ... batches ahead), so that the first batch goes
            # out as soon as it exists, not once a whole look-ahead is made
            ahead = min(ahead, max(self._ramp, 1 << min(self._issued, 20)))
            if kind != _END:
                self._pull_ahead(step + ahead)
        self._issued += 1
        known = self.num_batches if self.num_batches is not None else self._pulled
        end = INF if self._ended_at is None else self._ended_at
        h = config_hash(self._config) if kind == _CONFIG and self._config is not None else 0
        msg = [kind, -kind, self.serial, -self.serial, step, -step, h, -h, known, -known,
               end, -end, self._proposal(), end if self._failed else INF]
        name = f"{self.name}.{next(self._ops)}"
        try:
            handle = self.backend.allreduce_async(torch.tensor(msg, dtype=torch.int64), "min",
                                                  name=name)
        except RankFailureError as e:  # a rank died: say where we were
            own = self._own_error()
            self.abandon()
            if own is not None:  # this rank's data failed first: that is the story to tell
                raise own from e
            e.args = (f"{e} (while sending {_KINDS[kind]} of step {step})",)
            raise
        self._inflight.append((kind, step, handle))
        self._timing.append((handle, time.perf_counter()))
        self._next_issue = step + max(1, min(self._every, ahead // 2))

    def _time_messages(self) -> None:
        """Note how long our completed messages took (polled, never waited for); a slower
        one counts at once, a faster one decays the estimate."""
        while self._timing and self._timing[0][0].done():
            took = time.perf_counter() - self._timing.popleft()[1]
            self._latency = max(took, 0.8 * self._latency + 0.2 * took)
            self._pace.latency = self._latency

    def _wait_oldest(self) -> None:
        kind, step, handle = self._inflight.popleft()
        t0 = time.perf_counter()
        try:
            res = handle.wait(self.timeout, what=f"the other ranks at {_KINDS[kind]} of step "
                              f"{step} (pass {self.serial}; this rank is at step "
                              f"{self._step})").tolist()
        except RankFailureError as e:
            own = self._own_error()
            self.abandon()  # the world is gone: nothing in flight will complete
            if own is not None:  # the others ended because of this rank's own error
                raise own from e
            raise
        finally:
            self.wait_s += time.perf_counter() - t0
        for field, what in ((_KIND, "kind"), (_SERIAL, "pass"), (_STEP, "step")):
            if res[field] != -res[field + 1]:
                self.abandon()
                error = ConfigMismatchError(
                    f"rank {self.backend.rank}: the ranks are not iterating this loader alike "
                    f"(at {_KINDS[kind]} of pass {self.serial}, step {step}, the ranks' {what} "
                    f"ranges over {res[field]}..{-res[field + 1]}): iterate the loader on every "
                    "rank, the same number of times (not, e.g., `if rank == 0: "
                    "next(iter(loader))`), and break out of it at the same step everywhere"
                    + ("; and call load_state_dict() on every rank with the same state (a "
                       "load on some ranks only puts them at another pass and position)"
                       if kind == _CONFIG else ""))
                self.backend.fail(str(error))  # the ranks' collectives are out of step
                raise error
        if res[_HASH] != -res[_HASH + 1]:
            self._finish()
            self._explain_config()
        self._all_have = max(self._all_have, res[_KNOWN])
        self._some_have = max(self._some_have, -res[_KNOWN + 1])
        self._first_end = min(self._first_end, res[_END_AT])
        self._last_end = -res[_END_AT + 1] if -res[_END_AT + 1] < INF else INF
        self._first_failed = min(self._first_failed, res[_FAILED_AT])
        self._every = max(1, min(_MAX_BEAT if self.num_batches is not None else _MAX_EVERY,
                                 res[_EVERY]))
        self._pace.every = self._every
        if kind == _CONFIG:
            self._ramp = self._every

    def _own_error(self) -> BaseException | None:
        """The error this rank's data raised and has not handed out yet: when the others
        are gone (Horovod shut down after they saw this rank end), it is the one to raise,
        so that the shard or URL that failed appears in this rank's log."""
        if not self._failed:
            return None
        return next((b.exc for b in self._buffer if isinstance(b, ErrorBox)), None)

    def _explain_config(self) -> None:
        """Every rank saw the mismatch in the same message: gather the configs and say
        exactly which field differs where."""
        configs = self.backend.allgather_object(
            dict(self._config or {}), timeout=self.timeout,
            what=f"the configurations of the other ranks (pass {self.serial})")
        diffs = []
        for key in sorted({k for c in configs for k in c}):
            values = [c.get(key) for c in configs]
            if any(v != values[0] for v in values):
                diffs.append(f"{key}: " + ", ".join(f"rank {r}={v!r}"
                                                    for r, v in enumerate(values)))
        raise ConfigMismatchError(
            f"rank {self.backend.rank}: the ranks are configured differently, so their data "
            "would not line up (or their collectives would hang): " + "; ".join(diffs)
            + ". Build the loader with the same arguments and dataset on every rank"
            + ("; 'resume' is the loaded position the pass starts from: call "
               "load_state_dict() on every rank with the same state (one checkpoint)"
               if any(d.startswith("resume:") for d in diffs) else "") + ".")

    # -- iteration ------------------------------------------------------------------------
    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        s = self._step
        self._time_messages()
        if s >= self._next_issue:
            if len(self._inflight) >= 2:
                self._wait_oldest()
            self._issue(_FLAGS)
        elif self._inflight and s >= self._inflight[0][1] + 2 * self._every:
            self._wait_oldest()  # heartbeat: bounded staleness, a stalled rank is noticed
        while True:
            decision = self._decide(s)
            if decision is not None:
                break
            if not self._inflight:
                self._issue(_FLAGS)
            self._wait_oldest()
        if decision == "stop":
            self._end(s)
        self._step = s + 1
        batch = self._take(s, decision)
        return batch if self._even_rows is None else self._even(batch, s)

    def _remember(self, batch: Any) -> None:
        """Keep what a padding batch is made from (a copy: the trainer may change the batch
        it gets, e.g. pop a key), only where one may be needed."""
        if self._template is None and self.uneven == "pad":
            # one row copied, never a view of the batch: a zero-row slice would keep the
            # whole batch's memory (on the GPU, for GPU-resident data) alive for the pass
            row = first_rows(batch, 1)
            self._template = empty_like(row) if self._even_rows is None else row

    def _even(self, batch: Any, s: int) -> Any:
        """``batch`` filled to ``even_rows`` rows with copies of a real row, then marked."""
        rows, want = batch_rows(batch), self._even_rows
        assert want is not None
        if rows > want:
            self._finish()
            raise ValueError(
                f"rank {self.backend.rank}: even_batches fills batches to {want} rows, but the "
                f"batch of step {s} has {rows}: the collate_fn or dataset makes more rows than "
                "batch_size; pass the batch size the batches really have")
        if rows < want:
            row = first_rows(batch, 1) if rows else self._template
            if row is None or batch_rows(row) < 1:
                self._finish()
                raise UnevenDataError(
                    f"rank {self.backend.rank}: even_batches needs a real row to fill step {s} "
                    "with, but no rank had a batch with rows")
            batch = fill_rows(batch, row, want)
        mask = torch.zeros(want, dtype=torch.bool)
        mask[rows:] = True
        return self._mark(batch, mask) if self._mark is not None else batch

    def _decide(self, s: int) -> str | None:
        """What step ``s`` is, from the completed messages (the same on every rank), or None
        when they do not tell yet."""
        if s < self._all_have:
            return "all"
        if s >= self._first_failed:
            return "failed"
        if s >= self._last_end:
            return "stop"
        if s >= self._first_end:  # some rank has no data at s
            if self.uneven == "stop":
                return "stop"
            if s < self._some_have:  # and some rank has
                return "error" if self.uneven == "error" else "pad"
        return None

    def _take(self, s: int, decision: str) -> Any:
        if decision == "failed" and not self._own_failure(s):
            self._finish()
            raise RankFailureError(
                f"rank {self.backend.rank}: another rank's data raised at step {s} of pass "
                f"{self.serial} (see that rank's error); stopping here as well")
        if decision == "error":
            self._finish()
            raise UnevenDataError(
                f"rank {self.backend.rank}: ranks ran out of data at different steps: at step "
                f"{s} some ranks have a batch and some have none (this rank "
                f"{'has one' if self._has(s) else 'has none'}). Use uneven='stop' to stop at "
                "the shortest rank, uneven='pad' to pad with empty batches, or shard the data "
                "evenly.")
        if decision == "pad":
            if self.num_batches is None and not self._template_shared:
                self._share_template()  # the first padded step is the same on every rank
            if not self._has(s):
                self.padded_steps += 1
                return self._empty_batch(s)
        return self._next_batch(s)

    def _own_failure(self, s: int) -> bool:
        return self._failed and self._ended_at == s

    def _has(self, s: int) -> bool:
        return self._ended_at is None or s < self._ended_at or self._own_failure(s)

    def _next_batch(self, s: int) -> Any:
        if self.num_batches is None:
            self._pull_ahead(s + 1)
            entry = self._buffer.popleft()
            self._held -= self._sizes.popleft()
            if isinstance(entry, ErrorBox):
                self._finish()
                entry.reraise()
            # the look-ahead grows by one batch a step, not by a period's worth in a burst at
            # each message: a fetch thread or workers behind the source then keep pace with
            # the trainer instead of being drained at once and waited for
            self._pull_ahead(min(self._pulled + 1, s + 1 + 2 * self._every))
            return entry
        try:
            batch = next(self._source) if self._source is not None else None
        except StopIteration:
            batch = None
        except BaseException:
            self._finish()
            raise
        if batch is None:
            self._finish()
            raise SampleError(
                f"rank {self.backend.rank}: expected {self.num_batches} batches but the source "
                f"ended after {s}; did the dataset's length change during the epoch, or does "
                "the sampler yield fewer indices than its len()?")
        self._remember(batch)
        return batch

    def _end(self, s: int) -> None:
        """Every rank decided to end at ``s``: confirm it with one message, then stop."""
        self._source = None
        self._buffer.clear()
        self._sizes.clear()
        self._held = 0
        if self.backend.size > 1:
            self._issue(_END)
            while self._inflight:
                self._wait_oldest()
            if self.uneven == "stop" and self.backend.rank == 0:
                self._warn_dropped(s)  # the END message brought every rank's count
        self._done = True
        raise StopIteration

    def _warn_dropped(self, s: int) -> None:
        """``uneven="stop"`` left batches of some rank untrained: say so once per loader
        (its message counter), on rank 0, at the user's line. Rank 0 sees every rank's count in the
        END message (as far as the ranks had looked ahead), so the others need not warn."""
        have = self._ended_at if self._ended_at is not None else self._pulled
        most = max(have, self._some_have, self._last_end if self._last_end < INF else 0)
        if not (most - s > 1 or (s == 0 and most > 0)):
            return
        try:  # the loader's counter: loaders of other backends may share a name
            if self._ops in _STOP_WARNED:
                return
            _STOP_WARNED.add(self._ops)
        except TypeError:  # not weakly referable (a plain itertools.count): by name
            if self.name in _STOP_WARNED_NAMES:
                return
            _STOP_WARNED_NAMES.add(self.name)
        warnings.warn(
            f"rank 0: uneven='stop' ended pass {self.serial} at step {s} because a rank ran "
            "out, and "
            f"another rank had at least {most - s} more batches (as far as the ranks had "
            "looked ahead) that no rank trains on; use uneven='pad' to read every sample, or "
            "balance the data over the ranks (more shards, sizes= for ShardedDataset). "
            "Warned once per loader, on rank 0", RuntimeWarning, stacklevel=_user_level())

    def _share_template(self) -> None:
        """A rank that never had a batch learns the batch structure from one that had: an
        empty batch of theirs, gathered (all ranks, first padded step). A message of the
        sequence goes first, so a rank that is elsewhere (one pass ahead, say) meets it, and
        every rank in it raises, instead of pairing an object gather with an allreduce."""
        self._template_shared = True
        while self._inflight:
            self._wait_oldest()
        self._issue(_TEMPLATE)
        self._wait_oldest()
        # on the CPU: a CUDA template would be unpickled onto that device index on every rank
        mine = None if self._template is None else tree_map(lambda t: t.cpu(), self._template)
        try:
            gathered = self.backend.allgather_object(
                mine, timeout=self.timeout,
                what=f"the padding template of the other ranks (pass {self.serial}, step "
                     f"{self._step})")
        except RankFailureError:
            self.abandon()
            raise
        shared = next((t for t in gathered if t is not None), None)
        if self._template is None:
            self._template = shared

    def _empty_batch(self, s: int) -> Any:
        if self._template is None and self._empty is not None:
            self._template = self._empty()
        if self._template is None:
            self._finish()
            raise UnevenDataError(
                f"rank {self.backend.rank}: uneven='pad' needs a batch to learn the batch "
                f"structure from, but no rank had one (step {s})")
        return empty_like(self._template)

    def _finish(self) -> None:
        self._done = True
        self._source = None
        self._buffer.clear()
        self._sizes.clear()
        self._held = 0

    def abandon(self) -> None:
        """Stop and forget the messages in flight without waiting (their world is gone)."""
        self._finish()
        self._inflight.clear()

    def close(self) -> None:
        """Stop without waiting: the messages in flight complete by themselves where every
        rank issued them (ranks that stopped at the same step did); where one did not, the
        next message pairs with them and says so. The backend keeps them, so that the exit
        path knows of any that never complete."""
        self._finish()
        inflight, self._inflight = self._inflight, collections.deque()
        if inflight:
            self.backend.adopt(h for _, _, h in inflight)
