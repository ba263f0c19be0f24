"""DistributedSampler: every rank a disjoint slice of an epoch-seeded order, O(1) memory,
exact and elastic resume.

Layout of an epoch (same as torch's ``DistributedSampler``): the epoch's order is laid out as a
sequence of *schedule positions*; rank ``r`` takes positions ``r, r + W, r + 2W, ...``. With
``pad=True`` the sequence is padded by wrapping around to be divisible by ``W`` (torch's rule);
with ``drop_last=True`` the tail is cut to be divisible; with ``pad=False`` it is not padded and
ranks differ by at most one sample. Position ``q`` maps to the ``q mod R``-th not yet consumed
sample of the epoch's order, which is :func:`horovod_iter.permutation.permute` of it.

Progress: the consumer reports what it consumed with :meth:`DistributedSampler.record` (the
loader does, for batches handed to the user; plain users call it per batch). Because every
rank consumes the same number of slots, the first ``k * W`` positions are then consumed, and the
state is identical on every rank. After a resize the unconsumed samples of the epoch form a new
*segment* that is laid out over the new world size: none repeated, none lost.
"""
from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping, Sized
from typing import Any

import numpy as np
import torch.utils.data

from . import backend as _backend
from .permutation import permute

__all__ = ["DistributedSampler"]

_STATE_TYPE = "horovod_iter.DistributedSampler"
_STATE_VERSION = 1
# state-dict keys, as constants so a typo cannot silently create a new key
_TYPE = "type"
_VERSION = "version"
_N = "n"
_SEED = "seed"
_EPOCH = "epoch"
_SHUFFLE = "shuffle"
_PAD = "pad"
_DROP_LAST = "drop_last"
_WORLD = "world_size"
_START = "start"
_CONSUMED = "consumed"
_SAMPLES_CONSUMED = "samples_consumed"
_INT_KEYS = (_N, _EPOCH, _WORLD, _START, _CONSUMED, _SAMPLES_CONSUMED)
_BOOL_KEYS = (_SHUFFLE, _PAD, _DROP_LAST)
_CHUNK = 1 << 16


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _dataset_length(dataset: Any) -> int:
    if _is_int(dataset):
        n = int(dataset)
    elif isinstance(dataset, Sized):
        n = len(dataset)
    else:
        raise TypeError(
            "dataset must be a sized dataset (with __len__) or an int length, got "
            f"{type(dataset).__name__}; for an IterableDataset use horovod_iter.shard() instead"
        )
    if n < 0:
        raise ValueError(f"dataset length must be >= 0, got {n}")
    return n


