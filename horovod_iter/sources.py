"""One `Source` per data kind, chosen once when a `DistributedLoader` is built (as torch's
``_DatasetKind`` picks a fetcher once), so that the loader never asks what kind of data it
holds again.

Every Source answers the same five questions for a world (`Deal`):

* ``num_batches``: the loader's ``len()``, the steps every rank takes together;
* ``open``: this rank's host batches for one pass, from the start or a loaded position;
* ``state`` / ``load``: its part of the loader's state dict, and the check of a saved one;
* ``fingerprint``: everything that decides which sample lands where and that a saved state
  depends on (the data kind, lengths, seeds, weights, shards...), JSON-able and independent
  of the world size; ``config`` adds what every rank must also agree on within one world.

The loader carries the fingerprint in its state dict, refuses a state made for another one,
and checks at every pass's start that all ranks agree on ``config`` and on the position
they start from (`sync.EndOfDataSync`'s first message).

The kinds: our `DistributedSampler` (map-style, elastic), `LengthGroupedBatchSampler`
(elastic), a foreign sampler or batch sampler (resumes by skipping indices, same world),
stateful iterable data (``ShardedDataset``: elastic; any torchdata ``Stateful``: same world),
the canonical layout of streams (a state that is a count), and plain iterable data
(resumes by replaying batches).
"""
from __future__ import annotations

import functools
import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np
from torch.utils.data import DataLoader

from .backend import DEFAULT_TIMEOUT
from .batching import LengthGroupedBatchSampler, batch_sampler_batches
from .errors import ShardingError
from .fetch import (
    FetchOptions,
    HostSource,
    host_batches,
    plan_batches,
    sampler_batches,
)
from .gather import BatchFetcher
from .iterator import Pass
from .loader_config import check_even
from .loader_state import (
    BATCH,
    BATCH_SAMPLER,
    DATASET,
    SAMPLER,
    STEPS,
    WORLD,
    Resume,
    check_dataset_state,
)
from .mixing import MixedDataset, MixedStream
from .plan import steps_for
from .protocols import CanonicalLayout, ElasticState, Fingerprinted, Stateful
from .sampler import Cursor, DistributedSampler
from .sharded import ShardedDataset

__all__ = ["Collect", "Deal", "Source", "choose_source"]

#: gathers every rank's consumer positions (and the base they resumed from) into the
#: dataset's state: a collective the loader provides
Collect = Callable[[Mapping[int, Any], Any], Any]


@dataclass(frozen=True)
class Deal:
    """The world and batching a pass is laid out for (a small value the loader hands down)."""

    world: int
    rank: int
    #: samples per rank per step (0: a batch sampler decides the batches)
    batch: int
    drop_last: bool
    uneven: str
    workers: int
    in_order: bool = True

    @property
    def consumers(self) -> int:
        """Readers of iterable data: ranks x DataLoader workers (at least one per rank)."""
        return self.world * max(1, self.workers)

    def steps(self, counts: list[int]) -> int:
        """``len()`` from every rank's batch count: all ranks stop at the shortest under
        ``stop``; ``pad`` and ``error`` go on to the longest."""
        return min(counts) if self.uneven == "stop" else max(counts)


def _dataset_id(dataset: Any) -> Any:
    """A dataset's own fingerprint (`Fingerprinted`: `MixedDataset`'s weights and lengths,
    `ShardedDataset`'s shard list), else ``None``."""
    return dataset.fingerprint() if isinstance(dataset, Fingerprinted) else None


