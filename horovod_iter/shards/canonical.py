"""The canonical layout of a `ShardedDataset`: an epoch's record order that does not depend on
how many ranks and workers read it (Mosaic Streaming's "canonical nodes", for our shards).

The records of an epoch - its shards in the epoch's order, ``sizes`` each - are cut into
``streams = ranks x workers`` *canonical streams* of equal length (+-1 record), at record
boundaries, so a shard may be split between two streams (read with ``start=``). A stream is
read window by window, ``interleave`` pieces at once, each window a uniformly random merge of
its pieces (block by block: the records each piece gives to a block are a multivariate
hypergeometric draw, their order within the block a seeded permutation), so any position of
a stream maps to per-piece offsets without reading anything.

Canonical step ``k`` takes ``global_batch / ranks`` records from stream ``(rho, k mod workers)``
of every canonical rank ``rho``. A physical world of ``W`` ranks x ``w`` workers reads it when
``W`` divides ``ranks`` and ``w`` divides ``workers``: rank ``r`` owns canonical ranks
``[r*ranks/W, (r+1)*ranks/W)``, and its worker ``j`` the streams it needs for the steps torch's
DataLoader asks of it (``j, j+w, ...``). So the set of records of global step ``k`` is the same
for any such world, and a position is a count: after ``h`` batches every stream's offset follows
from the layout (`positions`), on any rank, without asking the others.

Everything here is a pure function of its arguments; no I/O.
"""
from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import SampleError
from .deal import STATE_TYPE, STATE_VERSION, shard_order
from .reader import ShardReader
from .remote import is_remote

__all__ = ["CanonicalPosition", "CanonicalStreams", "Layout", "check_world", "close_streams",
           "merge_key", "merge_offsets", "sizes_digest", "stream_lengths", "stream_pieces",
           "stream_position", "window_labels"]

BLOCK = 1024  # records per block of a window's merge
_END = object()

#: one piece of a stream: (shard, first record, stop)
Piece = tuple[int, int, int]


@dataclass(frozen=True)
class CanonicalPosition:
    """Where a pass of the canonical layout stands: global ``step`` of ``epoch``, and every
    stream's offset then (a count: any rank computes it without asking the others)."""

    epoch: int
    step: int
    positions: tuple[int, ...]

    def to_state(self, identity: Mapping[str, Any], global_batch: int) -> dict[str, Any]:
        """The saved form (plain JSON); ``identity``: what the positions are counted in
        (shards, seed, shuffle, canonical, interleave, sizes digest), checked at a load."""
        return {"type": STATE_TYPE, "version": STATE_VERSION, "layout": "canonical",
                "epoch": self.epoch, **identity, "step": self.step,
                "global_batch": global_batch, "positions": list(self.positions)}

    @classmethod
    def from_state(cls, state: Mapping[str, Any],
                   identity: Mapping[str, Any]) -> CanonicalPosition:
        """Validate a saved position against the dataset's ``identity`` (as `to_state`
        takes it): a `ValueError` names what differs."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"ShardedDataset state version {state.get('version')!r} is not "
                             f"supported (expected {STATE_VERSION})")
        r, k = identity["canonical"]
        for key, mine in identity.items():
            if state.get(key) != mine:
                saved, now = state.get(key), mine
                if key == "canonical" and isinstance(saved, list) and len(saved) == 2:
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
            ok = (len(positions) == r * k and all(p >= 0 for p in positions)
                  and int(state["step"]) >= 0 and int(state["epoch"]) >= 0)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError("invalid canonical ShardedDataset state: expected 'epoch', "
                             "'step' and 'positions' (one offset per canonical stream)")
        return cls(int(state["epoch"]), int(state["step"]), tuple(positions))


def sizes_digest(sizes: Any) -> str:
    """A short digest of the shards' sizes (a saved position is counted in them)."""
    return hashlib.blake2b(repr(sizes).encode(), digest_size=8).hexdigest()


