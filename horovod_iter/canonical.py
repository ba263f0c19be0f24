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

import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Layout", "check_world", "merge_key", "merge_offsets", "stream_lengths", "stream_pieces",
           "stream_position", "window_labels"]

BLOCK = 1024  # records per block of a window's merge


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
            left = [self.lengths[s] - base[s] for s in self._streams(rank, kind)]
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

    def _streams(self, rank: int, kind: int) -> list[int]:
        return [rho * self.kinds + kind for rho in self.own_ranks(rank)]

    def batch(self, rank: int, kind: int, offsets: Sequence[int]) -> list[tuple[int, int]]:
        """(stream, records) of a batch of ``kind`` at the streams' ``offsets``."""
        b = self.per_stream
        return [(s, min(b, self.lengths[s] - offsets[s])) for s in self._streams(rank, kind)
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
            for s in self._streams(rank, kind):
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
