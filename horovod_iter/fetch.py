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

`split_stream` splits one plain stream by rank and DataLoader worker (``shard`` is its
deprecated old name).
"""
from __future__ import annotations

import collections
import ctypes
import itertools
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import sys
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler, get_worker_info
from torch.utils.data import _utils as torch_data_utils
from torch.utils.data._utils.collate import default_collate

from ._deprecation import warn_deprecated
from ._tree import ErrorBox
from .backend import get_backend
from .errors import DataTimeoutError, SampleError, ShardingError
from .gather import BatchFetcher
from .plan import EpochPlan, steps_for

__all__ = ["FetchOptions", "HostSource", "host_batches", "is_stateful", "plan_batches",
           "shard", "split_stream"]


def split_stream(iterable: Iterable[Any], rank: int | None = None,
                 num_replicas: int | None = None) -> Iterator[Any]:
    """Yield this rank's (and this DataLoader worker's) share of one stream: element ``i``
    goes to the consumer ``i mod (W * workers)``. Every consumer reads the whole stream and
    keeps its share, so it suits a stream that cannot be split otherwise; for data in many
    files use `ShardedDataset`, which reads each file once over the world.

    Use it inside an ``IterableDataset``::

        class Lines(IterableDataset):
            def __iter__(self):
                return horovod_iter.split_stream(open(path))

    ``rank``/``num_replicas`` default to the backend's; the worker split comes from
    ``torch.utils.data.get_worker_info()``.
    """
    if type(iterable).__module__.split(".")[0] == "webdataset":
        raise ShardingError(
            f"horovod_iter.split_stream() over a WebDataset pipeline "
            f"({type(iterable).__name__}): WebDataset splits its shards by node and DataLoader "
            "worker itself, and split_stream() would split its samples again, losing most of "
            "the data. Use horovod_iter.ShardedDataset(urls, "
            "horovod_iter.integrations.webdataset.reader(...)) (each shard read once, "
            "resumable on any world), or WebDataset's own splitting without split_stream()")
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


def shard(iterable: Iterable[Any], rank: int | None = None,
          num_replicas: int | None = None) -> Iterator[Any]:
    """Deprecated name of `split_stream` (it never sharded: every consumer reads the whole
    stream); removed in horovod_iter 0.4."""
    warn_deprecated("horovod_iter.shard()", "horovod_iter.split_stream(), the same function")
    return split_stream(iterable, rank, num_replicas)


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
    #: write CPU batches into reused buffers (each valid until the next step)
    reuse_cpu_buffers: bool = False


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
    message); iterable batches arrive with their consumer's position.

    A worker that dies (killed, OOM-killed, crashed) is this rank's `SampleError` naming the
    worker, at its next batch (`_WorkerWatch`); on a timeout or a death the workers are killed
    at once (`_stop_now`) instead of being joined for 5 s each."""

    def __init__(self, dl: DataLoader[Any], count: int | None, rank: int, skip: int = 0,
                 tagged: bool = False) -> None:
        self._persistent = dl.persistent_workers
        self._timeout = dl.timeout
        self.num_batches = count
        self._rank = rank
        self._step = 0
        self._tagged = tagged
        self.positions = collections.deque() if tagged else None
        # persistent workers: the loader keeps them between passes; one that died since the
        # last pass is this pass's error, and the next pass starts new workers
        self._loader = dl if self._persistent else None
        self._watch: _WorkerWatch | None = None
        self._it: Any = getattr(dl, "_iterator", None) if self._persistent else None
        death = _death_of(self._it) if self._it is not None else None
        if death is not None:
            raise self._fail(_WorkerDied(), death)
        try:
            self._it = iter(dl)
        except RuntimeError as e:  # persistent workers' restart: a dead or stuck worker
            if not (_from_workers(e) or "DataLoader timed out" in str(e)):
                raise
            self._it = getattr(dl, "_iterator", None)
            raise self._fail(e, _death_of(self._it)) from e
        self._watch = _WorkerWatch.of(self._it)
        for _ in range(skip):  # an iterable without state cannot seek: replay (O(steps))
            if next(self, None) is None:
                break
        if self.positions is not None:
            self.positions.clear()
        self._step = 0

    def __next__(self) -> Any:
        if self._it is None:
            raise StopIteration
        watch = self._watch
        if watch is not None and watch.death is not None:  # died while the trainer stepped
            raise self._fail(_WorkerDied(), watch.death)
        try:
            if watch is not None:  # a death now wakes this wait (`_on_sigchld`)
                watch.waiting = threading.get_ident()
            try:
                batch = next(self._it)
            finally:
                if watch is not None:
                    watch.waiting = None
        except StopIteration:
            self.close()
            raise
        except Exception as e:
            raise self._fail(e, _death_behind(self._it, e)) from e
        if isinstance(batch, ErrorBox):
            self.close()
            batch.reraise()
        self._step += 1
        if self._tagged:
            batch, position = batch
            self.positions.append(position)  # type: ignore[union-attr]
        return batch

    def _fail(self, e: Exception, death: _Death | None) -> Exception:
        """Our error for ``e`` (or for the worker's ``death``), the workers stopped: at once
        (killed) when one died or timed out, as torch does otherwise."""
        error = self._error(e, death)
        if death is not None or isinstance(error, DataTimeoutError):
            it, self._it = self._it, None
            _stop_now(it)
            if self._loader is not None and getattr(self._loader, "_iterator", None) is it:
                self._loader._iterator = None  # the next pass starts new workers
        else:
            self.close()
        return error

    def _error(self, e: Exception, death: _Death | None = None) -> Exception:
        """Our error for what came out of torch's DataLoader at this step."""
        text = str(e)
        where = f"rank {self._rank}, step {self._step} of this pass"
        if death is not None:
            return SampleError(f"{where}: {death.describe()}")
        if isinstance(e, RuntimeError) and "DataLoader timed out" in text:
            return DataTimeoutError(
                f"{where}: no batch from this rank's DataLoader workers within "
                f"{self._timeout} s (the loader's timeout): a worker is stuck in the dataset's "
                "code or deadlocked (e.g. at fork, by a lock another thread held); test with "
                "num_workers=0, or raise `timeout` if a batch is just slow")
        if isinstance(e, _WorkerDied) or _from_workers(e):
            return SampleError(f"{where}: a DataLoader worker of this rank died: {text}")
        caught = _worker_cause(text)
        if caught is not None:  # the cause first, as with 0 workers; torch's text after it
            worker, cause, trace = caught
            return SampleError(f"{where}: the dataset raised in DataLoader worker {worker}: "
                               f"{cause}\n\nThe worker's traceback:\n{trace}")
        return SampleError(f"{where}: the dataset raised: {type(e).__name__}: {e}")

    def close(self) -> None:
        it, self._it = self._it, None
        if it is None:
            return
        if _death_of(it) is not None:  # a dead worker may hold a lock torch's shutdown takes
            _stop_now(it)
            if self._loader is not None and getattr(self._loader, "_iterator", None) is it:
                self._loader._iterator = None
            return
        if self._persistent:  # the loader's to stop
            return
        shutdown = getattr(it, "_shutdown_workers", None)
        if callable(shutdown):
            shutdown()
        _WorkerWatch.forget(it)