@dataclass(frozen=True)
class Layout:
    """One physical reading of the canonical streams: ``world`` ranks x ``workers`` workers,
    ``global_batch`` records per step, starting at canonical step ``start`` from stream
    offsets ``base``."""

    ranks: int           # canonical ranks
    kinds: int           # canonical workers (stream kinds: step k uses kind k mod kinds)
    lengths: tuple[int, ...]  # records of each stream
    world: int
    workers: int
    global_batch: int
    start: int = 0
    base: tuple[int, ...] | None = None
    drop_last: bool = False

    @property
    def per_stream(self) -> int:
        """Records a stream gives to one step."""
        return self.global_batch // self.ranks

    def own_ranks(self, rank: int) -> range:
        n = self.ranks // self.world
        return range(rank * n, (rank + 1) * n)

    def own_kinds(self, worker: int) -> list[int]:
        """The stream kinds worker ``worker`` reads: those of the steps it is asked for."""
        return [(self.start + worker + self.workers * i) % self.kinds
                for i in range(self.kinds // self.workers)]

    def offsets(self) -> list[int]:
        return list(self.base) if self.base is not None else [0] * len(self.lengths)

    def steps(self, rank: int, worker: int) -> list[int]:
        """The kinds of the batches (in order) that consumer ``(rank, worker)`` yields:
        its steps ``worker, worker + w, ...`` of this pass, skipping those where all its
        streams are done (and, with ``drop_last``, ending at the first short one)."""
        b, base = self.per_stream, self.offsets()
        firsts, uses, full = [], [], []
        for kind in self.own_kinds(worker):
            left = [self.lengths[s] - base[s] for s in self.streams_of(rank, kind)]
            firsts.append((kind - self.start) % self.kinds)  # its first pass step
            uses.append(max(-(-n // b) for n in left))
            full.append(min(n // b for n in left))
        steps = np.concatenate([np.arange(u, dtype=np.int64) * self.kinds + f
                                for f, u in zip(firsts, uses)] or [np.zeros(0, np.int64)])
        kinds = np.concatenate([np.full(u, i, dtype=np.int64) for i, u in enumerate(uses)]
                               or [np.zeros(0, np.int64)])
        order = np.argsort(steps, kind="stable")
        steps, kinds = steps[order], kinds[order]
        if self.drop_last and len(steps):
            use = (steps - np.asarray(firsts)[kinds]) // self.kinds
            short = np.nonzero(use >= np.asarray(full)[kinds])[0]
            if len(short):
                kinds = kinds[:short[0]]
        own = self.own_kinds(worker)
        return [own[i] for i in kinds.tolist()]

    def streams_of(self, rank: int, kind: int) -> list[int]:
        """The streams a batch of ``kind`` of rank ``rank`` takes records from."""
        return [rho * self.kinds + kind for rho in self.own_ranks(rank)]

    def batch(self, rank: int, kind: int, offsets: Sequence[int]) -> list[tuple[int, int]]:
        """(stream, records) of a batch of ``kind`` at the streams' ``offsets``."""
        b = self.per_stream
        return [(s, min(b, self.lengths[s] - offsets[s])) for s in self.streams_of(rank, kind)
                if self.lengths[s] > offsets[s]]

    def positions(self, handed: int) -> list[int]:
        """Every stream's offset after each rank handed ``handed`` batches of this pass (a
        rank that ran out handed all of its own): the round robin of torch's DataLoader over
        its workers, which skips a worker that is done."""
        out = self.offsets()
        for rank in range(self.world):
            plans = [self.steps(rank, j) for j in range(self.workers)]
            for j, t in enumerate(_round_robin(handed, [len(p) for p in plans])):
                self._advance(rank, plans[j][:t], out)
        return out

    def _advance(self, rank: int, kinds: Sequence[int], out: list[int]) -> None:
        """Move ``out`` past batches of these kinds (a stream gives ``per_stream`` records to
        each batch of its kind, or what it has left)."""
        for kind, n in Counter(kinds).items():
            for s in self.streams_of(rank, kind):
                out[s] = min(self.lengths[s], out[s] + n * self.per_stream)

    def rank_batches(self, rank: int) -> int:
        return sum(len(self.steps(rank, j)) for j in range(self.workers))

    def worker_records(self, rank: int, worker: int) -> int:
        base = self.offsets()
        out = list(base)
        self._advance(rank, self.steps(rank, worker), out)
        return sum(out) - sum(base)


def _round_robin(handed: int, counts: list[int]) -> list[int]:
    """Batches taken from each worker when ``handed`` were taken in turn, skipping the
    workers that have none left."""
    handed = min(handed, sum(counts))
    lo, hi = 0, max(counts, default=0)
    while lo < hi:  # the most full rounds that fit
        mid = (lo + hi + 1) // 2
        if sum(min(mid, c) for c in counts) <= handed:
            lo = mid
        else:
            hi = mid - 1
    taken = [min(lo, c) for c in counts]
    rest = handed - sum(taken)
    for j, c in enumerate(counts):
        if rest and c > lo:
            taken[j] += 1
            rest -= 1
    return taken


def check_world(ranks: int, kinds: int, world: int, workers: int, global_batch: int | None,
                records: int) -> None:
    """Refuse a physical world that cannot read the canonical layout (on every rank alike)."""
    if ranks % world:
        ok = [d for d in range(1, ranks + 1) if ranks % d == 0]
        raise ValueError(
            f"the canonical layout has canonical_ranks={ranks}, which {world} ranks cannot "
            f"share evenly: run on a world size that divides it ({ok}), or build the dataset "
            f"with canonical_ranks a multiple of {world} (a new layout: another order)")
    if kinds % workers:
        ok = [d for d in range(1, kinds + 1) if kinds % d == 0]
        raise ValueError(
            f"the canonical layout has canonical_workers={kinds}, which num_workers="
            f"{workers} cannot share evenly: use num_workers in {ok} (0 counts as 1), or build "
            f"the dataset with canonical_workers a multiple of {workers}")
    if global_batch is not None and (global_batch % ranks or global_batch < ranks):
        raise ValueError(
            f"global batch size {global_batch} is not a multiple of canonical_ranks={ranks}: "
            f"each canonical rank gives the same number of records to a step. Use a global "
            f"batch size that is a multiple of {ranks}")
    if records < ranks * kinds:
        raise ValueError(f"the canonical layout needs at least canonical_ranks x "
                         f"canonical_workers = {ranks * kinds} records, the data has {records}")


def stream_lengths(total: int, streams: int, epoch: int = 0) -> list[int]:
    """Records of each stream in ``epoch``: ``total // streams``, and one more for
    ``total % streams`` of them - which ones rotates with the epoch, so that over epochs every
    stream has as many records (a stream read at the same rate as the others, through its
    epochs one after another, then favours none of them)."""
    q, rem = divmod(total, streams)
    return [q + (((c - epoch * rem) % streams) < rem) for c in range(streams)]


def stream_position(total: int, streams: int, stream: int, start: int) -> tuple[int, int]:
    """(epoch, offset) of record ``start`` of ``stream`` read through its epochs in turn."""
    rem = total % streams
    period = streams // math.gcd(streams, rem) if rem else 1
    per = [stream_lengths(total, streams, e)[stream] for e in range(period)]
    full, start = divmod(start, sum(per))
    e = full * period
    for n in per:
        if start < n:
            break
        start -= n
        e += 1
    return e, start


def stream_pieces(order: Sequence[int], sizes: Sequence[int], streams: int,
                  epoch: int = 0) -> list[list[tuple[int, int, int]]]:
    """Each stream's pieces ``(shard, start, stop)``: the epoch's records (shards in
    ``order``) cut into ``streams`` runs of equal length (+-1, see `stream_lengths`)."""
    total = sum(sizes[s] for s in order)
    bounds = np.cumsum([0, *stream_lengths(total, streams, epoch)]).tolist()
    out: list[list[tuple[int, int, int]]] = [[] for _ in range(streams)]
    c, at = 0, 0
    for s in order:
        n, lo = sizes[s], 0
        while lo < n:
            while bounds[c + 1] <= at:
                c += 1
            take = min(n - lo, bounds[c + 1] - at)
            out[c].append((s, lo, lo + take))
            lo += take
            at += take
    return out


def merge_key(seed: int, epoch: int, stream: int, window: int) -> list[int]:
    """The seed of one window's merge."""
    return [seed % (1 << 64), epoch, stream, window]


def _counts(key: list[int], lengths: Sequence[int]) -> Iterator[np.ndarray]:
    """The records each piece gives to each block of a window's merge."""
    rng = np.random.Generator(np.random.PCG64(key))
    left = np.asarray(lengths, dtype=np.int64)
    total = int(left.sum())
    while total > 0:
        n = min(BLOCK, total)
        counts = left.copy() if n == total else rng.multivariate_hypergeometric(left, n)
        left -= counts
        total -= n
        yield counts


def window_labels(key: list[int], lengths: Sequence[int],
                  start: int = 0) -> Iterator[np.ndarray]:
    """The window's merge from record ``start`` on, block by block: which piece each record
    comes from (a uniformly random merge of the pieces, each read in order)."""
    skip_blocks, skip = divmod(start, BLOCK)
    for b, counts in enumerate(_counts(key, lengths)):
        if b < skip_blocks:
            continue
        labels = np.repeat(np.arange(len(lengths), dtype=np.int32), counts)
        perm = np.random.Generator(np.random.PCG64([*key, b])).permutation(labels)
        yield perm[skip:] if b == skip_blocks else perm
        skip = 0


def merge_offsets(key: list[int], lengths: Sequence[int], start: int) -> list[int]:
    """Records of each piece that come before record ``start`` of the window's merge."""
    out = np.zeros(len(lengths), dtype=np.int64)
    full, part = divmod(start, BLOCK)
    for b, counts in enumerate(_counts(key, lengths)):
        if b < full:
            out += counts
            continue
        if part:
            labels = np.repeat(np.arange(len(lengths), dtype=np.int32), counts)
            perm = np.random.Generator(np.random.PCG64([*key, b])).permutation(labels)
            out += np.bincount(perm[:part], minlength=len(lengths))
        break
    return out.tolist()


def close_streams(streams: Iterable[Iterator[Any]]) -> None:
    """Close the stream iterators a pass opened (`CanonicalStreams.stream`, or generators
    over them): one left mid-way releases its shard reader now, not when it is collected."""
    for it in streams:
        close = getattr(it, "close", None)
        if close is not None:
            close()


class CanonicalStreams:
    """The ``ranks x workers`` canonical streams of a dataset's epochs, read through its
    `ShardReader`: each epoch's pieces (the last epoch's kept) and any stream's records from
    any position - `stream`, the entry `MixedStream` reads its sources through."""

    def __init__(self, reader: ShardReader, shuffle: bool, ranks: int, workers: int) -> None:
        if reader.sizes is None:
            raise ValueError("canonical streams are cut by the shards' record counts: pass "
                             "sizes=")
        self.reader = reader
        self.sizes: list[int] = reader.sizes
        self.shuffle = shuffle
        self.count = ranks * workers
        self._pieces: tuple[int, list[list[Piece]]] | None = None
        self._ahead: dict[int, list[str]] = {}  # a stream's shards to download ahead

    def pieces(self, epoch: int) -> list[list[Piece]]:
        """Each stream's pieces ``(shard, start, stop)`` in ``epoch``."""
        cached = self._pieces
        if cached is None or cached[0] != epoch:
            r = self.reader
            order = shard_order(len(r.shards), self.shuffle, r.seed, epoch)
            cached = (epoch, stream_pieces(order, self.sizes, self.count, epoch))
            self._pieces = cached
        return cached[1]

    def lengths(self, epoch: int) -> tuple[int, ...]:
        """Records of each stream in ``epoch``."""
        return tuple(sum(b - a for _, a, b in p) for p in self.pieces(epoch))

    def forget_ahead(self) -> None:
        """A new pass: no stream's shards are wanted ahead yet."""
        self._ahead = {}

    def stream(self, j: int, epoch: int, start: int = 0) -> Iterator[Any]:
        """Stream ``j`` of ``epoch`` from its record ``start`` on: window after window of
        ``interleave`` pieces, each a seeded uniformly random merge of its pieces. A shard
        that has fewer or more records than ``sizes`` says is a `SampleError`."""
        return self._read(j, self.pieces(epoch)[j], start, epoch)

    def _read(self, stream: int, pieces: list[Piece], start: int,
              epoch: int) -> Iterator[Any]:
        rd = self.reader
        at = 0
        for w in range(0, len(pieces), rd.interleave):
            window = pieces[w:w + rd.interleave]
            lengths = [b - a for _, a, b in window]
            n = sum(lengths)
            if start >= at + n:
                at += n
                continue
            skip, at = max(0, start - at), at + n
            if rd.remote and rd.download_ahead:  # the stream's next window, ahead
                nxt = pieces[w + rd.interleave:w + rd.interleave + rd.download_ahead]
                self._ahead[stream] = [u for u in (rd.shards[p[0]] for p in nxt)
                                       if is_remote(u)]
                rd.want([u for urls in self._ahead.values() for u in urls])
            key = merge_key(rd.seed, epoch, stream, w)
            done = merge_offsets(key, lengths, skip) if skip else [0] * len(window)
            left = [n_ - d for n_, d in zip(lengths, done)]
            readers: list[Iterator[Any] | None] = [None] * len(window)
            try:
                for i, (shard, a, _) in enumerate(window):
                    if left[i]:
                        readers[i] = rd.open(shard, a + done[i])
                for labels in window_labels(key, lengths, skip):
                    for i in labels.tolist():  # the per-record path: nothing but the read
                        try:
                            record = next(readers[i])
                        except StopIteration:
                            shard, a, b = window[i]
                            raise SampleError(
                                f"rank {rd.rank}: shard {rd.shards[shard]!r} (#{shard}) "
                                f"ended at record {b - left[i]}, but sizes= says it has "
                                f"{self.sizes[shard]}: give the true record counts") from None
                        except Exception as e:
                            shard, a, b = window[i]
                            raise rd.read_error(shard, b - left[i], e) from e
                        left[i] -= 1
                        if not left[i]:
                            shard, a, b = window[i]
                            if b == self.sizes[shard] and next(readers[i], _END) is not _END:
                                raise SampleError(
                                    f"rank {rd.rank}: shard {rd.shards[shard]!r} (#{shard}) "
                                    f"has more records than sizes= says ({self.sizes[shard]}): "
                                    "give the true record counts")
                            readers[i] = None
                            rd.release(shard)
                        yield record
            finally:
                for i, r in enumerate(readers):
                    if r is not None:
                        rd.release(window[i][0])
