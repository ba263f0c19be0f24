"""The host stage on a thread of ours: the next batches are fetched, collated and pinned while
the trainer steps, so that a loop that syncs every step (``loss.item()``, AMP's
``GradScaler``) costs the larger of fetch and step instead of their sum.

`ThreadedSource` wraps any `HostSource` (``num_workers=0``: the fetch would otherwise run in
the trainer's thread inside ``next()``). It gains where the fetch and the step both release the
GIL (``index_select`` gathers of a ``TensorDataset``, numpy and C decoders, file reads, torch
ops); per-sample Python code holds the GIL and gains nothing: DataLoader workers (processes)
are the tool there.

It changes nothing the trainer sees:

* the batches, their order and ``num_batches`` are the wrapped source's;
* the wrapped source's ``positions`` (iterable data: one per batch, appended when it yields)
  reach this source's ``positions`` when their batch is handed over, in order, never ahead of
  it (a batch made ahead sits with its positions in the queue): ``state_dict()`` stays exact;
* an exception of the wrapped source is raised at its own step, after the batches before it;
  the source ends there;
* ``close()`` never waits on other ranks: it stops the thread between batches and joins it for
  at most ``join_timeout`` seconds; a thread still inside a slow ``next()`` then closes the
  wrapped source itself when that returns (the wrapped source is never closed while its
  ``next()`` runs on another thread). A source dropped without ``close()`` stops its thread
  too (a finalizer: the thread never refers to it).

The dataset's code runs on that thread: the trainer thread's thread-local settings (grad mode,
autocast, the current CUDA stream) do not apply there (a batch with CUDA tensors is handed over
only once the thread's own stream has finished it), and draws from the global random
generators (``torch.rand``, ``numpy.random``, ``random``) interleave with the trainer's in an
order that varies from run to run; give the dataset a generator of its own for reproducible
augmentations.
"""
from __future__ import annotations

import collections
import threading
import weakref
from typing import Any

import torch

from ._tree import ErrorBox, tree_leaves
from .fetch import HostSource

__all__ = ["ThreadedSource"]

#: a stop requested by garbage collection (no notify: the finalizer takes no lock) is seen
#: within this many seconds by a thread waiting for room
_POLL_S = 0.1
#: how long close() waits for the thread to finish the batch in hand
_JOIN_S = 1.0


class _End:
    """Marks the end of the wrapped source's batches in the queue."""


_END = _End()