# -- DataLoader worker processes: a death is our error, a stop on an error path is at once --

def _from_workers(e: BaseException) -> bool:
    """Whether ``e`` is torch's error for a dead DataLoader worker."""
    text = str(e)
    return isinstance(e, RuntimeError) and "DataLoader worker" in text and (
        "exited unexpectedly" in text or "killed by signal" in text)


def _worker_cause(text: str) -> tuple[str, str, str] | None:
    """(worker, "Type: message", traceback) of torch's text for an exception a DataLoader
    worker raised (a line "Caught Type in DataLoader worker process N.", then "Original "
    and the traceback, whose cause is at its end), or None for another text."""
    head = "Caught "
    first, _, trace = text.partition("\n")
    marker = " in DataLoader worker process "
    if not first.startswith(head) or marker not in first or not trace.startswith("Original "):
        return None
    worker = first.rsplit(marker, 1)[1].rstrip(".")
    trace = trace[len("Original "):].rstrip("\n")
    lines = trace.split("\n")
    last = max((i for i, line in enumerate(lines) if line.startswith("Traceback (")), default=0)
    start = next((i for i in range(last + 1, len(lines))
                  if lines[i] and not lines[i].startswith(" ")), None)
    if start is None:
        return None
    cause = "\n".join(lines[start:])
    name, sep, rest = cause.partition(": ")
    if sep and "." in name and " " not in name:  # "horovod_iter.errors.SampleError": the name
        cause = f"{name.rsplit('.', 1)[1]}: {rest}"
    return worker, cause, trace


