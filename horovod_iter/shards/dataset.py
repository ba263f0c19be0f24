"""`ShardedDataset`: streaming data in shards, each read by exactly one consumer, resumable on
any world size and worker count - the dataset's checks, its world and epoch, and its two
layouts, which delegate to the pieces of ``horovod_iter/shards/``:

* the default layout: `deal` deals the epoch's shards to the (rank x worker) consumers and
  merges their positions; one `ShardReader` reads a consumer's plan (seek or skip, the cache,
  the seeded interleave, the shuffle buffer);
* the canonical layout (``canonical_ranks=``): `CanonicalStreams` cuts the epoch's records
  into streams whose global batches are the same on any world (`canonical`), read through
  the same reader.

Within a shard, consumed samples are skipped by re-reading them, or by seeking when ``read``
accepts a ``start=`` keyword.
"""
from __future__ import annotations

import hashlib
import itertools
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Callable, Generic, TypeVar

from torch.utils.data import IterableDataset, get_worker_info

from ..backend import DEFAULT_TIMEOUT, get_backend
from . import deal
from .canonical import (
    CanonicalPosition,
    CanonicalStreams,
    Layout,
    check_world,
    close_streams,
    sizes_digest,
)
from .deal import STATE_TYPE, ConsumerState, Position
from .reader import ShardReader, Tally
from .remote import ShardCache, default_cache_dir

__all__ = ["ShardedDataset"]

T = TypeVar("T")


class _Kept(Generic[T]):
    """An attribute of the dataset that its reader keeps: the one copy, which the reader
    reads (a loader that sets ``dataset.timeout`` sets the reader's)."""

    def __init__(self, name: str = "") -> None:
        self.name = name

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = self.name or name

    def __get__(self, obj: Any, objtype: Any = None) -> T:
        if obj is None:
            return self  # type: ignore[return-value]  # the class's own attribute
        return getattr(obj._reader, self.name)

    def __set__(self, obj: Any, value: T) -> None:
        setattr(obj._reader, self.name, value)