class Source(ABC):
    """What the loader may ask of one data kind (see the module docstring)."""

    #: the data kind, saved in the state's fingerprint
    kind: ClassVar[str]

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    # -- epoch and world ------------------------------------------------------------------
    def epoch_target(self) -> Any:
        """The object whose ``set_epoch`` selects the epoch's order."""
        return self.dataset

    def set_epoch(self, epoch: int) -> None:
        target = self.epoch_target()
        if callable(getattr(target, "set_epoch", None)):
            target.set_epoch(epoch)
        if isinstance(self.dataset, MixedDataset) and target is not self.dataset:
            self.dataset.set_epoch(epoch)  # its draws depend on the epoch too

    def epoch_set_outside(self) -> int | None:
        """An epoch a framework set on the object the loader exposes (Lightning sets
        ``loader.sampler``'s), if it differs from what the loader gave it."""
        return None

    def bound_reads(self, timeout: float | None) -> None:  # noqa: B027 - optional hook
        """Bound the data's own reads (shard downloads) by the loader's ``timeout``."""

    def world_moved(self, deal: Deal) -> bool:
        """The backend's world is not the one this source laid its epoch out for (a
        Horovod elastic reset that skipped the state sync)."""
        return False

    def move_world(self, deal: Deal) -> None:  # noqa: B027 - optional hook
        """Lay out for ``deal``'s world (only called when `world_moved`)."""

    # -- the questions --------------------------------------------------------------------
    @abstractmethod
    def num_batches(self, deal: Deal) -> int:
        """Batches of a full pass of the current epoch on this rank (the loader's len())."""

    @abstractmethod
    def open(self, deal: Deal, opts: FetchOptions, pass_: Pass, resume: Resume | None,
             workers: dict[Any, DataLoader[Any]]) -> HostSource:
        """This rank's host batches of one pass (records its start in ``pass_``)."""

    def state(self, p: Pass | Resume | None, deal: Deal,
              collect: Collect) -> dict[str, Any]:
        """This kind's entries of the loader's state dict (``SAMPLER``, ``DATASET``,
        ``BATCH_SAMPLER``) at position ``p``; ``collect(positions, base)`` gathers every
        rank's consumer positions into the dataset's state (a collective)."""
        return {}

    def load(self, s: Mapping[str, Any], deal: Deal) -> Any:
        """Check a saved loader state against this source and load its parts; returns what
        the dataset resumes from (stateful iterables), else None."""
        if s[WORLD] != deal.world:
            raise ValueError(
                f"loader state was saved on {s[WORLD]} ranks; without horovod_iter's "
                f"sampler or state (an IterableDataset without state_dict(), or a foreign "
                f"sampler) it can only be resumed on {s[WORLD]} ranks, not {deal.world}; use "
                "horovod_iter.ShardedDataset or DistributedSampler to resume on any")
        return None

    def mix_stats(self, pass_: Pass) -> Callable[[Pass], dict[str, Any]] | None:
        """For a mix: a function of the started ``pass_`` giving the samples it handed out
        by source (``source_counts``, ``source_proportions``); None for other data."""
        return None

    def empty(self, collate_fn: Any, rank: int) -> Callable[[], Any] | None:
        """Makes an empty batch of the data's structure, for a rank that has none to copy
        it from under ``pad`` (map-style data: from sample 0); None: the ranks share one."""
        return None

    def fingerprint(self) -> dict[str, Any]:
        """What decides which sample lands where, independent of the world: saved with the
        state and compared on load."""
        return {"kind": self.kind, "dataset": _dataset_id(self.dataset)}

    def config(self, deal: Deal) -> dict[str, Any]:
        """What every rank must agree on at a pass's start, beyond the loader's own
        settings and the position (which the loader adds)."""
        return self.fingerprint()


# -- map-style data ---------------------------------------------------------------------------
class _MapSource(Source):
    """Map-style data: the length decides the layout, read anew at every check."""

    def fingerprint(self) -> dict[str, Any]:
        return {**super().fingerprint(), "length": len(self.dataset)}

    def empty(self, collate_fn: Any, rank: int) -> Callable[[], Any] | None:
        return functools.partial(BatchFetcher(self.dataset, collate_fn, False, rank),
                                 np.zeros(1, dtype=np.int64))


