"""ShardedDataset: streaming data in shards, each read by exactly one consumer, resumable on
any world size and worker count.

A *consumer* is one DataLoader worker of one rank (``rank * workers + worker``; one per rank
without workers). Each epoch the shards are put in an order that is a pure function of
(seed, epoch) - `permute()`, the sampler's - identical on every
rank with no communication, and dealt round-robin to the consumers: shard at position ``p``
goes to consumer ``p mod C``. Every shard is read by exactly one consumer, so the world reads
the data once (``horovod_iter.shard`` makes every consumer read all of it).

Position: a consumer reads its shards in order, so its progress is two integers, ``done``
(shards finished) and ``offset`` (samples consumed of the next one). The loader keeps, per
consumer, the progress as of the last batch handed to the user, and its ``state_dict()`` holds
all consumers' (gathered over the ranks). Resume:

* same consumer count: every consumer continues its own shards where it stopped - exactly the
  uninterrupted stream;
* another world size or worker count: the shards in progress (continuing at their offsets),
  then the shards not started, in the epoch's order, are dealt anew over the new consumers.

Within a shard, consumed samples are skipped by re-reading them, or by seeking when ``read``
accepts a ``start=`` keyword.
"""
from __future__ import annotations

import bisect
import hashlib
import inspect
import itertools
import random
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Callable

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from .backend import DEFAULT_TIMEOUT, get_backend
from .canonical import Layout, check_world, merge_key, merge_offsets, stream_pieces, window_labels
from .errors import DataTimeoutError, SampleError, ShardingError
from .permutation import permute
from .remote import ShardCache, default_cache_dir, is_remote, local_path

__all__ = ["ShardedDataset"]