class _WorkerDied(Exception):
    """Raised by `_on_sigchld` into a wait for a batch whose worker died, to end the wait."""


@dataclass(frozen=True)
class _Death:
    """A DataLoader worker that ended on its own: by a signal (``code < 0``) or an exit
    status (``code > 0``), as ``multiprocessing.Process.exitcode`` says."""

    worker: int
    pid: int
    code: int

    def describe(self) -> str:
        who = f"DataLoader worker {self.worker} (pid {self.pid}) of this rank"
        if self.code > 0:
            return (f"{who} exited with status {self.code} (native code crashed, or the "
                    "dataset called exit); the batches it held are lost. Run with "
                    "num_workers=0 to see the dataset's own error")
        try:
            name = signal.Signals(-self.code).name
        except ValueError:
            name = str(-self.code)
        why = {"SIGKILL": "the kernel's out-of-memory killer sends it when the host runs out of "
                          "memory (see `dmesg`; lower num_workers, prefetch_factor or the "
                          "batch size), or something killed the worker",
               "SIGBUS": "usually shared memory (/dev/shm) is too small for the batches: "
                         "enlarge it (docker: --shm-size)",
               "SIGSEGV": "native code crashed in the dataset or collate_fn; run with "
                          "num_workers=0 to see where"}.get(name, "something signalled it")
        return (f"{who} was killed by signal {name}: {why}. The batches it held are lost")


def _death_of(it: Any) -> _Death | None:
    """The first worker of torch DataLoader iterator ``it`` that ended on its own (a recorded
    death first: the process may be reaped and its pid reused by now)."""
    watch = _WorkerWatch.get(it)
    if watch is not None and watch.death is not None:
        return watch.death
    if getattr(it, "_shutdown", True):  # no workers, or stopped by us or torch
        return None
    for worker, w in enumerate(getattr(it, "_workers", ())):
        code = w.exitcode  # reaps through multiprocessing, which keeps the status
        if code:  # None: running; 0: ended as asked (an iterable worker's data was done)
            return _Death(worker, w.pid, code)
    return None


#: how long an error that a worker's death may cause waits for that death to show
_DEATH_GRACE_S = 5.0


def _death_behind(it: Any, e: Exception) -> _Death | None:
    """The worker death behind ``e``, if any. A worker killed after it sent a batch makes the
    batch unreadable (its tensors' file descriptors come from the dead process:
    ``ConnectionResetError``) before the process can be reaped: the kernel closes a dying
    process's files (its sockets, its sentinel pipe) before it becomes a zombie, and on a
    loaded host that takes a while (the 2 s this waited before were once too short in 100
    killed workers). Such an error waits at most `_DEATH_GRACE_S` for a worker's exit status
    to show; an error with no death behind it pays that once, on its way to failing the job."""
    death = _death_of(it)
    text = str(e)
    foreign = isinstance(e, (OSError, EOFError, pickle.UnpicklingError)) and \
        "in DataLoader worker process" not in text  # not the dataset's, re-raised by torch
    if death is not None or not (
            foreign or _from_workers(e) or "thread exited unexpectedly" in text):
        return death
    deadline = time.monotonic() + _DEATH_GRACE_S
    while death is None and not getattr(it, "_shutdown", True):
        left = deadline - time.monotonic()
        running = [w for w in getattr(it, "_workers", ()) if w.exitcode is None]
        if left <= 0 or not running:
            break
        ready = multiprocessing.connection.wait([w.sentinel for w in running], left)
        if ready:  # its files are closed; its exit status comes a moment later
            time.sleep(0.005)
        death = _death_of(it)
    return death