class SamplerSource(_MapSource):
    """Our `DistributedSampler`: O(1) resume, on any world size."""

    kind = "sampler"

    def __init__(self, dataset: Any, sampler: DistributedSampler) -> None:
        super().__init__(dataset)
        self.sampler = sampler

    def epoch_target(self) -> Any:
        return self.sampler

    def epoch_set_outside(self) -> int | None:
        return self.sampler.epoch

    def world_moved(self, deal: Deal) -> bool:
        return (self.sampler.num_replicas, self.sampler.rank) != (deal.world, deal.rank)

    def num_batches(self, deal: Deal) -> int:
        plan = self.sampler.plan()
        if (plan.world, plan.rank) != (deal.world, deal.rank):
            from dataclasses import replace
            plan = replace(plan, world=deal.world, rank=deal.rank)
        return deal.steps([steps_for(c, deal.batch, deal.drop_last) for c in plan.counts])

    def open(self, deal: Deal, opts: FetchOptions, pass_: Pass, resume: Resume | None,
             workers: dict[Any, DataLoader[Any]]) -> HostSource:
        c = pass_.cursor = self.sampler.begin_iteration(resume=resume is not None)
        if deal.uneven == "error":
            check_even(c.plan, c.slot, deal.rank)
        return host_batches(self.dataset, opts, workers=workers, indices=plan_batches(
            c.plan, c.slot, deal.batch, deal.drop_last))

    def state(self, p: Pass | Resume | None, deal: Deal,
              collect: Collect) -> dict[str, Any]:
        own = self.sampler
        if isinstance(p, Pass) and p.cursor is not None:
            return {SAMPLER: own.state_at(p.cursor)}
        if isinstance(p, Resume):
            return {SAMPLER: own.state_dict()}  # the loaded cursor
        return {SAMPLER: own.state_at(Cursor(own.plan()))}  # the epoch's start

    def load(self, s: Mapping[str, Any], deal: Deal) -> Any:
        if not isinstance(s.get(SAMPLER), Mapping):
            raise ValueError("loader state has no sampler state; it was saved by a loader "
                             "over an IterableDataset or with a foreign sampler")
        own = self.sampler
        if (own.num_replicas, own.rank) != (deal.world, deal.rank):
            own.set_world(deal.world, deal.rank)
        own.load_state_dict(s[SAMPLER])
        return None

    def fingerprint(self) -> dict[str, Any]:
        # not the length: the sampler's state holds it (and its seed), and a state saved at
        # an epoch's end resumes into a dataset that grew since
        return {"kind": self.kind, "dataset": _dataset_id(self.dataset),
                "shuffle": self.sampler.shuffle}

    def config(self, deal: Deal) -> dict[str, Any]:
        # the start of the pass (the sampler's cursor) and its seed: every rank alike
        return {**self.fingerprint(), "sampler": self.sampler.state_dict()}

    def mix_stats(self, pass_: Pass) -> Callable[[Pass], dict[str, Any]] | None:
        if not isinstance(self.dataset, MixedDataset) or pass_.cursor is None:
            return None
        return _SlotCounts(self.dataset, pass_.cursor.slot)


class LengthGroupedSource(_MapSource):
    """Our `LengthGroupedBatchSampler`: resumes on any world size."""

    kind = "length_grouped"

    def __init__(self, dataset: Any, batch_sampler: LengthGroupedBatchSampler) -> None:
        super().__init__(dataset)
        self.batch_sampler = batch_sampler

    def epoch_target(self) -> Any:
        return self.batch_sampler

    def epoch_set_outside(self) -> int | None:
        return self.batch_sampler.epoch

    def num_batches(self, deal: Deal) -> int:
        return deal.steps(self.batch_sampler.counts(0))

    def open(self, deal: Deal, opts: FetchOptions, pass_: Pass, resume: Resume | None,
             workers: dict[Any, DataLoader[Any]]) -> HostSource:
        pass_.base = pass_.steps  # it counts its position from the pass's start
        return host_batches(self.dataset, opts, workers=workers, indices=batch_sampler_batches(
            self.batch_sampler, pass_.steps))

    def state(self, p: Pass | Resume | None, deal: Deal,
              collect: Collect) -> dict[str, Any]:
        bs = self.batch_sampler
        if isinstance(p, Pass):
            return {BATCH_SAMPLER: bs.state_dict(steps=p.steps - (p.base or 0))}
        return {BATCH_SAMPLER: bs.state_dict()}

    def load(self, s: Mapping[str, Any], deal: Deal) -> Any:
        if not isinstance(s.get(BATCH_SAMPLER), Mapping):
            raise ValueError("loader state has no batch sampler state; it was saved by a "
                             "loader without this LengthGroupedBatchSampler")
        self.batch_sampler.set_world(deal.world, deal.rank)
        self.batch_sampler.load_state_dict(s[BATCH_SAMPLER])
        return None

    def config(self, deal: Deal) -> dict[str, Any]:
        return {**self.fingerprint(), "batch_sampler": self.batch_sampler.state_dict()}


