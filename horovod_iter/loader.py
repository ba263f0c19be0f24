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
import itertools
import warnings
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils.data import IterableDataset, Sampler
from torch.utils.data.distributed import DistributedSampler as TorchDistributedSampler

from .backend import Backend, get_backend, init
from .errors import UnevenDataError
from .fetch import (
    FetchOptions,
    HostSource,
    host_batches,
    is_stateful,
    plan_batches,
    sampler_batches,
)
from .iterator import DistributedIterator, Pass
from .plan import steps_for
from .prefetch import resolve_device
from .sampler import DistributedSampler, is_int
from .sync import UNEVEN, MessageCounter, Uneven

__all__ = ["DistributedIterator", "DistributedLoader"]

_STATE_TYPE = "horovod_iter.DistributedLoader"
_STATE_VERSION = 2
_TYPE, _VERSION, _EPOCH, _STEPS, _WORLD = "type", "version", "epoch", "steps", "world_size"
_BATCH, _GLOBAL_BATCH, _UNEVEN = "batch_size", "global_batch_size", "uneven"
_FINISHED, _SAMPLES, _SAMPLER, _ITERATIONS = "finished", "samples", "sampler", "iterations"
_MESSAGES, _DATASET = "messages", "dataset"
_loader_ids = itertools.count()


@dataclass
class _Resume:
    """What the next ``iter()`` resumes (after a load): batches and samples already handed
    out in this epoch; our sampler keeps its own pending cursor alongside."""

    steps: int
    samples: int
    finished: bool
    dataset: Any = None  # a stateful iterable's saved state

def _positive_int(name: str, value: Any) -> int:
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