_STATE_TYPE = "horovod_iter.ShardedDataset"
_STATE_VERSION = 2
_END = object()


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
        self.canonical = None if canonical_ranks is None else (canonical_ranks,
                                                                canonical_workers)
        self._batching: tuple[int, bool] | None = None  # (global batch, drop_last)
        self._own: dict[int, int] = {}  # canonical: this consumer's streams -> their offsets
        self._ahead: dict[int, list[str]] = {}  # canonical: a stream's shards to download
        self._pieces_cache: tuple[Any, list[list[tuple[int, int, int]]]] | None = None
        self.shards = list(shards)
        self.read = read
        self.cache_dir = cache_dir or default_cache_dir()
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(
                timeout, (int, float)) or timeout < 0):
            raise ValueError(f"timeout must be a number of seconds >= 0 or None (0 and None: "
                             f"no bound), got {timeout!r}")
        self.timeout = timeout or None  # 0: no bound, as the loader's
        self.cache_limit = cache_limit
        self.storage_options = storage_options
        self.download_ahead = download_ahead
        self.remote = any(is_remote(x) for x in self.shards)
        if self.remote:
            ShardCache.check_limit(cache_limit)
        self._cache: ShardCache | None = None  # made in the process that reads (a worker)
        self.shuffle = shuffle
        self.seed = seed
        self.sizes = None if sizes is None else list(sizes)
        self.shuffle_buffer = shuffle_buffer
        self.interleave = interleave if shuffle else 1
        if rank is None or num_replicas is None:
            b = get_backend()
            rank = b.rank if rank is None else rank
            num_replicas = b.size if num_replicas is None else num_replicas
        self.set_world(num_replicas, rank)
        self.epoch = 0
        try:
            self._seeks = "start" in inspect.signature(read).parameters
        except (TypeError, ValueError):
            self._seeks = False
        self._resume: dict[str, Any] | None = None
        self._fingerprint: str | None = None
        self._consumer = (0, 1)        # (consumer, consumers) of the current iteration
        # progress of the current iteration, by index into the consumer's plan
        self._finished: set[int] = set()      # shards read to their end
        self._offsets: dict[int, int] = {}    # open shards: samples consumed of each
        self._yielded = 0                     # samples yielded (draws)

    def fingerprint(self) -> str:
        """What every rank must agree on (the shard list in its order, seed, shuffle, sizes):
        the loader checks it at ``iter()``, so a rank that listed its files differently is
        refused instead of reading other shards than the ranks believe it reads."""
        if self._fingerprint is None:
            blob = repr((self.shards, self.seed, self.shuffle, self.sizes) + (
                (self.canonical, self.interleave) if self.canonical else ())).encode()
            digest = hashlib.blake2b(blob, digest_size=8).hexdigest()
            self._fingerprint = f"ShardedDataset({len(self.shards)} shards, {digest})"
        return self._fingerprint

    # -- layout ---------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's shard order (call it every epoch, as the loader does)."""
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
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
        n = len(self.shards)
        if not self.shuffle or not n:
            return list(range(n))
        order: list[int] = permute(np.arange(n), n, self.seed, e).tolist()
        return order

    def _plan(self, consumer: int, consumers: int,
              resume: dict[str, Any] | None) -> list[tuple[int, int]]:
        """This consumer's (shard index, first sample) list for a pass that resumes from
        ``resume`` (a merged state, or None)."""
        order = self.order()
        if resume is None or resume["epoch"] != self.epoch:
            return [(s, 0) for s in order[consumer::consumers]]
        done, partial = resume["done"], resume["partial"]
        if resume["consumers"] == consumers and not resume["redealt"]:
            # continue exactly where this consumer stopped: its own shards, minus the done ones
            return [(s, partial.get(s, 0)) for s in order[consumer::consumers] if s not in done]
        # another layout: the shards in progress, then those not started, dealt anew
        where = {s: p for p, s in enumerate(order)}
        todo = [(s, partial[s]) for s in sorted(partial, key=where.__getitem__)]
        todo += [(s, 0) for s in order if s not in done and s not in partial]
        return todo[consumer::consumers]

    def shard_counts(self, consumers: int, resume: dict[str, Any] | None = None) -> list[int]:
        """Shards each of ``consumers`` reads in a pass (from ``resume``, a merged state, or
        the epoch's start): the same on every rank."""
        if self.canonical is not None:
            raise TypeError("a canonical layout reads streams cut across the shards, not whole "
                            "shards: see layout() for what each rank reads")
        base = None if resume is None or self.shuffle_buffer else self._normalise(resume)
        return [len(self._plan(c, consumers, base)) for c in range(consumers)]

    def __len__(self) -> int:
        """Samples this rank reads in a full epoch without DataLoader workers (needs
        ``sizes``); `consumer_counts` has every consumer's."""
        return self.consumer_counts(self.num_replicas)[self.rank]

    def consumer_counts(self, consumers: int) -> list[int]:
        """Samples each of ``consumers`` (ranks x workers) reads in a full epoch (needs
        ``sizes``): the same on every rank, so the loader's ``len()`` is too."""
        if self.sizes is None:
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
        return [sum(self.sizes[s] for s in order[c::consumers]) for c in range(consumers)]

    # -- iteration ------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        consumers = self.num_replicas * workers
        consumer = self.rank * workers + worker
        if self.canonical is not None:
            return itertools.chain.from_iterable(self.step_batches())
        if (self.shuffle_buffer and self._resume is not None
                and self._resume["consumers"] != consumers):
            raise ValueError(
                f"this state was saved by {self._resume['consumers']} consumers (ranks x "
                f"workers) with a shuffle buffer, which resumes only on as many; this run has "
                f"{consumers}. Resume with the same world size and num_workers, or use "
                "shuffle_buffer=0 to resume on any")
        resume = self._resume if self._resume and self._resume["epoch"] == self.epoch else None
        self._consumer = (consumer, consumers)
        self._finished, self._offsets, self._yielded = set(), {}, 0
        if self.shuffle_buffer:  # replay this consumer's seeded stream to where it stopped
            skip = resume["yielded"][consumer] if resume else 0
            plan = [(s, 0) for s in self.order()[consumer::consumers]]
            stream = self._count(self._shuffled(self._samples(plan, 0), consumer))
            return itertools.islice(stream, skip, None)
        plan = self._plan(consumer, consumers, resume)
        same = resume is not None and resume["consumers"] == consumers and not resume["redealt"]
        # the same layout continues the uninterrupted stream: its draws so far are replayed
        self._yielded = resume["yielded"][consumer] if same and resume else 0
        return self._count(self._samples(plan, self._yielded, redealt=resume is not None
                                         and not same))

    def cache(self) -> ShardCache:
        """The local cache of remote shards (one per process)."""
        if self._cache is None:
            self._cache = ShardCache(self.cache_dir, self.cache_limit, self.storage_options,
                                     timeout=self.timeout)
        self._cache.timeout = self.timeout or None  # as set now (a loader may pass its own)
        return self._cache

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = None  # threads and locks stay in their process
        return state

    def _open(self, plan: list[tuple[int, int]], i: int) -> tuple[Iterator[Any], int]:
        shard, start = plan[i]
        self._offsets[i] = start
        return self._reader(shard, start), start

    def _reader(self, shard: int, start: int) -> Iterator[Any]:
        """Shard ``shard``'s records from the ``start``-th on (downloaded first if remote)."""
        where = self.shards[shard]
        try:
            if is_remote(where):
                where = self.cache().open(where)
            else:
                where = local_path(where)
            if start and self._seeks:
                return iter(self.read(where, start=start))
            return itertools.islice(iter(self.read(where)), start, None)
        except (ShardingError, DataTimeoutError):
            raise  # our own errors name the URL already
        except Exception as e:
            raise self._read_error(shard, start, e) from e

    def _release(self, shard: int) -> None:
        where = self.shards[shard]
        if is_remote(where) and self._cache is not None:
            self._cache.release(where)

    def _close_shard(self, plan: list[tuple[int, int]], i: int) -> None:
        where = self.shards[plan[i][0]]
        if is_remote(where) and self._cache is not None:
            self._cache.release(where)

    def _read_error(self, shard: int, offset: int, e: Exception) -> SampleError:
        return SampleError(
            f"rank {self.rank} (consumer {self._consumer[0]} of {self._consumer[1]}): "
            f"reading shard {self.shards[shard]!r} (#{shard}) failed at sample "
            f"{offset}: {type(e).__name__}: {e}")

    def _samples(self, plan: list[tuple[int, int]], draws: int,
                 redealt: bool = False) -> Iterator[Any]:
        """This consumer's records: ``interleave`` of its shards open at once (the first
        unfinished ones of its plan), each draw taking the next record of one of them chosen
        by a seeded generator - a pure function of the shards' progress and the draw count,
        so a resume on the same layout continues the very same stream."""
        consumer, consumers = self._consumer
        rng = random.Random(f"{self.seed}:{self.epoch}:{consumer}:{consumers}:{int(redealt)}")
        for _ in range(draws):
            rng.random()
        opened: list[list[Any]] = []   # [plan index, iterator, next record], in plan order
        left: list[int] = []           # records each open shard has left (with sizes)
        sizes, remote = self.sizes, self.remote
        nxt = 0  # the next plan entry to open (entries open in plan order)

        def fill() -> None:
            nonlocal nxt
            while len(opened) < self.interleave and nxt < len(plan):
                url = self.shards[plan[nxt][0]]
                if remote and opened and is_remote(url) and not self.cache().has_room(url):
                    break  # the open shards fill the cache: open it once one is done
                i, nxt = nxt, nxt + 1
                it, start = self._open(plan, i)
                entry = [i, it, None]
                if self._advance(plan, entry):
                    opened.append(entry)
                    left.append(max(1, sizes[plan[i][0]] - start) if sizes is not None else 1)
            if remote and self.download_ahead:
                ahead = (self.shards[plan[j][0]] for j in range(nxt, len(plan)))
                self.cache().want(list(itertools.islice(
                    (u for u in ahead if is_remote(u)), self.download_ahead)))

        try:
            fill()
            yield from self._draw(plan, rng, opened, left, fill)
        finally:  # also a pass that ends early: its open shards may be evicted again
            for entry in opened:
                self._close_shard(plan, entry[0])
            if remote and self._cache is not None:
                self._cache.want([])

    def _draw(self, plan: list[tuple[int, int]], rng: random.Random, opened: list[list[Any]],
              left: list[int], fill: Callable[[], None]) -> Iterator[Any]:
        sizes = self.sizes
        while opened:
            u = rng.random()  # one draw per record, whatever is open: replayable by count
            if len(opened) == 1:
                k = 0
            elif sizes is None:
                k = int(u * len(opened))
            else:
                cum = list(itertools.accumulate(left))
                k = min(bisect.bisect_right(cum, u * cum[-1]), len(cum) - 1)
            entry = opened[k]
            record = entry[2]
            self._offsets[entry[0]] += 1
            left[k] = max(1, left[k] - 1)
            if not self._advance(plan, entry):
                del opened[k]
                del left[k]
                fill()
            yield record

    def _advance(self, plan: list[tuple[int, int]], entry: list[Any]) -> bool:
        """Pre-read ``entry``'s next record; False (and the shard finished) at its end."""
        i = entry[0]
        try:
            entry[2] = next(entry[1])
            return True
        except StopIteration:
            self._finished.add(i)
            self._offsets.pop(i, None)
            self._close_shard(plan, i)
            return False
        except Exception as e:
            raise self._read_error(plan[i][0], self._offsets[i], e) from e

    def _shuffled(self, samples: Iterator[Any], consumer: int) -> Iterator[Any]:
        rng = random.Random(f"{self.seed}:{self.epoch}:{consumer}")
        buf: list[Any] = []
        for sample in samples:
            buf.append(sample)
            if len(buf) >= self.shuffle_buffer:
                k = rng.randrange(len(buf))
                buf[k], buf[-1] = buf[-1], buf[k]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf

    def _count(self, samples: Iterator[Any]) -> Iterator[Any]:
        for sample in samples:
            self._yielded += 1
            yield sample

    # -- canonical layout -------------------------------------------------------------
    def set_batching(self, global_batch: int, drop_last: bool = False) -> None:
        """The global batch size (and ``drop_last``) the canonical layout's steps are cut
        for; `DistributedLoader` sets it. Outside it, call it before iterating."""
        if not isinstance(global_batch, int) or isinstance(global_batch, bool) or \
                global_batch < 1:
            raise ValueError(f"global_batch must be an int >= 1, got {global_batch!r}")
        self._batching = (global_batch, bool(drop_last))

    def _pieces(self, epoch: int | None = None) -> list[list[tuple[int, int, int]]]:
        """Each canonical stream's pieces in ``epoch`` (default: the current one)."""
        e = self.epoch if epoch is None else epoch
        key = (e, self.canonical)
        cached = self._pieces_cache
        if cached is None or cached[0] != key:
            assert self.canonical is not None and self.sizes is not None
            r, k = self.canonical
            cached = (key, stream_pieces(self.order(e), self.sizes, r * k, e))
            self._pieces_cache = cached
        return cached[1]

    def layout(self, world: int, workers: int,
               resume: dict[str, Any] | None = None) -> Layout:
        """The canonical layout as read by ``world`` ranks x ``workers`` workers, from the
        saved (normalised) position ``resume`` or the epoch's start; refuses a world that
        cannot read it, naming the fix."""
        if self.canonical is None:
            raise TypeError("this ShardedDataset has no canonical layout (canonical_ranks=)")
        if self._batching is None:
            raise ValueError("the canonical layout cuts steps of a global batch size: "
                             "iterate it with DistributedLoader, or call "
                             "set_batching(global_batch) first")
        r, k = self.canonical
        g, drop = self._batching
        lengths = tuple(sum(b - a for _, a, b in p) for p in self._pieces())
        check_world(r, k, world, workers, g, sum(lengths))
        if resume is not None and resume["epoch"] == self.epoch:
            return Layout(r, k, lengths, world, workers, g, resume["step"],
                          tuple(resume["positions"]), drop)
        return Layout(r, k, lengths, world, workers, g, drop_last=drop)

    def step_batches(self) -> Iterator[list[Any]]:
        """This consumer's batches under the canonical layout: one list of records per step
        it is asked for (torch's DataLoader asks worker ``j`` for steps ``j, j+w, ...``)."""
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        lay = self.layout(self.num_replicas, workers, self._resume)
        pieces = self._pieces()
        offsets = lay.offsets()
        kinds = lay.steps(self.rank, worker)
        self._consumer = (self.rank * workers + worker, self.num_replicas * workers)
        self._own = {s: offsets[s] for kind in set(kinds)
                     for s in lay._streams(self.rank, kind)}
        return self._run_steps(lay, pieces, offsets, kinds)

    def _run_steps(self, lay: Layout, pieces: list[list[tuple[int, int, int]]],
                   offsets: list[int], kinds: list[int]) -> Iterator[list[Any]]:
        streams: dict[int, Iterator[Any]] = {}
        self._ahead = {}
        try:
            for kind in kinds:
                batch: list[Any] = []
                for s, n in lay.batch(self.rank, kind, offsets):
                    it = streams.get(s)
                    if it is None:
                        it = streams[s] = self._stream(s, pieces[s], offsets[s])
                    batch.extend(itertools.islice(it, n))
                    offsets[s] += n
                    self._own[s] = offsets[s]
                yield batch
        finally:
            for it in streams.values():
                close = getattr(it, "close", None)
                if close is not None:
                    close()
            if self.remote and self._cache is not None:
                self._cache.want([])

    def _stream(self, stream: int, pieces: list[tuple[int, int, int]],
                start: int, epoch: int | None = None) -> Iterator[Any]:
        """Canonical stream ``stream`` (of ``epoch``, default the current one) from its
        record ``start`` on: window after window of ``interleave`` pieces, each a seeded
        uniformly random merge of its pieces."""
        epoch = self.epoch if epoch is None else epoch
        at = 0
        assert self.sizes is not None
        for w in range(0, len(pieces), self.interleave):
            window = pieces[w:w + self.interleave]
            lengths = [b - a for _, a, b in window]
            n = sum(lengths)
            if start >= at + n:
                at += n
                continue
            skip, at = max(0, start - at), at + n
            if self.remote and self.download_ahead:  # the stream's next window, ahead
                nxt = pieces[w + self.interleave:w + self.interleave + self.download_ahead]
                self._ahead[stream] = [u for u in (self.shards[p[0]] for p in nxt)
                                       if is_remote(u)]
                self.cache().want([u for urls in self._ahead.values() for u in urls])
            key = merge_key(self.seed, epoch, stream, w)
            done = merge_offsets(key, lengths, skip) if skip else [0] * len(window)
            left = [n_ - d for n_, d in zip(lengths, done)]
            readers: list[Iterator[Any] | None] = [None] * len(window)
            try:
                for i, (shard, a, _) in enumerate(window):
                    if left[i]:
                        readers[i] = self._reader(shard, a + done[i])
                for labels in window_labels(key, lengths, skip):
                    for i in labels.tolist():
                        shard, a, b = window[i]
                        try:
                            record = next(readers[i])
                        except StopIteration:
                            raise SampleError(
                                f"rank {self.rank}: shard {self.shards[shard]!r} (#{shard}) "
                                f"ended at record {b - left[i]}, but sizes= says it has "
                                f"{self.sizes[shard]}: give the true record counts") from None
                        except Exception as e:
                            raise self._read_error(shard, b - left[i], e) from e
                        left[i] -= 1
                        if not left[i]:
                            if b == self.sizes[shard] and next(readers[i], _END) is not _END:
                                raise SampleError(
                                    f"rank {self.rank}: shard {self.shards[shard]!r} (#{shard}) "
                                    f"has more records than sizes= says ({self.sizes[shard]}): "
                                    "give the true record counts")
                            readers[i] = None
                            self._release(shard)
                        yield record
            finally:
                for i, r in enumerate(readers):
                    if r is not None:
                        self._release(window[i][0])

    def canonical_state(self, steps: int, base: dict[str, Any] | None, world: int,
                        workers: int, local: dict[int, Any]) -> dict[str, Any]:
        """The position after ``steps`` batches of this epoch on every rank: a count, so it
        needs no other rank's word. ``local`` (this rank's consumers' own offsets) is checked
        against it: a difference is a bug, never a silent resume."""
        resume = self._normalise(base) if base is not None else None
        lay = self.layout(world, workers, resume)
        positions = lay.positions(max(0, steps - lay.start))
        for c, st in local.items():
            for s, off in (st or {}).get("streams", ()):
                if positions[s] != off:
                    raise RuntimeError(
                        f"rank {self.rank}: consumer {c} read stream {s} to record {off}, but "
                        f"the canonical layout says {positions[s]} after {steps} steps; the "
                        "position cannot be saved exactly (please report this bug)")
        r, k = self.canonical or (0, 0)
        return {"type": _STATE_TYPE, "version": _STATE_VERSION, "layout": "canonical",
                "epoch": self.epoch, "shards": len(self.shards), "seed": self.seed,
                "shuffle": self.shuffle, "canonical": [r, k], "interleave": self.interleave,
                "sizes": _digest(self.sizes), "step": steps,
                "global_batch": lay.global_batch, "positions": positions}

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This consumer's position as of the samples it yielded (inside its worker)."""
        consumer, consumers = self._consumer
        if self.canonical is not None:
            return {"consumer": consumer, "consumers": consumers, "epoch": self.epoch,
                    "streams": sorted([s, o] for s, o in self._own.items())}
        return {"consumer": consumer, "consumers": consumers, "epoch": self.epoch,
                "finished": list(self._finished), "offsets": list(self._offsets.items()),
                "yielded": self._yielded}

    def merge_states(self, states: Sequence[dict[str, Any] | None], consumers: int,
                     base: dict[str, Any] | None = None) -> dict[str, Any]:
        """All consumers' states (``None``: nothing handed out yet) of a pass that resumed
        from ``base`` (a merged state, or None), as one state that says which shards are done
        and where the ones in progress stand - whatever the layout that made it."""
        base = self._normalise(base) if base is not None else None
        if base is not None and base["epoch"] != self.epoch:
            base = None
        done = set(base["done"]) if base else set()
        partial = dict(base["partial"]) if base else {}
        for c, st in enumerate(states):
            if st is None:
                continue
            plan = self._plan(c, consumers, base)
            for i in st["finished"]:
                done.add(plan[i][0])
                partial.pop(plan[i][0], None)
            for i, offset in st["offsets"]:
                if offset > 0:
                    partial[plan[i][0]] = offset
        redealt = base is not None and (base["redealt"] or base["consumers"] != consumers)
        return {"type": _STATE_TYPE, "version": _STATE_VERSION, "epoch": self.epoch,
                "shards": len(self.shards), "seed": self.seed, "shuffle": self.shuffle,
                "consumers": consumers, "redealt": redealt, "done": _ranges(sorted(done)),
                "partial": sorted([s, o] for s, o in partial.items()),
                "yielded": [st["yielded"] if st else 0 for st in states]}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Make the next iteration resume from a merged state (``None``: start afresh)."""
        if state is None:
            self._resume = None
            return
        self._resume = self._normalise(state)
        self.epoch = self._resume["epoch"]

    def _normalise(self, state: Any) -> dict[str, Any]:
        """Validate a merged state; return it with ``done`` as a set and ``partial`` a dict."""
        if not isinstance(state, dict) or state.get("type") != _STATE_TYPE:
            raise ValueError(f"not a ShardedDataset state: {state!r:.200}")
        if (state.get("layout") == "canonical") != (self.canonical is not None):
            saved = (f"canonical_ranks={state['canonical'][0]}, canonical_workers="
                     f"{state['canonical'][1]}" if state.get("layout") == "canonical"
                     and isinstance(state.get("canonical"), list) else "no canonical layout")
            raise ValueError(f"the ShardedDataset state was saved with {saved}, but this "
                             f"dataset has canonical={self.canonical!r}; build it as it was "
                             "saved to resume")
        if self.canonical is not None:
            return self._normalise_canonical(state)
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"ShardedDataset state version {state.get('version')!r} is not "
                             f"supported (expected {_STATE_VERSION})")
        for key, mine in (("shards", len(self.shards)), ("seed", self.seed),
                          ("shuffle", self.shuffle)):
            if state.get(key) != mine:
                raise ValueError(f"the ShardedDataset state was saved with {key}="
                                 f"{state.get(key)!r}, but this dataset has {key}={mine!r}; "
                                 f"build it with {key}={state.get(key)!r}")
        try:
            consumers = int(state["consumers"])
            n = len(self.shards)
            done = {s for a, b in state["done"] for s in range(int(a), int(b))}
            partial = {int(s): int(o) for s, o in state["partial"]}
            yielded = [int(y) for y in state["yielded"]]
            ok = (consumers >= 1 and len(yielded) == consumers and all(
                0 <= s < n for s in (*done, *partial)) and all(o >= 0 for o in partial.values())
                and isinstance(state["redealt"], bool) and int(state["epoch"]) >= 0)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError("invalid ShardedDataset state: expected 'consumers', 'done' "
                             "(ranges of shard indices), 'partial' ([shard, offset] pairs), "
                             "'yielded' (one per consumer), 'redealt' and 'epoch'")
        return {"epoch": int(state["epoch"]), "consumers": consumers,
                "redealt": state["redealt"], "done": done, "partial": partial,
                "yielded": yielded}

    def _normalise_canonical(self, state: dict[str, Any]) -> dict[str, Any]:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"ShardedDataset state version {state.get('version')!r} is not "
                             f"supported (expected {_STATE_VERSION})")
        for key, mine in (("shards", len(self.shards)), ("seed", self.seed),
                          ("shuffle", self.shuffle), ("canonical", list(self.canonical or ())),
                          ("interleave", self.interleave), ("sizes", _digest(self.sizes))):
            if state.get(key) != mine:
                saved, now = state.get(key), mine
                if key == "canonical" and isinstance(saved, list) and len(saved) == 2:
                    r, k = self.canonical or (0, 0)
                    saved, now = (f"canonical_ranks={saved[0]}, canonical_workers={saved[1]}",
                                  f"canonical_ranks={r}, canonical_workers={k}")
                else:
                    saved, now = f"{key}={saved!r}", f"{key}={now!r}"
                what = "other shard sizes than this dataset's" if key == "sizes" else \
                    f"{saved}, but this dataset has {now}"
                raise ValueError(f"the ShardedDataset state was saved with {what}: its "
                                 "positions would name other records. Build the dataset as "
                                 "it was saved")
        try:
            positions = [int(p) for p in state["positions"]]
            r, k = self.canonical or (1, 1)
            ok = (len(positions) == r * k and all(p >= 0 for p in positions)
                  and int(state["step"]) >= 0 and int(state["epoch"]) >= 0)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError("invalid canonical ShardedDataset state: expected 'epoch', "
                             "'step' and 'positions' (one offset per canonical stream)")
        return {"epoch": int(state["epoch"]), "step": int(state["step"]),
                "positions": positions}


def _digest(values: Any) -> str:
    return hashlib.blake2b(repr(values).encode(), digest_size=8).hexdigest()


def _ranges(values: list[int]) -> list[list[int]]:
    """Sorted ints as [start, stop) ranges: a compact "which shards are done"."""
    out: list[list[int]] = []
    for v in values:
        if out and out[-1][1] == v:
            out[-1][1] = v + 1
        else:
            out.append([v, v + 1])
    return out