class _WorkerWatch:
    """Watches the workers of one torch DataLoader iterator for a death (a kill, the OOM
    killer, a crash), from our SIGCHLD handler, so that a death is this rank's `SampleError`.

    torch's own SIGCHLD handler raises its ``RuntimeError`` wherever the main thread happens to
    be, nearly always inside the trainer's step. Ours records the death and takes the
    worker's pids from torch's handler; it raises only into a wait for a batch of this
    iterator in the same thread (``waiting``), and otherwise the next batch raises. Persistent
    workers keep their watch between passes."""

    _all: ClassVar[dict[int, _WorkerWatch]] = {}

    def __init__(self, it: Any) -> None:
        self.iterator = weakref.ref(it)
        self.workers = list(it._workers)
        self.owner = os.getpid()
        self.death: _Death | None = None
        #: the thread waiting for a batch of this iterator, if any
        self.waiting: int | None = None

    @classmethod
    def of(cls, it: Any) -> _WorkerWatch | None:
        """The watch of ``it`` (made and registered on first use); None without workers."""
        if not getattr(it, "_workers", None):
            return None
        watch = cls.get(it)
        if watch is None:
            for key, other in list(cls._all.items()):  # iterators gone since
                if other.iterator() is None:
                    cls._all.pop(key, None)
            watch = cls._all[id(it)] = cls(it)
        _install_sigchld()
        return watch

    @classmethod
    def get(cls, it: Any) -> _WorkerWatch | None:
        watch = cls._all.get(id(it))
        return watch if watch is not None and watch.iterator() is it else None

    @classmethod
    def forget(cls, it: Any) -> None:
        if cls.get(it) is not None:
            cls._all.pop(id(it), None)

    def check(self) -> bool:
        """Record a death of one of the workers; True if a wait of this thread must end."""
        it = self.iterator()
        if it is None or self.owner != os.getpid() or getattr(it, "_shutdown", True):
            return False
        if self.death is None:
            self.death = _death_of(it)
            if self.death is None:
                return False
            _forget_pids(it)  # torch's handler would raise it in the trainer's step
        return self.waiting == threading.get_ident()


def _forget_pids(it: Any) -> None:
    """Take ``it``'s workers out of torch's SIGCHLD handler, which raises for any of them that
    died: ours reports it (and ``_stop_now``'s kills are no failure)."""
    if getattr(it, "_worker_pids_set", False):
        torch_data_utils.signal_handling._remove_worker_pids(id(it))
        it._worker_pids_set = False


_previous_sigchld: Any = None
_in_sigchld = False


def _on_sigchld(signum: int, frame: Any) -> None:
    """SIGCHLD: record our workers' deaths, then torch's handler for any other loader."""
    global _in_sigchld
    if _in_sigchld:  # a handler of someone else's that calls ours back
        return
    _in_sigchld = True
    try:
        wake = False
        for watch in list(_WorkerWatch._all.values()):
            wake = watch.check() or wake
        if callable(_previous_sigchld):
            _previous_sigchld(signum, frame)
    finally:
        _in_sigchld = False
    if wake:
        raise _WorkerDied("a DataLoader worker of this rank died")


def _install_sigchld() -> None:
    """Put `_on_sigchld` in front of torch's handler (Python runs signal handlers in the main
    thread only, and only it may set them)."""
    global _previous_sigchld
    if threading.current_thread() is not threading.main_thread():
        return
    current = signal.getsignal(signal.SIGCHLD)
    if current is _on_sigchld:
        return
    _previous_sigchld = current if callable(current) else None
    signal.signal(signal.SIGCHLD, _on_sigchld)


class _Done:
    """Stands in for a torch DataLoader iterator's shared "workers done" event once its workers
    are killed: one may have died holding the event's lock, on which torch's shutdown would
    then block for ever."""

    def set(self) -> None:
        """Nothing is left to tell."""

    def is_set(self) -> bool:
        return True