class DistributedLoader:
    """Iterate a dataset in data-parallel training or evaluation, every rank in lockstep.

    Each rank gets a disjoint slice of every epoch (map-style datasets through
    `DistributedSampler`; an ``IterableDataset`` is used as given: shard it with
    `ShardedDataset` or `shard()`). The end of data is agreed by the ranks with
    asynchronous allreduces of has-data flags that travel ahead of the steps (for map-style
    data 64 steps per collective), and batches are copied to ``device`` on a side CUDA stream
    ``prefetch`` batches ahead.

    Args:
        dataset: a map-style dataset or an ``IterableDataset``.
        batch_size: samples per rank per step. Exactly one of this and ``global_batch_size``.
        global_batch_size: samples per step over all ranks (TensorFlow's meaning); each rank
            gets ``global_batch_size / W`` and it must divide evenly.
        shuffle, seed, drop_last: as for `DistributedSampler` (map-style only);
            ``drop_last`` also drops a short last batch.
        sampler: your own sampler instead of ours (map-style only). Ours resumes in O(1) and
            on another world size; any other resumes on the same world size by skipping
            the indices already consumed (no data is read for them).
        num_workers, collate_fn, worker_init_fn: as for ``torch.utils.data.DataLoader``.
        pin_memory: pin host batches; ``None`` means "when ``device`` is CUDA".
        device: where batches go; ``None`` means the current CUDA device, or CPU.
        prefetch: batches copied to the GPU ahead of the one being consumed.
        device_transform: a function of a device batch, run on the copy's side stream (see
            `CudaPrefetcher`); in line on CPU.
        uneven: when ranks run out at different steps: ``"stop"`` (all stop at the first step
            any rank has no batch; map-style data is padded as torch does, so nothing is lost),
            ``"pad"`` (ranks that ran out yield empty batches until all are done; every sample
            exactly once - for evaluation) or ``"error"`` (raise `UnevenDataError` on
            every rank instead of padding or stopping).
        timeout: seconds a rank waits for the others before raising
            `DataTimeoutError` naming the step (``None``: no limit).
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

    def __init__(self, dataset: Any, batch_size: int | None = None, *,
                 global_batch_size: int | None = None, shuffle: bool = True,
                 seed: int | None = 0, drop_last: bool = False,
                 sampler: Sampler[Any] | None = None, num_workers: int = 0,
                 collate_fn: Callable[[list[Any]], Any] | None = None,
                 pin_memory: bool | None = None, device: Any = None, prefetch: int = 2,
                 device_transform: Callable[[Any], Any] | None = None,
                 uneven: Uneven = "stop", timeout: float | None = 300.0,
                 worker_init_fn: Callable[[int], None] | None = None,
                 backend: Backend | str | None = None, progress: bool = False,
                 log_stats: bool = True) -> None:
        self.backend = backend if isinstance(backend, Backend) else (
            init(backend) if backend is not None else get_backend())
        world = self.backend.size
        if (batch_size is None) == (global_batch_size is None):
            raise ValueError("pass exactly one of batch_size (per rank) and global_batch_size "
                             f"(over all ranks); got batch_size={batch_size!r}, "
                             f"global_batch_size={global_batch_size!r}")
        self._global_size: int | None = None
        self._batch_size = 0
        if global_batch_size is not None:
            self._global_size = _positive_int("global_batch_size", global_batch_size)
            self._per_rank(world)
        else:
            self._batch_size = _positive_int("batch_size", batch_size)
        if uneven not in UNEVEN:
            raise ValueError(f"uneven must be one of {UNEVEN}, got {uneven!r}")
        for name, value in (("prefetch", prefetch), ("num_workers", num_workers)):
            if not is_int(value) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(
                timeout, (int, float)) or not timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds or None, "
                             f"got {timeout!r}")
        for flag, value in (("drop_last", drop_last), ("progress", progress),
                            ("log_stats", log_stats), ("shuffle", shuffle)):
            if not isinstance(value, bool):
                raise TypeError(f"{flag} must be a bool, got {value!r}")
        if device_transform is not None and not callable(device_transform):
            raise TypeError(f"device_transform must be callable, got {device_transform!r}")
        if uneven == "pad" and drop_last:
            raise ValueError("uneven='pad' counts every sample exactly once and drop_last=True "
                             "drops samples; choose one")
        self.dataset = dataset
        self.is_iterable = isinstance(dataset, IterableDataset)
        self.uneven: Uneven = uneven
        self.drop_last = bool(drop_last)
        self.sampler = self._make_sampler(sampler, shuffle, seed)
        self.num_workers = int(num_workers)
        self.collate_fn = collate_fn
        self.worker_init_fn = worker_init_fn
        self.prefetch = int(prefetch)
        self.device_transform = device_transform
        self.timeout = None if timeout is None else float(timeout)
        self.progress = bool(progress)
        self.log_stats = bool(log_stats)
        self._device_arg = device
        self._pin_arg = pin_memory
        self.epoch = 0
        self._pending: _Resume | None = None  # set by a load, taken by the next iter()
        self._pass: Pass | None = None       # the latest pass of this epoch
        self._active: weakref.ReferenceType[DistributedIterator] | None = None
        #: this loader's number in the process (names its Horovod ops)
        self.id = next(_loader_ids)
        #: numbers the end-of-data messages of all its passes
        self.messages = MessageCounter()
        self._iterations = 0
        self._gathered: dict[str, Any] | None = None  # the last state_dict() (iterables)
        self._last_stats: dict[str, Any] = {}

    def _make_sampler(self, sampler: Sampler[Any] | None, shuffle: bool,
                      seed: int | None) -> Sampler[Any] | None:
        if self.is_iterable:
            if sampler is not None:
                raise ValueError("sampler is for map-style datasets; an IterableDataset decides "
                                 "its own order (shard it with horovod_iter.ShardedDataset)")
            return None
        if not hasattr(self.dataset, "__getitem__") or not hasattr(self.dataset, "__len__"):
            raise TypeError(
                f"dataset must be a map-style dataset (with __getitem__ and __len__) or a "
                f"torch IterableDataset, got {type(self.dataset).__name__}")
        b = self.backend
        if len(self.dataset) == 0:
            raise ValueError(
                f"rank {b.rank}: the dataset is empty (len 0), so there is nothing to "
                "iterate; check the path or the split it was built from")
        if sampler is None:
            return DistributedSampler(self.dataset, b.size, b.rank, shuffle=shuffle, seed=seed,
                                      drop_last=self.drop_last, pad=self.uneven == "stop",
                                      backend=b)
        if isinstance(sampler, DistributedSampler):
            if sampler.num_replicas != b.size:
                raise ValueError(
                    f"the sampler was built for num_replicas={sampler.num_replicas}, but the "
                    f"{b.name} backend has {b.size} ranks; build it with num_replicas={b.size}"
                    " (or leave sampler out and let the loader build one)")
            pads = sampler.pad and not sampler.drop_last
        elif isinstance(sampler, TorchDistributedSampler):
            pads = not sampler.drop_last and sampler.total_size > len(self.dataset)
        else:
            pads = False
        if pads and self.uneven != "stop":
            raise ValueError(
                f"uneven={self.uneven!r} promises every sample exactly once, but the sampler "
                "pads (it repeats samples to even out the ranks); pass "
                "horovod_iter.DistributedSampler(dataset, pad=False), or leave sampler out")
        return sampler

    # -- facts ------------------------------------------------------------------------
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
    def batch_size(self) -> int:
        """Samples per rank per step (``global_batch_size / W`` if that was given)."""
        return self._per_rank(self.backend.size)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.backend.size

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
        bs = self.batch_size
        if own is not None:
            plan = dataclasses.replace(own.plan(), world=b.size, rank=b.rank)
            counts = [steps_for(c, bs, self.drop_last) for c in plan.counts]
            return min(counts) if self.uneven == "stop" else max(counts)
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
        target = self.sampler if self.sampler is not None else self.dataset
        if callable(getattr(target, "set_epoch", None)):
            target.set_epoch(self.epoch)

    def config(self) -> dict[str, Any]:
        """What every rank must agree on at ``iter()`` (checked with one allreduce)."""
        own = self._own_sampler()
        return {
            "dataset": "iterable" if self.is_iterable else len(self.dataset),
            "batch_size": self.batch_size, "world_size": self.backend.size,
            "uneven": self.uneven, "drop_last": self.drop_last, "epoch": self.epoch,
            "iteration": self._iterations,
            "sampler": None if own is None else own.state_dict(),
        }

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
            if self._gathered is not None:  # the last state every rank agreed on
                self.load_state_dict(self._gathered)

    def __iter__(self) -> DistributedIterator:
        self._follow_world()
        self.close()
        self._propagate_epoch()
        resume, self._pending = self._pending, None
        bs = self.batch_size
        opts = FetchOptions(bs, self.drop_last, self.num_workers, self.collate_fn,
                            self.worker_init_fn, self.pin_memory, self.backend.rank)
        own = self._own_sampler()
        pass_ = Pass(self.epoch, bs, self.backend.size,
                     steps=resume.steps if resume else 0,
                     samples=resume.samples if resume else 0,
                     cursor=own.begin_iteration() if own is not None else None)
        if pass_.cursor is not None:
            self._check_even(pass_)
            c = pass_.cursor
            source = host_batches(self.dataset, opts, indices=plan_batches(
                c.plan, c.slot, bs, self.drop_last))
        elif self.sampler is not None:
            source = host_batches(self.dataset, opts, indices=sampler_batches(
                self.sampler, pass_.samples, bs, self.drop_last))
        elif is_stateful(self.dataset):
            source = host_batches(self.dataset, opts, world=self.backend.size,
                                  resume=resume.dataset if resume else None)
        elif resume is not None and resume.finished:
            source = _Empty()
        else:
            if pass_.steps:
                warnings.warn(
                    f"resuming an IterableDataset without state by replaying {pass_.steps} "
                    "batches (O(steps), and only exact if it yields the same stream again); "
                    "give it state_dict()/load_state_dict() or use horovod_iter.ShardedDataset",
                    stacklevel=2)
            source = host_batches(self.dataset, opts, world=self.backend.size,
                                  skip=pass_.steps)
        self._pass = pass_
        self._iterations += 1
        it = DistributedIterator(self, pass_, source, self._iterations)
        self._active = weakref.ref(it)
        return it

    def _check_even(self, pass_: Pass) -> None:
        if self.uneven != "error" or pass_.cursor is None:
            return
        c = pass_.cursor
        left = [max(0, n - c.slot) for n in c.plan.counts]
        if len(set(left)) > 1:
            raise UnevenDataError(
                f"rank {self.backend.rank}: uneven='error' and the {c.plan.remaining} samples "
                f"of this pass do not split evenly over {c.plan.world} ranks (per rank: "
                f"{left}); use uneven='stop' (pads like torch), uneven='pad' (exact, with "
                "empty batches), drop_last=True, or a dataset length divisible by the ranks")

    def close(self) -> None:
        """Close the pass in flight (its workers, streams and collectives)."""
        active = self._active() if self._active is not None else None
        self._active = None
        if active is not None:
            active.close()

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
        world = p.world if isinstance(p, Pass) else self.backend.size
        state = {
            _TYPE: _STATE_TYPE, _VERSION: _STATE_VERSION, _EPOCH: self.epoch,
            _STEPS: p.steps if p else 0, _SAMPLES: p.samples if p else 0,
            _FINISHED: p.finished if p else False, _WORLD: world,
            _BATCH: p.batch_size if isinstance(p, Pass) else self.batch_size,
            _GLOBAL_BATCH: self._global_size, _UNEVEN: self.uneven,
            _ITERATIONS: self._iterations, _MESSAGES: self.messages.value,
            _SAMPLER: None if own is None else own.state_dict(),
            _DATASET: self._dataset_state(p),
        }
        if self.is_iterable and is_stateful(self.dataset):
            self._gathered = state
        return state

    def _dataset_state(self, p: Pass | _Resume | None) -> Any:
        """A stateful iterable's position: every consumer's state as of the last batch handed
        out, gathered over the ranks (a collective: call ``state_dict()`` on every rank)."""
        if not (self.is_iterable and is_stateful(self.dataset)):
            return None
        if isinstance(p, _Resume):
            return p.dataset
        consumers = self.backend.size * max(1, self.num_workers)
        mine = dict(p.positions) if isinstance(p, Pass) else {}
        states: list[Any] = [None] * consumers
        parts = [mine] if self.backend.size == 1 else self.backend.allgather_object(mine)
        for part in parts:
            for c, st in part.items():
                if c < consumers:
                    states[c] = st
        merge = getattr(self.dataset, "merge_states", None)
        if getattr(self.dataset, "elastic_state", False) and callable(merge):
            return merge(states, consumers)
        return states

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Make the next ``iter()`` resume exactly where ``state`` was saved: it yields the
        batches an uninterrupted run would have yielded next - with any prefetch depth and
        worker count, and (map-style data with our sampler) on another world size, backend,
        ``batch_size`` or ``uneven``. Positions are in samples."""
        s = _validate(state)
        own, b = self._own_sampler(), self.backend
        same_world = s[_WORLD] == b.size
        if own is not None:
            if not isinstance(s.get(_SAMPLER), Mapping):
                raise ValueError("loader state has no sampler state; it was saved by a loader "
                                 "over an IterableDataset or with a foreign sampler")
            if (own.num_replicas, own.rank) != (b.size, b.rank):
                own.set_world(b.size, b.rank)
            own.load_state_dict(s[_SAMPLER])
        elif self.is_iterable and is_stateful(self.dataset):
            pass  # the dataset's own state says where; checked below
        elif not same_world:
            raise ValueError(
                f"loader state was saved on {s[_WORLD]} ranks; without horovod_iter's "
                f"sampler or state (an IterableDataset without state_dict(), or a foreign "
                f"sampler) it can only be resumed on {s[_WORLD]} ranks, not {b.size}; use "
                "horovod_iter.ShardedDataset or DistributedSampler to resume on any")
        elif self.sampler is None and s[_BATCH] != self.batch_size and s[_STEPS]:
            raise ValueError(
                f"loader state was saved with batch_size={s[_BATCH]} (per rank) over an "
                f"IterableDataset, which resumes by replaying whole batches; build the loader "
                f"with batch_size={s[_BATCH]} (or global_batch_size={s[_BATCH] * b.size}) to "
                "resume, and change it at the next epoch")
        self.abandon()
        self.epoch = s[_EPOCH]
        self._pass = None
        # the ranks' pass and message numbers agree again (elastic sync: all load rank 0's)
        self._iterations = max(self._iterations, s[_ITERATIONS])
        self.messages.value = max(self.messages.value, s[_MESSAGES])
        self._pending = _Resume(s[_STEPS], s[_SAMPLES], s[_FINISHED],
                                self._check_dataset_state(s.get(_DATASET)))

    def _check_dataset_state(self, saved: Any) -> Any:
        if saved is None or not (self.is_iterable and is_stateful(self.dataset)):
            return None
        if getattr(self.dataset, "elastic_state", False):
            load = self.dataset.load_state_dict
            load(saved)  # validates; the loaded copy goes to the workers at the next iter()
            load(None)
            return saved
        consumers = self.backend.size * max(1, self.num_workers)
        if not isinstance(saved, list) or len(saved) != consumers:
            n = len(saved) if isinstance(saved, list) else "?"
            raise ValueError(
                f"loader state holds the dataset state of {n} consumers (ranks x workers), "
                f"but this run has {consumers}; a stateful IterableDataset resumes with the "
                "same world size and num_workers (horovod_iter.ShardedDataset resumes on any)")
        return saved

    def _ended(self, it: DistributedIterator) -> None:
        """Called by a pass when it closes: keep its figures."""
        self._last_stats = it.stats()