class _Channel:
    """What the thread and its `ThreadedSource` share. The thread refers to this, never to
    the `ThreadedSource`, so that a source dropped without ``close()`` is collected and its
    finalizer stops the thread."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        # reentrant: a finalizer run by garbage collection inside a locked block of the same
        # thread must not deadlock (the finalizer takes no lock today; this keeps it safe)
        self.cond = threading.Condition(threading.RLock())
        #: (a batch, `_END` or an `ErrorBox`; the wrapped source's positions for it)
        self.items: collections.deque[tuple[Any, list[Any]]] = collections.deque()
        self.stopped = False
        self.exited = False
        #: close() left the wrapped source's close() to the thread (it was inside next())
        self.close_source = False


def _stop(channel: _Channel) -> None:
    """The finalizer of a `ThreadedSource` dropped without ``close()``: runs on whatever
    thread collects it, so it only sets a flag (the thread sees it within `_POLL_S`)."""
    channel.stopped = True


def _drain(positions: collections.deque[Any] | None) -> list[Any]:
    out: list[Any] = []
    while positions:
        out.append(positions.popleft())
    return out


def _produce(ch: _Channel, source: HostSource, device: torch.device | None) -> None:
    """The thread: make batches ahead, at most ``ch.depth``, until the end, an error or a
    stop. It holds no batch while it waits, so buffer reuse (`gather._reusable`) sees a
    batch free as soon as the trainer and the queue let go of it."""
    try:
        if device is not None:  # pinned memory and CUDA work on the trainer's device
            torch.cuda.set_device(device)
        positions = source.positions
        while True:
            with ch.cond:
                while len(ch.items) >= ch.depth and not ch.stopped:
                    ch.cond.wait(_POLL_S)
                if ch.stopped:
                    return
            item: Any
            try:
                item = next(source)
                if device is not None and any(t.is_cuda for t in tree_leaves(item)):
                    # a GPU-resident dataset wrote the batch on this thread's stream, which the
                    # trainer's stream and our side stream know nothing of: finish that work
                    # before the batch is handed over (this thread waits, not the trainer)
                    torch.cuda.current_stream(device).synchronize()
            except StopIteration:
                item = _END
            except BaseException as e:  # delivered at its step, after the batches before it
                item = ErrorBox(e)
            marks = _drain(positions)
            with ch.cond:
                if ch.stopped:
                    return
                ch.items.append((item, marks))
                ch.cond.notify_all()
            if item is _END or isinstance(item, ErrorBox):
                return
            del item, marks  # the queue holds the batch now, not this frame
    except BaseException as e:  # e.g. set_device failed: the trainer's next batch raises it
        with ch.cond:
            if not ch.stopped:
                ch.items.append((ErrorBox(e), []))
                ch.cond.notify_all()
    finally:
        with ch.cond:
            ch.exited = True
            closing = ch.close_source
            if ch.stopped:
                ch.items.clear()
            ch.cond.notify_all()
        if closing:
            source.close()


class ThreadedSource(HostSource):
    """``source``'s batches, made up to ``depth`` ahead of the consumer on a thread of ours.

    Args:
        source: the host batches of one pass (any `HostSource`); owned from now on: closed
            by ``close()``.
        depth: batches made ahead at most (the queue's bound), >= 1.
        device: a CUDA device that the thread makes current (torch's pin-memory thread does
            the same), so that pinning or CUDA work in the dataset lands on the trainer's
            device; ``None``: the caller's current CUDA device if CUDA is initialised.
        join_timeout: seconds ``close()`` waits for the thread to finish the batch in hand.

    Raises:
        ValueError: ``depth`` is not an int >= 1.
    """

    def __init__(self, source: HostSource, depth: int = 2, *,
                 device: torch.device | None = None, join_timeout: float = _JOIN_S) -> None:
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
            raise ValueError(f"depth must be an int >= 1 (batches made ahead), got {depth!r}")
        if device is not None and torch.device(device).type != "cuda":
            device = None
        elif device is None and torch.cuda.is_available() and torch.cuda.is_initialized():
            device = torch.device("cuda", torch.cuda.current_device())
        self.num_batches = source.num_batches
        self.positions = None if source.positions is None else collections.deque()
        self.depth = depth
        self._join_s = join_timeout
        self._source: HostSource | None = source
        self._ch: _Channel | None = _Channel(depth)
        self._thread: threading.Thread | None = threading.Thread(
            target=_produce, args=(self._ch, source, device), daemon=True,
            name="horovod_iter-fetch")
        self._finalizer = weakref.finalize(self, _stop, self._ch)
        self._thread.start()

    def __next__(self) -> Any:
        ch = self._ch
        if ch is None:
            raise StopIteration
        with ch.cond:
            while not ch.items:
                if ch.exited:  # ended without a word (cannot happen unless stopped)
                    raise StopIteration
                ch.cond.wait(_POLL_S)
            item, marks = ch.items.popleft()
            ch.cond.notify_all()
        if self.positions is not None:
            self.positions.extend(marks)
        if item is _END:
            self.close()
            raise StopIteration
        if isinstance(item, ErrorBox):
            self.close()
            item.reraise()
        return item

    def close(self) -> None:
        """Stop the thread (between batches), drop the batches made ahead and close the
        wrapped source: here once the thread has exited, else by the thread when its
        ``next()`` returns. Waits ``join_timeout`` seconds at most; idempotent."""
        ch, thread, source = self._ch, self._thread, self._source
        self._ch = self._thread = self._source = None
        if ch is None or thread is None or source is None:
            return
        self._finalizer.detach()
        with ch.cond:
            ch.stopped = True
            ch.items.clear()
            ch.cond.notify_all()
        if thread is not threading.current_thread():
            thread.join(self._join_s)
        with ch.cond:
            if not ch.exited:
                ch.close_source = True  # still inside next(): the thread closes it after
                return
        source.close()