class ForeignBatchesSource(_MapSource):
    """A user's batch sampler (this rank's share): resumes on the same world by skipping
    batches."""

    kind = "batch_sampler"

    def __init__(self, dataset: Any, batch_sampler: Any) -> None:
        super().__init__(dataset)
        self.batch_sampler = batch_sampler

    def epoch_target(self) -> Any:
        return self.batch_sampler

    def num_batches(self, deal: Deal) -> int:
        return len(self.batch_sampler)  # this rank's (the others' are unknown)

    def open(self, deal: Deal, opts: FetchOptions, pass_: Pass, resume: Resume | None,
             workers: dict[Any, DataLoader[Any]]) -> HostSource:
        pass_.base = pass_.steps
        return host_batches(self.dataset, opts, workers=workers, indices=batch_sampler_batches(
            self.batch_sampler, pass_.steps))

    def fingerprint(self) -> dict[str, Any]:
        return {**super().fingerprint(), "batch_sampler": type(self.batch_sampler).__qualname__}


class ForeignSamplerSource(_MapSource):
    """A user's sampler: resumes on the same world by skipping the indices consumed."""

    kind = "foreign_sampler"

    def __init__(self, dataset: Any, sampler: Any) -> None:
        super().__init__(dataset)
        self.sampler = sampler

    def epoch_target(self) -> Any:
        return self.sampler

    def num_batches(self, deal: Deal) -> int:
        return steps_for(len(self.sampler), deal.batch, deal.drop_last)

    def open(self, deal: Deal, opts: FetchOptions, pass_: Pass, resume: Resume | None,
             workers: dict[Any, DataLoader[Any]]) -> HostSource:
        return host_batches(self.dataset, opts, workers=workers, indices=sampler_batches(
            self.sampler, pass_.samples, deal.batch, deal.drop_last))

    def fingerprint(self) -> dict[str, Any]:
        return {**super().fingerprint(), "sampler": type(self.sampler).__qualname__}


# -- iterable data ----------------------------------------------------------------------------
class _IterableSource(Source):
    """Iterable data: each DataLoader worker is a reader of its own, so ``num_workers``
    changes which samples a rank reads, and every rank must agree on it."""

    def epoch_target(self) -> Any:
        return self.dataset

    def world_moved(self, deal: Deal) -> bool:
        ds = self.dataset
        return isinstance(ds, (ElasticState, CanonicalLayout)) and (
            getattr(ds, "num_replicas", deal.world), getattr(ds, "rank", deal.rank)) != (
            deal.world, deal.rank)

    def move_world(self, deal: Deal) -> None:
        self.dataset.set_world(deal.world, deal.rank)

    def num_batches(self, deal: Deal) -> int:
        per_consumer = getattr(self.dataset, "consumer_counts", None)
        if callable(per_consumer) and getattr(self.dataset, "sizes", None) is not None:
            # every rank's batch count (each worker batches its own stream): the same len()
            # on every rank - the steps the ranks take together
            w = max(1, deal.workers)
            counts = per_consumer(deal.world * w)
            return deal.steps([sum(steps_for(counts[r * w + k], deal.batch, deal.drop_last)
                                   for k in range(w)) for r in range(deal.world)])
        try:
            n = len(self.dataset)
        except TypeError:
            raise TypeError("len() of a DistributedLoader over an IterableDataset without "
                            "__len__ is unknown; give the dataset a __len__ (this rank's "
                            "samples) or use a map-style dataset") from None
        return steps_for(n, deal.batch, deal.drop_last)

    def bound_reads(self, timeout: float | None) -> None:
        """Bound the shard downloads of `ShardedDataset`s left at the default timeout by
        the loader's (a little less: with workers, the DataLoader's own wait must not fire
        first, its error does not name the URL)."""
        parts = self.dataset.sources if isinstance(self.dataset, MixedStream) else [
            self.dataset]
        for d in parts:
            if isinstance(d, ShardedDataset) and d.timeout == DEFAULT_TIMEOUT:
                d.timeout = None if timeout is None else 0.9 * timeout

    def fingerprint(self) -> dict[str, Any]:
        own = _dataset_id(self.dataset)
        return {"kind": self.kind,
                "dataset": own if own is not None else type(self.dataset).__qualname__}

    def config(self, deal: Deal) -> dict[str, Any]:
        return {**self.fingerprint(), "num_workers": deal.workers}


