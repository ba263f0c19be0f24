"""The one shard reader of a `ShardedDataset`: opens a shard at any record (seeking when
``read`` takes ``start=``, else skipping), pins remote shards in the local cache while they are
read and releases them after, merges the open shards of a plan record by record (the seeded
interleave) and shuffles a stream through a buffer.

Every draw of the interleave is a pure function of the shards' progress and the draw count,
so a resume on the same deal replays the very same stream.
"""
from __future__ import annotations

import bisect
import inspect
import itertools
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from ..errors import DataTimeoutError, SampleError, ShardingError
from .deal import Entry
from .remote import ShardCache, is_remote, local_path

__all__ = ["ShardReader", "Tally"]


class Tally:
    """A consumer's progress in the pass it reads, as it reads: plan entries read to their
    end, records consumed of the open ones (offsets within their shards), records yielded."""

    def __init__(self) -> None:
        self.finished: set[int] = set()
        self.offsets: dict[int, int] = {}
        self.yielded = 0


class ShardReader:
    """Reads ``shards`` through ``read``; remote ones (URLs) through a `ShardCache` made in
    the process that reads (a DataLoader worker). ``rank`` and ``consumer`` (consumer,
    consumers) say who reads, in the errors."""

    def __init__(self, shards: list[Any], read: Callable[..., Iterable[Any]], *,
                 sizes: list[int] | None, seed: int, interleave: int, shuffle_buffer: int,
                 cache_dir: str, cache_limit: int, storage_options: dict[str, Any] | None,
                 download_ahead: int, timeout: float | None) -> None:
        self.shards = shards
        self.read = read
        self.sizes = sizes
        self.seed = seed
        self.interleave = interleave
        self.shuffle_buffer = shuffle_buffer
        self.cache_dir = cache_dir
        self.cache_limit = cache_limit
        self.storage_options = storage_options
        self.download_ahead = download_ahead
        self.timeout = timeout
        self.remote = any(is_remote(x) for x in shards)
        self._cache: ShardCache | None = None  # made in the process that reads (a worker)
        try:
            self._seeks = "start" in inspect.signature(read).parameters
        except (TypeError, ValueError):
            self._seeks = False
        self.rank = 0
        self.consumer = (0, 1)  # (consumer, consumers) of the current iteration

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = None  # threads and locks stay in their process
        return state

    # -- one shard --------------------------------------------------------------------------
    def cache(self) -> ShardCache:
        """The local cache of remote shards (one per process)."""
        if self._cache is None:
            self._cache = ShardCache(self.cache_dir, self.cache_limit, self.storage_options,
                                     timeout=self.timeout)
        self._cache.timeout = self.timeout or None  # as set now (a loader may pass its own)
        return self._cache

    def open(self, shard: int, start: int) -> Iterator[Any]:
        """Shard ``shard``'s records from the ``start``-th on (downloaded first if remote,
        and pinned in the cache until `release`)."""
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
            raise self.read_error(shard, start, e) from e

    def release(self, shard: int) -> None:
        """Unpin a shard done with (or abandoned): the cache may evict it again."""
        where = self.shards[shard]
        if is_remote(where) and self._cache is not None:
            self._cache.release(where)

    def want(self, urls: Sequence[str]) -> None:
        """Download these shards ahead, in the background (remote data only)."""
        self.cache().want(list(urls))

    def want_none(self) -> None:
        """Nothing ahead any more: the end of a pass (also one that ends early)."""
        if self.remote and self._cache is not None:
            self._cache.want([])

    def read_error(self, shard: int, offset: int, e: Exception) -> SampleError:
        return SampleError(
            f"rank {self.rank} (consumer {self.consumer[0]} of {self.consumer[1]}): "
            f"reading shard {self.shards[shard]!r} (#{shard}) failed at sample "
            f"{offset}: {type(e).__name__}: {e}")

    # -- a plan: the interleave -----------------------------------------------------------------
    def samples(self, plan: list[Entry], tally: Tally, epoch: int, draws: int,
                redealt: bool = False) -> Iterator[Any]:
        """A consumer's records: ``interleave`` of its shards open at once (the first
        unfinished ones of its plan), each draw taking the next record of one of them chosen
        by a seeded generator - a pure function of the shards' progress and the draw count,
        so a resume on the same layout continues the very same stream. ``draws``: the draws
        made before (replayed on the generator); ``tally`` counts the progress."""
        consumer, consumers = self.consumer
        rng = random.Random(f"{self.seed}:{epoch}:{consumer}:{consumers}:{int(redealt)}")
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
                shard, start = plan[i]
                tally.offsets[i] = start
                entry = [i, self.open(shard, start), None]
                if self._advance(plan, tally, entry):
                    opened.append(entry)
                    left.append(max(1, sizes[plan[i][0]] - start) if sizes is not None else 1)
            if remote and self.download_ahead:
                ahead = (self.shards[plan[j][0]] for j in range(nxt, len(plan)))
                self.want(list(itertools.islice(
                    (u for u in ahead if is_remote(u)), self.download_ahead)))

        try:
            fill()
            yield from self._draw(plan, tally, rng, opened, left, fill)
        finally:  # also a pass that ends early: its open shards may be evicted again
            for entry in opened:
                self.release(plan[entry[0]][0])
            self.want_none()

    def _draw(self, plan: list[Entry], tally: Tally, rng: random.Random,
              opened: list[list[Any]], left: list[int],
              fill: Callable[[], None]) -> Iterator[Any]:
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
            tally.offsets[entry[0]] += 1
            left[k] = max(1, left[k] - 1)
            if not self._advance(plan, tally, entry):
                del opened[k]
                del left[k]
                fill()
            yield record

    def _advance(self, plan: list[Entry], tally: Tally, entry: list[Any]) -> bool:
        """Pre-read ``entry``'s next record; False (and the shard finished) at its end."""
        i = entry[0]
        try:
            entry[2] = next(entry[1])
            return True
        except StopIteration:
            tally.finished.add(i)
            tally.offsets.pop(i, None)
            self.release(plan[i][0])
            return False
        except Exception as e:
            raise self.read_error(plan[i][0], tally.offsets[i], e) from e

    # -- a stream -----------------------------------------------------------------------------
    def shuffled(self, samples: Iterator[Any], epoch: int) -> Iterator[Any]:
        """``samples`` through a seeded buffer of ``shuffle_buffer`` records (each once)."""
        rng = random.Random(f"{self.seed}:{epoch}:{self.consumer[0]}")
        buf: list[Any] = []
        for sample in samples:
            buf.append(sample)
            if len(buf) >= self.shuffle_buffer:
                k = rng.randrange(len(buf))
                buf[k], buf[-1] = buf[-1], buf[k]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf

    @staticmethod
    def counted(samples: Iterator[Any], tally: Tally) -> Iterator[Any]:
        """``samples``, counting those yielded in ``tally``."""
        for sample in samples:
            tally.yielded += 1
            yield sample