class ShardedDataset(IterableDataset[Any]):
    """An ``IterableDataset`` over shards, dealt to the (rank x worker) consumers.

    Args:
        shards: the shards: paths, URLs, or any picklable descriptors.
        read: ``read(shard) -> iterable of samples``. If it accepts ``start=``, a resume seeks
            (``read(shard, start=k)`` must yield from the k-th sample on) instead of skipping.
        shuffle: a new shard order each epoch, from (seed, epoch).
        seed: the order's seed, the same on every rank.
        sizes: the shards' sample counts, if known: gives ``len()``.
        interleave: shards each consumer reads at once (with ``shuffle``): every record is
            drawn from one of them chosen by a seeded generator - in proportion to the records
            each has left when ``sizes`` are known, which makes the stream a uniformly random
            merge of its shards - so a batch mixes records of many shards instead of one after
            another (``1``: one shard after another). Costs one open reader (and the record
            it read ahead) per open shard.
        shuffle_buffer: shuffle samples within each consumer's stream through a buffer of
            this many samples (seeded; every sample still exactly once). A resume with a
            buffer needs the same world size and worker count.
        rank, num_replicas: this rank and the world size (default: the backend's; the
            loader keeps them current across Horovod elastic resets).
        cache_dir: where shards given as URLs (``s3://``, ``gs://``, ``https://``, anything
            fsspec opens) are downloaded before ``read`` gets their local path; shared by the
            ranks and workers of a host; copies are keyed by the shards' content identity
            (ETag, else size and modification time), checked at every open. Default, per
            user: ``$HOROVOD_ITER_CACHE``, else ``$XDG_CACHE_HOME/horovod_iter/shards``, else
            ``~/.cache/horovod_iter/shards``.
        cache_limit: bytes the cache may hold (least recently used shards are evicted; the
            shards open at once are bounded by it too).
        storage_options: for fsspec (credentials, ``client_kwargs={"endpoint_url": ...}``).
        download_ahead: shards each consumer downloads ahead of the ones it reads.
        timeout: seconds a shard's look-up or download (or the wait for another consumer's
            download of it) may go without progress before `DataTimeoutError` naming its
            URL (None or 0: no bound): a stalled object store ends the read instead of
            blocking.
        canonical_ranks, canonical_workers: elastic determinism (needs ``sizes``): the
            epoch's records are cut into ``canonical_ranks x canonical_workers`` streams of
            equal length, and global step ``k`` takes ``global_batch / canonical_ranks``
            records from one stream of each canonical rank - so the set of records of every
            full global batch is the same on any world size that divides ``canonical_ranks``
            with any ``num_workers`` that divides ``canonical_workers``, at a fixed global
            batch size (a multiple of ``canonical_ranks``). Its state is a count, which the
            loader's ``state_dict()`` computes without asking the other ranks. See
            docs/checkpoints.md.

    Use it with `DistributedLoader`, whose ``state_dict()`` then holds the position of
    every consumer (``uneven="pad"`` gives every sample exactly once; ``"stop"`` stops at the
    shortest rank). Example:

    ```python
    ds = hi.ShardedDataset(sorted(glob("train-*.jsonl")), read_jsonl, seed=0)
    loader = hi.DistributedLoader(ds, batch_size=64, num_workers=4, uneven="pad")
    ```
    """

    #: the loader resumes it from every consumer's state, on any number of consumers
    elastic_state = True

    # kept by the reader (see ``_Kept``): what it reads, and who reads, for its errors
    shards: _Kept[list[Any]] = _Kept()
    read: _Kept[Callable[..., Iterable[Any]]] = _Kept()
    sizes: _Kept[list[int] | None] = _Kept()
    seed: _Kept[int] = _Kept()
    interleave: _Kept[int] = _Kept()
    shuffle_buffer: _Kept[int] = _Kept()
    cache_dir: _Kept[str] = _Kept()
    cache_limit: _Kept[int] = _Kept()
    storage_options: _Kept[dict[str, Any] | None] = _Kept()
    download_ahead: _Kept[int] = _Kept()
    timeout: _Kept[float | None] = _Kept()
    remote: _Kept[bool] = _Kept()
    rank: _Kept[int] = _Kept()
    _seeks: _Kept[bool] = _Kept()
    _consumer: _Kept[tuple[int, int]] = _Kept("consumer")  # (consumer, consumers) iterating

    def __init__(self, shards: Sequence[Any], read: Callable[..., Iterable[Any]], *,
                 shuffle: bool = True, seed: int = 0, sizes: Sequence[int] | None = None,
                 shuffle_buffer: int = 0, interleave: int = 64, rank: int | None = None,
                 num_replicas: int | None = None, cache_dir: str | None = None,
                 cache_limit: int = 8 << 30, storage_options: dict[str, Any] | None = None,
                 download_ahead: int = 2, canonical_ranks: int | None = None,
                 canonical_workers: int = 1,
                 timeout: float | None = DEFAULT_TIMEOUT) -> None:
        if isinstance(shards, (str, bytes)) or not isinstance(shards, Sequence):
            raise TypeError(f"shards must be a sequence of shard descriptors (e.g. a list of "
                            f"paths), got {type(shards).__name__}")
        if not callable(read):
            raise TypeError(f"read must be a function read(shard) -> iterable of samples, "
                            f"got {read!r}")
        if not isinstance(shuffle, bool):
            raise TypeError(f"shuffle must be a bool, got {shuffle!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {seed!r}")
        if sizes is not None and (len(sizes) != len(shards) or any(
                not isinstance(n, int) or n < 0 for n in sizes)):
            raise ValueError(f"sizes must give an int >= 0 for each of the {len(shards)} "
                             f"shards, got {sizes!r}")
        if not isinstance(interleave, int) or isinstance(interleave, bool) or interleave < 1:
            raise ValueError(f"interleave must be an int >= 1 (shards open at once per "
                             f"consumer; 1 reads them one after another), got {interleave!r}")
        if not isinstance(shuffle_buffer, int) or shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be an int >= 0, got {shuffle_buffer!r}")
        if not isinstance(download_ahead, int) or isinstance(download_ahead, bool) or \
                download_ahead < 0:
            raise ValueError(f"download_ahead must be an int >= 0, got {download_ahead!r}")
        if canonical_ranks is not None:
            for name, v in (("canonical_ranks", canonical_ranks),
                            ("canonical_workers", canonical_workers)):
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    raise ValueError(f"{name} must be an int >= 1, got {v!r}")
            if sizes is None:
                raise ValueError("the canonical layout (canonical_ranks=) cuts the records "
                                 "into streams of equal length, which needs the shards' "
                                 "record counts: pass sizes=")
            if shuffle_buffer:
                raise ValueError("the canonical layout does not take a shuffle_buffer (its "
                                 "position is a count); its windows already merge "
                                 "`interleave` shards at random: use shuffle_buffer=0")
        cache_dir = cache_dir or default_cache_dir()
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(
                timeout, (int, float)) or timeout < 0):
            raise ValueError(f"timeout must be a number of seconds >= 0 or None (0 and None: "
                             f"no bound), got {timeout!r}")
        self._reader = ShardReader(
            list(shards), read, sizes=None if sizes is None else list(sizes), seed=seed,
            interleave=interleave if shuffle else 1, shuffle_buffer=shuffle_buffer,
            cache_dir=cache_dir, cache_limit=cache_limit, storage_options=storage_options,
            download_ahead=download_ahead,
            timeout=timeout or None)  # 0: no bound, as the loader's
        if self.remote:
            ShardCache.check_limit(cache_limit)
        self.shuffle = shuffle
        self.canonical = None if canonical_ranks is None else (canonical_ranks,
                                                                canonical_workers)
        self._streams = None if self.canonical is None else CanonicalStreams(
            self._reader, shuffle, *self.canonical)
        self._batching: tuple[int, bool] | None = None  # (global batch, drop_last)
        self._own: dict[int, int] = {}  # canonical: this consumer's streams -> their offsets
        if rank is None or num_replicas is None:
            b = get_backend()
            rank = b.rank if rank is None else rank
            num_replicas = b.size if num_replicas is None else num_replicas
        self.set_world(num_replicas, rank)
        self.epoch = 0
        self._resume: Position | CanonicalPosition | None = None
        self._fingerprint: str | None = None
        self._tally = Tally()  # the default layout's progress in the current iteration

    def fingerprint(self) -> str:
        """What every rank must agree on (the shard list in its order, seed, shuffle, sizes):
        the loader checks it at ``iter()``, so a rank that listed its files differently is
        refused instead of reading other shards than the ranks believe it reads."""
        if self._fingerprint is None:
            blob = repr((self.shards, self.seed, self.shuffle, self.sizes) + (
                (self.canonical, self.interleave) if self.canonical else ()) + (
                (("shuffle_buffer", self.shuffle_buffer),) if self.shuffle_buffer else ())
            ).encode()
            digest = hashlib.blake2b(blob, digest_size=8).hexdigest()
            self._fingerprint = f"ShardedDataset({len(self.shards)} shards, {digest})"
        return self._fingerprint

    # -- layout ---------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's shard order (call it every epoch, as the loader does)."""
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        if "accelerate.data_loader" in sys.modules and self.num_replicas > 1:
            # accelerator.prepare(DataLoader(this)) would split our slice again
            from ..integrations.accelerate import check_not_resharded
            check_not_resharded(self, rank=self.rank, world=self.num_replicas,
                                what="horovod_iter.ShardedDataset")
        self.epoch = epoch

    def set_world(self, num_replicas: int, rank: int) -> None:
        """This rank's place in the world (the loader calls it after an elastic reset)."""
        if not isinstance(num_replicas, int) or num_replicas < 1 or not (
                isinstance(rank, int) and 0 <= rank < num_replicas):
            raise ValueError(f"need 0 <= rank < num_replicas, got rank={rank!r}, "
                             f"num_replicas={num_replicas!r}")
        self.rank, self.num_replicas = rank, num_replicas

    def order(self, epoch: int | None = None) -> list[int]:
        """The epoch's shard order (indices into ``shards``)."""
        e = self.epoch if epoch is None else epoch
        return deal.shard_order(len(self.shards), self.shuffle, self.seed, e)

    def shard_counts(self, consumers: int, resume: dict[str, Any] | None = None) -> list[int]:
        """Shards each of ``consumers`` reads in a pass (from ``resume``, a merged state, or
        the epoch's start): the same on every rank."""
        if self.canonical is not None:
            raise TypeError("a canonical layout reads streams cut across the shards, not whole "
                            "shards: see layout() for what each rank reads")
        base = None if resume is None or self.shuffle_buffer else self._position(resume)
        order = self.order()
        base = base if base is not None and base.epoch == self.epoch else None
        return [len(deal.plan(order, c, consumers, base)) for c in range(consumers)]

    def __len__(self) -> int:
        """Samples this rank reads in a full epoch without DataLoader workers (needs
        ``sizes``); `consumer_counts` has every consumer's."""
        return self.consumer_counts(self.num_replicas)[self.rank]

    def consumer_counts(self, consumers: int) -> list[int]:
        """Samples each of ``consumers`` (ranks x workers) reads in a full epoch (needs
        ``sizes``): the same on every rank, so the loader's ``len()`` is too."""
        sizes = self.sizes
        if sizes is None:
            raise TypeError("len() of a ShardedDataset needs the shard sizes: pass sizes=")
        if self.canonical is not None:
            if self._batching is None:
                raise TypeError("len() of a ShardedDataset with a canonical layout needs the "
                                "global batch its steps are cut for: set_batching() "
                                "(DistributedLoader does)")
            per, w = consumers // self.num_replicas, self.num_replicas
            lay = self.layout(w, per)
            return [lay.worker_records(c // per, c % per) for c in range(consumers)]
        order = self.order()
        return [sum(sizes[s] for s in deal.deal(order, c, consumers)) for c in range(consumers)]

    # -- the default layout ----------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        consumers = self.num_replicas * workers
        consumer = self.rank * workers + worker
        if self.canonical is not None:
            return itertools.chain.from_iterable(self.step_batches())
        saved = self._resume if isinstance(self._resume, Position) else None
        if self.shuffle_buffer and saved is not None and saved.consumers != consumers:
            raise ValueError(
                f"this state was saved by {saved.consumers} consumers (ranks x "
                f"workers) with a shuffle buffer, which resumes only on as many; this run has "
                f"{consumers}. Resume with the same world size and num_workers, or use "
                "shuffle_buffer=0 to resume on any")
        resume = saved if saved is not None and saved.epoch == self.epoch else None
        self._consumer = (consumer, consumers)
        tally = self._tally = Tally()
        rd, epoch = self._reader, self.epoch
        if self.shuffle_buffer:  # replay this consumer's seeded stream to where it stopped
            skip = resume.yielded[consumer] if resume else 0
            plan = deal.plan(self.order(), consumer, consumers)
            stream = rd.counted(rd.shuffled(rd.samples(plan, tally, epoch, 0), epoch), tally)
            return itertools.islice(stream, skip, None)
        plan = deal.plan(self.order(), consumer, consumers, resume)
        same = resume is not None and resume.same_deal(consumers)
        # the same layout continues the uninterrupted stream: its draws so far are replayed
        tally.yielded = resume.yielded[consumer] if same and resume else 0
        return rd.counted(rd.samples(plan, tally, epoch, tally.yielded,
                                     redealt=resume is not None and not same), tally)

    def cache(self) -> ShardCache:
        """The local cache of remote shards (one per process)."""
        return self._reader.cache()

    # -- canonical layout -------------------------------------------------------------
    @property
    def streams(self) -> CanonicalStreams:
        """The canonical streams (``stream(j, epoch, start)``: `MixedStream` reads them)."""
        if self._streams is None:
            raise TypeError("this ShardedDataset has no canonical layout (canonical_ranks=)")
        return self._streams

    def set_batching(self, global_batch: int, drop_last: bool = False) -> None:
        """The global batch size (and ``drop_last``) the canonical layout's steps are cut
        for; `DistributedLoader` sets it. Outside it, call it before iterating."""
        if not isinstance(global_batch, int) or isinstance(global_batch, bool) or \
                global_batch < 1:
            raise ValueError(f"global_batch must be an int >= 1, got {global_batch!r}")
        self._batching = (global_batch, bool(drop_last))

    def layout(self, world: int, workers: int,
               resume: CanonicalPosition | None = None) -> Layout:
        """The canonical layout as read by ``world`` ranks x ``workers`` workers, from the
        saved position ``resume`` or the epoch's start; refuses a world that cannot read
        it, naming the fix."""
        if self.canonical is None:
            raise TypeError("this ShardedDataset has no canonical layout (canonical_ranks=)")
        if self._batching is None:
            raise ValueError("the canonical layout cuts steps of a global batch size: "
                             "iterate it with DistributedLoader, or call "
                             "set_batching(global_batch) first")
        r, k = self.canonical
        g, drop = self._batching
        lengths = self.streams.lengths(self.epoch)
        check_world(r, k, world, workers, g, sum(lengths))
        if resume is not None and resume.epoch == self.epoch:
            return Layout(r, k, lengths, world, workers, g, resume.step, resume.positions,
                          drop)
        return Layout(r, k, lengths, world, workers, g, drop_last=drop)

    def step_batches(self) -> Iterator[list[Any]]:
        """This consumer's batches under the canonical layout: one list of records per step
        it is asked for (torch's DataLoader asks worker ``j`` for steps ``j, j+w, ...``)."""
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        resume = self._resume if isinstance(self._resume, CanonicalPosition) else None
        lay = self.layout(self.num_replicas, workers, resume)
        offsets = lay.offsets()
        kinds = lay.steps(self.rank, worker)
        self._consumer = (self.rank * workers + worker, self.num_replicas * workers)
        self._own = {s: offsets[s] for kind in set(kinds)
                     for s in lay.streams_of(self.rank, kind)}
        return self._run_steps(lay, self.epoch, offsets, kinds)

    def _run_steps(self, lay: Layout, epoch: int, offsets: list[int],
                   kinds: list[int]) -> Iterator[list[Any]]:
        streams: dict[int, Iterator[Any]] = {}
        self.streams.forget_ahead()
        try:
            for kind in kinds:
                batch: list[Any] = []
                for s, n in lay.batch(self.rank, kind, offsets):
                    it = streams.get(s)
                    if it is None:
                        it = streams[s] = self.streams.stream(s, epoch, offsets[s])
                    batch.extend(itertools.islice(it, n))
                    offsets[s] += n
                    self._own[s] = offsets[s]
                yield batch
        finally:
            close_streams(streams.values())
            self._reader.want_none()

    def canonical_state(self, steps: int, base: dict[str, Any] | None, world: int,
                        workers: int, local: dict[int, Any]) -> dict[str, Any]:
        """The position after ``steps`` batches of this epoch on every rank: a count, so it
        needs no other rank's word. ``local`` (this rank's consumers' own offsets) is checked
        against it: a difference is a bug, never a silent resume."""
        resume = self._canonical_position(base) if base is not None else None
        lay = self.layout(world, workers, resume)
        positions = lay.positions(max(0, steps - lay.start))
        for c, st in local.items():
            for s, off in (st or {}).get("streams", ()):
                if positions[s] != off:
                    raise RuntimeError(
                        f"rank {self.rank}: consumer {c} read stream {s} to record {off}, but "
                        f"the canonical layout says {positions[s]} after {steps} steps; the "
                        "position cannot be saved exactly (please report this bug)")
        return CanonicalPosition(self.epoch, steps, tuple(positions)).to_state(
            self._identity(), lay.global_batch)

    def _identity(self) -> dict[str, Any]:
        """What a canonical position is counted in (saved with it, checked at a load)."""
        return {"shards": len(self.shards), "seed": self.seed, "shuffle": self.shuffle,
                "canonical": list(self.canonical or ()), "interleave": self.interleave,
                "sizes": sizes_digest(self.sizes)}

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This consumer's position as of the samples it yielded (inside its worker)."""
        consumer, consumers = self._consumer
        if self.canonical is not None:
            return {"consumer": consumer, "consumers": consumers, "epoch": self.epoch,
                    "streams": sorted([s, o] for s, o in self._own.items())}
        t = self._tally
        return {"consumer": consumer, "consumers": consumers, "epoch": self.epoch,
                "finished": list(t.finished), "offsets": list(t.offsets.items()),
                "yielded": t.yielded}

    def merge_states(self, states: Sequence[dict[str, Any] | None], consumers: int,
                     base: dict[str, Any] | None = None) -> dict[str, Any]:
        """All consumers' states (``None``: nothing handed out yet) of a pass that resumed
        from ``base`` (a merged state, or None), as one state that says which shards are done
        and where the ones in progress stand - whatever the layout that made it."""
        b = self._position(base) if base is not None else None
        progress = [None if st is None else ConsumerState.from_state(st) for st in states]
        merged = deal.merge(self.order(), self.epoch, progress, consumers, b,
                            replayed=bool(self.shuffle_buffer))
        return merged.to_state(len(self.shards), self.seed, self.shuffle)

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Make the next iteration resume from a merged state (``None``: start afresh)."""
        if state is None:
            self._resume = None
            return
        self._resume = self._canonical_position(state) if self.canonical is not None \
            else self._position(state)
        self.epoch = self._resume.epoch

    def _check_layout(self, state: Any) -> None:
        """Refuse what is not a state of this dataset's layout, naming the layout it has."""
        if not isinstance(state, dict) or state.get("type") != STATE_TYPE:
            raise ValueError(f"not a ShardedDataset state: {state!r:.200}")
        if (state.get("layout") == "canonical") != (self.canonical is not None):
            saved = (f"canonical_ranks={state['canonical'][0]}, canonical_workers="
                     f"{state['canonical'][1]}" if state.get("layout") == "canonical"
                     and isinstance(state.get("canonical"), list) else "no canonical layout")
            raise ValueError(f"the ShardedDataset state was saved with {saved}, but this "
                             f"dataset has canonical={self.canonical!r}; build it as it was "
                             "saved to resume")

    def _position(self, state: Any) -> Position:
        """A merged state of the default layout, validated."""
        self._check_layout(state)
        return Position.from_state(state, len(self.shards), self.seed, self.shuffle)

    def _canonical_position(self, state: Any) -> CanonicalPosition:
        """A canonical layout's state, validated."""
        self._check_layout(state)
        return CanonicalPosition.from_state(state, self._identity())