class StatefulSource(_IterableSource):
    """Iterable data with torchdata's ``state_dict``/``load_state_dict``: every consumer's
    position, gathered at ``state_dict()``; ``ShardedDataset`` (``elastic_state``) merges
    them into one state that resumes on any world."""

    kind = "stateful"

    @property
    def elastic(self) -> bool:
        """Its consumers' states merge into one that resumes on any world."""
        return isinstance(self.dataset, ElasticState) and bool(self.dataset.elastic_state)

    def open(self, deal: Deal, opts: FetchOptions, pass_: Pass, resume: Resume | None,
             workers: dict[Any, DataLoader[Any]]) -> HostSource:
        pass_.base = resume.dataset if resume else None
        self._check_shard_layout(deal, pass_.base)
        return host_batches(self.dataset, opts, resume=pass_.base)

    def state(self, p: Pass | Resume | None, deal: Deal,
              collect: Collect) -> dict[str, Any]:
        if isinstance(p, Resume) and p.dataset is not None:
            return {DATASET: p.dataset}
        if not isinstance(p, Pass):  # nothing handed out this epoch: the start, no gather
            return {DATASET: self._start(deal)}
        return {DATASET: collect(p.positions, p.base)}

    def _start(self, deal: Deal) -> Any:
        """The epoch's start as a state of the same shape as a used one (DCP loads a
        checkpoint into a fresh loader's state dict, key by key)."""
        if self.elastic:
            return self.dataset.merge_states([None] * deal.consumers, deal.consumers, None)
        return [None] * deal.consumers

    def load(self, s: Mapping[str, Any], deal: Deal) -> Any:
        return check_dataset_state(self.dataset, s.get(DATASET), deal.consumers)

    def _check_shard_layout(self, deal: Deal, base: Any) -> None:
        """A rank without a shard stops every rank at step 0 under ``stop``/``error``: refuse a
        fresh epoch that would train on nothing; warn for a resumed one that would drop the
        shards left (the same on every rank: the layout is a pure function)."""
        counts_of = getattr(self.dataset, "shard_counts", None)
        if deal.uneven == "pad" or not callable(counts_of):
            return
        w, size = max(1, deal.workers), deal.world
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
                f"rank {deal.rank}: {what}, and uneven={deal.uneven!r} would stop every "
                f"rank at step 0: the epoch would train on nothing. {fix}")
        warnings.warn(
            f"rank {deal.rank}: the resumed epoch has {sum(per_rank)} shard(s) left: {what}, "
            f"and uneven={deal.uneven!r} stops every rank at once, so they are not read this "
            f"epoch; {fix}", RuntimeWarning, stacklevel=4)


class CanonicalSource(_IterableSource):
    """Streams with a canonical layout (``ShardedDataset(canonical_ranks=)``, a
    `MixedStream`): the same global batches on any world; the state is a count."""

    kind = "canonical"

    def configure(self, deal: Deal) -> None:
        """Tell the dataset the global batch its steps are cut for."""
        self.dataset.set_batching(deal.batch * deal.world, deal.drop_last)

    def num_batches(self, deal: Deal) -> int:
        self.configure(deal)
        lay = self.dataset.layout(deal.world, max(1, deal.workers))
        return deal.steps([lay.rank_batches(r) for r in range(deal.world)])

    def open(self, deal: Deal, opts: FetchOptions, pass_: Pass, resume: Resume | None,
             workers: dict[Any, DataLoader[Any]]) -> HostSource:
        pass_.base = resume.dataset if resume else None
        if not deal.in_order:
            raise ValueError("the canonical layout of a ShardedDataset needs the workers' "
                             "batches in order: use in_order=True")
        self.configure(deal)
        self.dataset.layout(deal.world, max(1, deal.workers))  # checks the world
        return host_batches(self.dataset, opts, resume=pass_.base)

    def state(self, p: Pass | Resume | None, deal: Deal,
              collect: Collect) -> dict[str, Any]:
        if isinstance(p, Resume) and p.dataset is not None:
            return {DATASET: p.dataset}
        self.configure(deal)
        if not isinstance(p, Pass):  # the epoch's start, in the shape of any other position
            return {DATASET: self.dataset.canonical_state(0, None, deal.world,
                                                          max(1, deal.workers), {})}
        # a count: every rank knows every rank's position, no collective
        return {DATASET: self.dataset.canonical_state(p.steps, p.base, p.world,
                                                      max(1, deal.workers), p.positions)}

    def load(self, s: Mapping[str, Any], deal: Deal) -> Any:
        self.configure(deal)  # the layout checks the state against its global batch
        return check_dataset_state(self.dataset, s.get(DATASET), deal.consumers)

    def mix_stats(self, pass_: Pass) -> Callable[[Pass], dict[str, Any]] | None:
        mix = self.dataset
        if not isinstance(mix, MixedStream):
            return None

        def shares(p: Pass) -> dict[str, Any]:  # the shares follow from the step
            counts = mix.rank_source_counts(p.steps)
            return {"source_counts": dict(zip(mix.names, counts)),
                    "source_proportions": mix.proportions(counts)}
        return shares