class DistributedSampler(torch.utils.data.Sampler[int]):
    """Drop-in for ``torch.utils.data.distributed.DistributedSampler``, ranked by Horovod.

    Each rank iterates a disjoint slice of an order shuffled from ``(seed, epoch)``, identical
    on every rank with no communication and O(1) memory in the dataset length. ``len()`` and,
    with ``shuffle=False``, every rank's order are exactly torch's.

    Args:
        dataset: a sized dataset, or its length as an int.
        num_replicas: number of ranks; defaults to the horovod_iter backend's size
            (Horovod, torch.distributed or 1).
        rank: this rank; defaults to the backend's rank.
        shuffle: shuffle the order each epoch (see :mod:`horovod_iter.permutation`).
        seed: int seed shared by all ranks; ``None`` lets rank 0 draw one and broadcast it.
        drop_last: cut the tail so that every rank gets ``floor(n / W)`` samples.
        pad: with ``drop_last=False``, pad by wrapping around so every rank gets
            ``ceil(n / W)`` samples (torch's behaviour); ``pad=False`` gives an exact partition
            with no duplicate (ranks differ by at most one sample), for evaluation.

    Call :meth:`set_epoch` at the start of every epoch, or every epoch has the same order.
    Report consumption with :meth:`record` to make :meth:`state_dict` mid-epoch exact.

    Example:
        >>> sampler = DistributedSampler(dataset, seed=42)
        >>> loader = DataLoader(dataset, batch_size=32, sampler=sampler)
        >>> for epoch in range(start_epoch, epochs):
        ...     sampler.set_epoch(epoch)
        ...     for batch in loader:
        ...         train_step(batch)
        ...         sampler.record(len(batch))   # only needed for mid-epoch checkpoints

    Raises:
        TypeError/ValueError: on a bad argument, naming it and the valid range.
    """

    def __init__(self, dataset: Any, num_replicas: int | None = None, rank: int | None = None,
                 shuffle: bool = True, seed: int | None = 0, drop_last: bool = False, *,
                 pad: bool = True) -> None:
        self.n = _dataset_length(dataset)
        if num_replicas is None or rank is None:
            b = _backend.get_backend()
            num_replicas = b.size if num_replicas is None else num_replicas
            rank = b.rank if rank is None else rank
        if not _is_int(num_replicas) or num_replicas < 1:
            raise ValueError(f"num_replicas must be an int >= 1, got {num_replicas!r}")
        if not _is_int(rank) or not 0 <= rank < num_replicas:
            raise ValueError(
                f"Invalid rank {rank!r}, rank should be in the interval [0, {num_replicas - 1}]"
            )
        for name, flag in (("shuffle", shuffle), ("drop_last", drop_last), ("pad", pad)):
            if not isinstance(flag, (bool, np.bool_)):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.pad = bool(pad)
        self._seed_from_broadcast = seed is None
        if seed is None:
            drawn = random.SystemRandom().randrange(2**63)
            seed = _backend.get_backend().broadcast_object(drawn, root=0)
        if not _is_int(seed):
            raise TypeError(f"seed must be an int (or None to draw one on rank 0), got {seed!r}")
        self.seed = int(seed)
        self.epoch = 0
        self._start = 0  # first not-consumed position of the epoch's order (segment start)
        self._slots = 0  # slots consumed per rank in the current segment
        # True after loading a state saved at the very end of an epoch: the next iteration
        # yields the (empty) rest instead of starting the epoch over.
        self._hold_finished = False

    # ---- layout of the current segment -------------------------------------------------
    def _remaining(self) -> int:
        return self.n - self._start

    def _total(self, remaining: int | None = None) -> int:
        """Schedule positions in the current segment (or one of ``remaining`` samples)."""
        r = self._remaining() if remaining is None else remaining
        w = self.num_replicas
        if self.drop_last:
            return (r // w) * w
        return math.ceil(r / w) * w if self.pad else r

    def _rank_count(self) -> int:
        """Slots this rank has in the current segment."""
        total, w = self._total(), self.num_replicas
        return max(0, (total - self.rank + w - 1) // w)

    def _consumed_positions(self) -> int:
        return min(self._slots * self.num_replicas, self._total())

    def _finished(self) -> bool:
        return self._consumed_positions() >= self._total() and self._slots >= self._rank_count()

    def _begin(self) -> int:
        """Start an iteration: the first slot to yield. A finished epoch starts over, as
        torch's sampler repeats an epoch, unless it was just loaded finished from a state."""
        if self._finished():
            if self._hold_finished:
                self._hold_finished = False
            else:
                self._start, self._slots = 0, 0
        return self._slots

    def indices(self, start: int, stop: int) -> np.ndarray:
        """This rank's dataset indices for slots ``[start, stop)`` of the current segment,
        as an int64 array (clipped to the rank's slot count). O(stop - start)."""
        stop = min(stop, self._rank_count())
        if stop <= start:
            return np.empty(0, dtype=np.int64)
        q = self.rank + self.num_replicas * np.arange(start, stop, dtype=np.int64)
        remaining = self._remaining()
        if q[-1] >= remaining:  # padding wraps around to the segment's first samples
            q %= remaining
        positions = q + self._start
        if not self.shuffle:
            return positions
        return permute(positions, self.n, self.seed, self.epoch)

    # ---- torch Sampler protocol ----------------------------------------------------------
    def __iter__(self) -> Iterator[int]:
        slot = self._begin()
        stop = self._rank_count()
        chunk = 256  # small first chunk: the first index comes in microseconds
        while slot < stop:
            end = min(stop, slot + chunk)
            yield from self.indices(slot, end).tolist()
            slot = end
            chunk = min(chunk * 4, _CHUNK)

    def __len__(self) -> int:
        """Number of indices the next ``iter()`` yields (torch's ``num_samples`` when fresh)."""
        return self.rank_lengths()[self.rank]

    def rank_lengths(self) -> list[int]:
        """Number of indices the next ``iter()`` yields on each rank (computed locally)."""
        start, slots = self._start, self._slots
        if self._finished() and not self._hold_finished:
            start, slots = 0, 0
        total, w = self._total(self.n - start), self.num_replicas
        return [max(0, (total - r + w - 1) // w - slots) for r in range(w)]

    @property
    def num_samples(self) -> int:
        """Samples this rank yields in a full epoch (torch's attribute)."""
        w = self.num_replicas
        return max(0, (self.total_size - self.rank + w - 1) // w)

    @property
    def total_size(self) -> int:
        """Schedule positions over all ranks in a full epoch (torch's attribute)."""
        w, n = self.num_replicas, self.n
        if self.drop_last:
            return (n // w) * w
        return math.ceil(n / w) * w if self.pad else n

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order. A new epoch starts from its beginning; setting the epoch
        the sampler is already in keeps its progress (so a resumed run may call it freely)."""
        if not _is_int(epoch) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        if int(epoch) != self.epoch:
            self.epoch = int(epoch)
            self._start, self._slots = 0, 0
            self._hold_finished = False

    def record(self, num_samples: int) -> None:
        """Report that each rank consumed ``num_samples`` more slots of the current iteration.

        Call it with the *nominal* per-rank batch size for every batch handed to the trainer,
        on every rank alike (also for a short or empty last batch); never for prefetched
        batches. :class:`horovod_iter.DistributedLoader` does this for you.
        """
        if not _is_int(num_samples) or num_samples < 0:
            raise ValueError(f"num_samples must be an int >= 0, got {num_samples!r}")
        self._slots = min(self._slots + int(num_samples), self._rank_count_max())

    def _rank_count_max(self) -> int:
        return math.ceil(self._total() / self.num_replicas)

    # ---- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """A small JSON-serialisable dict: the position as of the last :meth:`record`."""
        consumed = self._consumed_positions()
        return {
            _TYPE: _STATE_TYPE,
            _VERSION: _STATE_VERSION,
            _N: self.n,
            _SEED: self.seed,
            _EPOCH: self.epoch,
            _SHUFFLE: self.shuffle,
            _PAD: self.pad,
            _DROP_LAST: self.drop_last,
            _WORLD: self.num_replicas,
            _START: self._start,
            _CONSUMED: consumed,
            _SAMPLES_CONSUMED: self._start + min(consumed, self._remaining()),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume exactly where ``state`` was saved, in O(1).

        At the same world size the rest of the epoch is exactly what the saving run would
        have yielded next. At another world size the epoch's unconsumed samples are laid out
        anew over this sampler's ranks: none repeated, none lost. A sampler built with
        ``seed=None`` adopts the saved seed; otherwise seed, length, shuffle, pad and
        drop_last must match.
        """
        s = _validate_state(state)
        if s[_N] != self.n:
            raise ValueError(
                f"sampler state was saved for a dataset of length {s[_N]}, but this sampler has "
                f"length {self.n}; load it into a sampler over the same dataset"
            )
        if s[_SEED] != self.seed and not self._seed_from_broadcast:
            raise ValueError(
                f"sampler state was saved with seed={s[_SEED]}, but this sampler has "
                f"seed={self.seed}; construct it with seed={s[_SEED]} (or seed=None to adopt it)"
            )
        for key in _BOOL_KEYS:
            if s[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state was saved with {key}={s[key]}, but this sampler has "
                    f"{key}={getattr(self, key)}; construct it with {key}={s[key]}"
                )
        self.seed = s[_SEED]
        self.epoch = s[_EPOCH]
        self._start = s[_START]
        saved_world = s[_WORLD]
        # the saved segment's layout, to validate and interpret "consumed"
        rem = self.n - s[_START]
        if self.drop_last:
            saved_total = (rem // saved_world) * saved_world
        else:
            saved_total = math.ceil(rem / saved_world) * saved_world if self.pad else rem
        if s[_CONSUMED] > saved_total:
            raise ValueError(
                f"invalid sampler state: consumed={s[_CONSUMED]} exceeds the segment's "
                f"{saved_total} positions at world_size={saved_world}"
            )
        if saved_world == self.num_replicas:
            self._slots = -(-s[_CONSUMED] // saved_world)
        else:  # elastic: the unconsumed samples form a new segment over this world size
            self._start = s[_START] + min(s[_CONSUMED], rem)
            self._slots = 0
        self._hold_finished = self._finished() and (s[_CONSUMED] > 0 or s[_START] > 0)

    def set_world(self, num_replicas: int, rank: int) -> None:
        """Move to another world size keeping the epoch's progress (Horovod elastic resets)."""
        state = self.state_dict()
        if not _is_int(num_replicas) or num_replicas < 1:
            raise ValueError(f"num_replicas must be an int >= 1, got {num_replicas!r}")
        if not _is_int(rank) or not 0 <= rank < num_replicas:
            raise ValueError(
                f"Invalid rank {rank!r}, rank should be in the interval [0, {num_replicas - 1}]"
            )
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.load_state_dict(state)

    def __repr__(self) -> str:
        return (f"DistributedSampler(n={self.n}, num_replicas={self.num_replicas}, "
                f"rank={self.rank}, shuffle={self.shuffle}, seed={self.seed}, "
                f"epoch={self.epoch}, drop_last={self.drop_last}, pad={self.pad})")


def _validate_state(state: Any) -> dict[str, Any]:
    """Check a sampler state dict's form; return a normalised copy or raise naming the fault."""
    if not isinstance(state, Mapping):
        raise TypeError(
            f"sampler state must be a dict from state_dict(), got {type(state).__name__}"
        )
    if state.get(_TYPE) != _STATE_TYPE:
        raise ValueError(
            f"not a horovod_iter sampler state (type={state.get(_TYPE)!r}, expected "
            f"{_STATE_TYPE!r}); pass the dict returned by DistributedSampler.state_dict()"
        )
    if state.get(_VERSION) != _STATE_VERSION:
        raise ValueError(
            f"sampler state version {state.get(_VERSION)!r} is not supported (expected "
            f"{_STATE_VERSION}); it was written by another horovod_iter version"
        )
    out: dict[str, Any] = {}
    for key in (*_INT_KEYS, _SEED):
        v = state.get(key)
        if not _is_int(v):
            raise ValueError(f"invalid sampler state: {key!r} must be an int, got {v!r}")
        out[key] = int(v)  # type: ignore[arg-type]
    for key in _BOOL_KEYS:
        v = state.get(key)
        if not isinstance(v, bool):
            raise ValueError(f"invalid sampler state: {key!r} must be a bool, got {v!r}")
        out[key] = v
    if out[_N] < 0 or out[_EPOCH] < 0 or out[_WORLD] < 1:
        raise ValueError(
            f"invalid sampler state: n={out[_N]}, epoch={out[_EPOCH]}, "
            f"world_size={out[_WORLD]} must be >= 0, >= 0, >= 1"
        )
    if not 0 <= out[_START] <= out[_N] or out[_CONSUMED] < 0:
        raise ValueError(
            f"invalid sampler state: start={out[_START]} must lie in [0, {out[_N]}] and "
            f"consumed={out[_CONSUMED]} must be >= 0"
        )
    return out