class _Empty(HostSource):
    """The rest of a pass that was saved finished: nothing."""

    num_batches = 0

    def __next__(self) -> Any:
        raise StopIteration


def _validate(state: Any) -> dict[str, Any]:
    """Check a loader state's form; return a normalised copy or raise naming the fault."""
    if not isinstance(state, Mapping):
        raise TypeError(f"loader state must be a dict from state_dict(), got "
                        f"{type(state).__name__}")
    if state.get(_TYPE) != _STATE_TYPE:
        raise ValueError(f"not a horovod_iter loader state (type={state.get(_TYPE)!r}); "
                         "pass the dict returned by DistributedLoader.state_dict()")
    if state.get(_VERSION) not in (1, _STATE_VERSION):
        raise ValueError(f"loader state version {state.get(_VERSION)!r} is not supported "
                         f"(expected 1 or {_STATE_VERSION})")
    out = dict(state)
    out.setdefault(_ITERATIONS, 0)
    out.setdefault(_MESSAGES, 0)
    out.setdefault(_SAMPLES, out.get(_STEPS, 0) * out.get(_BATCH, 0)
                   if is_int(out.get(_STEPS)) and is_int(out.get(_BATCH)) else 0)
    for key in (_EPOCH, _STEPS, _WORLD, _BATCH, _ITERATIONS, _MESSAGES, _SAMPLES):
        if not is_int(out.get(key)) or out[key] < 0:
            raise ValueError(f"invalid loader state: {key!r} must be an int >= 0, "
                             f"got {out.get(key)!r}")
        out[key] = int(out[key])
    if not isinstance(out.get(_FINISHED), bool):
        raise ValueError(f"invalid loader state: 'finished' must be a bool, "
                         f"got {out.get(_FINISHED)!r}")
    return out