class ReplaySource(_IterableSource):
    """Iterable data without state: resumes by replaying the batches handed out (exact
    only if it yields the same stream again), on the same world and batch size."""

    kind = "replay"

    def open(self, deal: Deal, opts: FetchOptions, pass_: Pass, resume: Resume | None,
             workers: dict[Any, DataLoader[Any]]) -> HostSource:
        if resume is not None and resume.finished:
            return _Empty()
        if pass_.steps:
            warnings.warn(
                f"resuming an IterableDataset without state by replaying {pass_.steps} "
                "batches (O(steps), and only exact if it yields the same stream again); "
                "give it state_dict()/load_state_dict() or use horovod_iter.ShardedDataset",
                stacklevel=4)
        return host_batches(self.dataset, opts, skip=pass_.steps)

    def load(self, s: Mapping[str, Any], deal: Deal) -> Any:
        super().load(s, deal)
        if s[BATCH] != deal.batch and s[STEPS]:
            raise ValueError(
                f"loader state was saved with batch_size={s[BATCH]} (per rank) over an "
                f"IterableDataset, which resumes by replaying whole batches; build the loader "
                f"with batch_size={s[BATCH]} (or global_batch_size={s[BATCH] * deal.world}) "
                "to resume, and change it at the next epoch")
        return None


class _SlotCounts:
    """A `MixedDataset`'s samples handed out by source in one pass, counted incrementally
    from the slots its cursor has taken since ``start``."""

    def __init__(self, mix: MixedDataset, start: int) -> None:
        self.mix, self.slot = mix, start
        self.counts = np.zeros(len(mix.names), dtype=np.int64)

    def __call__(self, p: Pass) -> dict[str, Any]:
        c = p.cursor
        if c is not None and c.slot > self.slot:
            idx = c.plan.indices(self.slot, c.slot)
            self.counts += np.bincount(self.mix.source_of(idx), minlength=len(self.mix.names))
            self.slot = c.slot
        counts = self.counts.tolist()
        return {"source_counts": dict(zip(self.mix.names, counts)),
                "source_proportions": self.mix.proportions(counts)}


class _Empty(HostSource):
    """The rest of a pass that was saved finished: nothing."""

    num_batches = 0

    def __next__(self) -> Any:
        raise StopIteration


def choose_source(dataset: Any, sampler: Any, batch_sampler: Any) -> Source:
    """The Source of a loader's data, chosen once (``sampler`` is ``None`` for iterables)."""
    if batch_sampler is not None:
        if isinstance(batch_sampler, LengthGroupedBatchSampler):
            return LengthGroupedSource(dataset, batch_sampler)
        return ForeignBatchesSource(dataset, batch_sampler)
    if sampler is not None:
        if isinstance(sampler, DistributedSampler):
            return SamplerSource(dataset, sampler)
        return ForeignSamplerSource(dataset, sampler)
    if isinstance(dataset, CanonicalLayout) and dataset.canonical:
        return CanonicalSource(dataset)
    if isinstance(dataset, Stateful):
        return StatefulSource(dataset)
    return ReplaySource(dataset)