def _stop_now(it: Any) -> None:
    """Stop torch DataLoader iterator ``it``'s workers at once, on an error path: kill them,
    then torch's own shutdown (queues, pin-memory thread) over dead processes. torch joins
    each live worker for 5 s before it terminates it: a stuck worker would delay our error."""
    _WorkerWatch.forget(it)
    workers = list(getattr(it, "_workers", ()))
    if not workers or getattr(it, "_shutdown", True):
        shutdown = getattr(it, "_shutdown_workers", None)
        if callable(shutdown):
            shutdown()
        return
    _forget_pids(it)
    pin = getattr(it, "_pin_memory_thread", None)
    if pin is not None:  # before the kills: a worker killed in a write would block its wake-up
        it._pin_memory_thread_done_event.set()
        it._worker_result_queue.put((None, None))
        pin.join(timeout=torch_data_utils.MP_STATUS_CHECK_INTERVAL)
    for w in workers:
        if w.exitcode is None:
            w.kill()
    for w in workers:
        w.join(timeout=torch_data_utils.MP_STATUS_CHECK_INTERVAL)
    it._workers_done_event = _Done()
    it._shutdown_workers()


# -- DataLoader worker processes: they die with their rank ------------------------------------

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
    to hold the launcher's output open; then the user's ``worker_init_fn``.

    The signal is armed after the fork: a rank that died before that is never signalled. So a
    worker whose parent is no longer ``parent`` (the rank's pid, recorded before the fork) by
    then exits at once; and again after the user's ``worker_init_fn``, after which torch's
    watchdog takes the parent it sees as the one to outlive (right where ``prctl`` is
    missing). ``parent`` is None where the rank is not the workers' parent (a forkserver):
    nothing to compare."""

    def __init__(self, user: Callable[[int], None] | None, parent: int | None = None) -> None:
        self.user = user
        self.parent = parent

    def __call__(self, worker_id: int) -> None:
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        self._exit_if_orphaned()
        if self.user is not None:
            self.user(worker_id)
            self._exit_if_orphaned()

    def _exit_if_orphaned(self) -> None:
        if self.parent is not None and os.getppid() != self.parent:
            os._exit(1)  # nobody is left to report to


def _direct_parent(context: Any) -> int | None:
    """This process's pid if DataLoader workers started with ``context`` are its children
    ('fork', 'spawn'); None when a forkserver starts them."""
    if context is None:
        method = (multiprocessing.get_start_method(allow_none=True)
                  or multiprocessing.get_all_start_methods()[0])  # the default, as documented
    elif isinstance(context, str):
        method = context
    else:
        method = context.get_start_method()
    return os.getpid() if method in ("fork", "spawn") else None


def _loader_kwargs(opts: FetchOptions) -> dict[str, Any]:
    """DataLoader arguments shared by both worker paths."""
    workers = opts.num_workers
    extra: dict[str, Any] = {}
    if workers:
        extra = dict(multiprocessing_context=opts.multiprocessing_context,
                     prefetch_factor=opts.prefetch_factor, in_order=opts.in_order)
    return dict(num_workers=workers, pin_memory=opts.pin,
                worker_init_fn=_WorkerInit(opts.worker_init_fn,
                                           _direct_parent(opts.multiprocessing_context))
                if workers else opts.worker_init_fn, generator=opts.generator,
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
            fetcher = BatchFetcher(dataset, opts.collate_fn, opts.pin, opts.rank,
                                   reuse=opts.reuse_cpu_buffers)
            return _InlineSource(arrays, count, fetcher)
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
    kwargs = _loader_kwargs(opts)
    if not opts.num_workers:  # torch's pin_memory() refuses CUDA leaves: our prefetcher pins
        kwargs["pin_memory"] = False  # the CPU ones of each batch itself
    batches = DataLoader(_IterableBatches(dataset, opts, resume), batch_size=None,
                         collate_fn=_whole_batch, **kwargs)
    return _WorkerSource(batches, None, opts.rank, skip, tagged=True)
