"""The epoch plan: which dataset index every rank reads at every slot, as a pure value.

An `EpochPlan` is frozen and computed from (n, seed, epoch, shuffle, pad, drop_last,
world, rank, start) alone: no collective, no I/O, no hidden state. It is the one place the
layout arithmetic lives; the sampler and the loader both read it, and an iteration freezes one
at ``iter()`` so that nothing (``set_epoch``, a load) changes a pass in flight.

Layout (torch's ``DistributedSampler``): the epoch's order from ``start`` on - the *segment*,
``remaining = n - start`` samples - is laid out as schedule positions; rank ``r`` takes
positions ``r, r + W, r + 2W, ...`` (its *slots* 0, 1, 2, ...). ``pad`` wraps around to make the
positions divisible by ``W`` (torch's rule); ``drop_last`` cuts the tail to be divisible;
with neither, ranks differ by at most one slot. Position ``q`` is sample ``start + q mod
remaining`` of the epoch's order, which is `permute()` of it.

Progress is a slot count ``k`` that is the same on every rank (every rank steps alike): the
first ``min(k W, total)`` positions are consumed, i.e. the first `done()` samples
of the epoch's order. A resize or a change of padding continues with a new segment that starts
there (`resegment()`): none repeated, none lost.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from .permutation import permute

__all__ = ["EpochPlan", "steps_for"]


def steps_for(count: int, batch_size: int, drop_last: bool) -> int:
    """Batches of ``batch_size`` in ``count`` samples (a short last one dropped or kept)."""
    count = max(0, count)
    return count // batch_size if drop_last else -(-count // batch_size)


@dataclass(frozen=True)
class EpochPlan:
    """One rank's view of an epoch's layout (see the module docstring)."""

    n: int
    world: int
    rank: int
    seed: int = 0
    epoch: int = 0
    shuffle: bool = True
    pad: bool = True
    drop_last: bool = False
    start: int = 0

    def __post_init__(self) -> None:
        if not (0 <= self.start <= self.n and self.world >= 1 and 0 <= self.rank < self.world):
            raise ValueError(f"invalid plan: start={self.start}, n={self.n}, "
                             f"world={self.world}, rank={self.rank}")

    @property
    def remaining(self) -> int:
        """Samples of the epoch's order in this segment."""
        return self.n - self.start

    @property
    def total(self) -> int:
        """Schedule positions over all ranks in this segment."""
        r, w = self.remaining, self.world
        if self.drop_last:
            return (r // w) * w
        return math.ceil(r / w) * w if self.pad else r

    def count(self, rank: int | None = None) -> int:
        """Slots of ``rank`` (default: this plan's) in this segment."""
        r = self.rank if rank is None else rank
        return max(0, (self.total - r + self.world - 1) // self.world)

    @property
    def counts(self) -> tuple[int, ...]:
        """Slots of every rank in this segment."""
        return tuple(self.count(r) for r in range(self.world))

    @property
    def max_count(self) -> int:
        """Slots of the longest rank: a slot count this large means the segment is done."""
        return -(-self.total // self.world)

    def indices(self, first: int, stop: int) -> np.ndarray:
        """This rank's dataset indices for slots ``[first, stop)``, as an int64 array
        (clipped to the rank's slots). O(stop - first)."""
        stop = min(stop, self.count())
        if stop <= first:
            return np.empty(0, dtype=np.int64)
        q = self.rank + self.world * np.arange(first, stop, dtype=np.int64)
        if q[-1] >= self.remaining:  # padding wraps around to the segment's first samples
            q %= self.remaining
        positions = q + self.start
        return permute(positions, self.n, self.seed, self.epoch) if self.shuffle else positions

    def consumed(self, slots: int) -> int:
        """Positions consumed after every rank took ``slots`` slots."""
        return min(max(0, slots) * self.world, self.total)

    def done(self, slots: int) -> int:
        """Samples of the epoch's order consumed after every rank took ``slots`` slots
        (counting from the epoch's start, not the segment's)."""
        return self.start + min(self.consumed(slots), self.remaining)

    def resegment(self, slots: int, *, world: int | None = None, rank: int | None = None,
                  pad: bool | None = None, drop_last: bool | None = None) -> EpochPlan:
        """The rest of the epoch after ``slots``, laid out anew (other world or padding)."""
        return dataclasses.replace(
            self, start=self.done(slots),
            world=self.world if world is None else world,
            rank=self.rank if rank is None else rank,
            pad=self.pad if pad is None else pad,
            drop_last=self.drop_last if drop_last is None else drop_last)
