"""LengthGroupedBatchSampler: distributed batches of similar lengths (NLP, speech), each
sample exactly once per epoch over the ranks, resumable on any world size.

The epoch's *global* batches are a pure function of (lengths, batch_size, seed, epoch, group):
the epoch's order (the sampler's `permute()`), cut into mega-batches of ``group`` batches,
each sorted by length (longest first) and cut into batches. They do not depend on the world
size. Rank ``r`` of ``W`` takes global batches ``start + r, start + r + W, ...``: at every step
the ranks hold neighbouring batches of one mega-batch, of similar lengths, so no rank waits
long for a rank with longer sequences. Progress is ``start``, the global batches consumed;
a resume on another world deals the rest anew.

The last step (`deal`): when the batches left are not a multiple of ``W``, the ``L < W``
leftover batches (the epoch's shortest samples, the same ones every epoch without shuffling)
are not left to some ranks only - under ``uneven="stop"`` the ranks stop together and those
would never be trained. Their samples are split anew into ``W`` batches of nearly equal size,
one per rank, so every rank has the same batch count and no sample is dropped (torch's
``DistributedSampler`` pads the same way); only where fewer than ``W`` samples are left are
some repeated (``pad``), or (``pad=False``, exact evaluation) some ranks get one batch fewer.
``drop_last`` keeps batches full instead: with ``pad`` the leftover batches are dropped (torch's
``DistributedSampler(drop_last=True)``), without it they go to the first ``L`` ranks.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch.utils.data

from . import backend as _backend
from .fetch import plan_batches
from .permutation import permute
from .sampler import DistributedSampler, is_int

__all__ = ["LengthGroupedBatchSampler", "RankBatches", "batch_sampler_batches", "deal",
           "deal_counts"]

_STATE_TYPE = "horovod_iter.LengthGroupedBatchSampler"
_STATE_VERSION = 1


def deal_counts(total: int, start: int, world: int, tail: int, *, pad: bool,
                drop_last: bool) -> list[int]:
    """Batches each of ``world`` ranks gets of ``total`` global batches from ``start`` on,
    where ``tail`` is the number of samples in the ``(total - start) % world`` leftover ones
    (see the module docstring). Pure."""
    base, lo = divmod(max(0, total - start), world)
    if lo == 0:
        return [base] * world
    if drop_last:
        extra = 0 if pad else lo
    else:
        extra = world if pad or tail >= world else tail
    return [base + (1 if r < extra else 0) for r in range(world)]


def deal(batches: Sequence[np.ndarray], start: int, world: int, rank: int, *, pad: bool,
         drop_last: bool) -> list[np.ndarray]:
    """Rank ``rank``'s batches of the global ``batches`` from ``start`` on: round-robin, then
    the leftover batches' samples split anew over the ranks (see the module docstring).
    Pure; `deal_counts` gives every rank's count."""
    base, lo = divmod(max(0, len(batches) - start), world)
    out = [batches[start + rank + k * world] for k in range(base)]
    if lo == 0:
        return out
    leftover = list(batches[start + base * world:])
    if drop_last:
        if not pad and rank < lo:
            out.append(leftover[rank])
        return out
    samples = np.concatenate(leftover)
    if len(samples) >= world:  # contiguous chunks: neighbours in length stay together
        out.append(np.array_split(samples, world)[rank])
    elif pad or rank < len(samples):  # fewer samples than ranks: one each, repeated (pad)
        out.append(samples[rank % len(samples):][:1])
    return out


class LengthGroupedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of indices of similar length, this rank's share of every epoch.

    Args:
        lengths: every sample's length (a sequence of ints, e.g. token counts).
        batch_size: samples per batch (per rank).
        shuffle: a new order each epoch from ``(seed, epoch)`` (otherwise the dataset order,
            still grouped by length within each mega-batch).
        seed: the order's seed, the same on every rank.
        drop_last: drop the epoch's last batch if it is short (every batch has
            ``batch_size`` samples; with ``pad``, the up to ``W - 1`` leftover global batches
            of the last step are dropped too, as torch's ``DistributedSampler`` drops its tail).
        group: batches per mega-batch (the window within which lengths are sorted).
        num_replicas, rank: the world (default: the backend's).
        pad: ``True``: every rank gets the same number of batches every epoch (the
            leftover batches of the last step are split over all ranks, repeating samples only
            where fewer than ``W`` are left); ``False``: never repeat a sample (exact
            evaluation; then some ranks may have one batch fewer). ``None`` (the default):
            `DistributedLoader` decides from its ``uneven`` - ``"stop"`` pads, ``"pad"`` and
            ``"error"`` do not - and in a torch ``DataLoader`` it pads (ranks with other batch
            counts would hang in DDP's last allreduce).

    Use it as ``DistributedLoader(dataset, batch_sampler=...)`` (the loader resumes it on any
    world size and synchronises the end of data) or in a torch ``DataLoader``. Call
    ``set_epoch(epoch)`` every epoch (the loader does).

    Every sample is in a batch each epoch (unless ``drop_last``): in the last step of a pass,
    whose global batches do not divide over the ranks, the leftover batches are split into
    one smaller batch per rank (see `deal`), so ``uneven="stop"`` trains them too.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False, group: int = 64,
                 num_replicas: int | None = None, rank: int | None = None,
                 pad: bool | None = None) -> None:
        arr = np.asarray(lengths)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer) or len(arr) == 0:
            raise ValueError("lengths must be a non-empty sequence of ints (one per sample), "
                             f"got {type(lengths).__name__} of dtype {arr.dtype}")
        for name, v in (("batch_size", batch_size), ("group", group)):
            if not is_int(v) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not is_int(seed):
            raise TypeError(f"seed must be an int, got {seed!r}")
        for name, flag in (("shuffle", shuffle), ("drop_last", drop_last)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        if pad is not None and not isinstance(pad, bool):
            raise TypeError(f"pad must be a bool or None, got {pad!r}")
        #: the given ``pad`` (None: the loader's ``uneven`` decides, see `set_uneven`)
        self.pad = pad
        self._loader_pad: bool | None = None
        self.lengths = arr.astype(np.int64)
        self.batch_size, self.group = int(batch_size), int(group)
        self.shuffle, self.seed, self.drop_last = shuffle, int(seed), drop_last
        if num_replicas is None or rank is None:
            b = _backend.get_backend()
            num_replicas = b.size if num_replicas is None else num_replicas
            rank = b.rank if rank is None else rank
        self.set_world(int(num_replicas), int(rank))
        self.epoch = 0
        self._pending: int | None = None  # global batches consumed, for the next iter()
        self._start = 0                   # of the current pass
        self._yielded = 0                 # batches this rank's current iterator yielded

    # ---- the epoch ------------------------------------------------------------------------
    def global_batches(self, epoch: int | None = None) -> list[np.ndarray]:
        """The epoch's batches over all ranks, in order (a pure function; the same on every
        rank and for every world size)."""
        e = self.epoch if epoch is None else epoch
        n = len(self.lengths)
        order = permute(np.arange(n), n, self.seed, e) if self.shuffle else np.arange(n)
        mega = self.batch_size * self.group
        out: list[np.ndarray] = []
        for a in range(0, n, mega):
            chunk = order[a:a + mega]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            out.extend(chunk[b:b + self.batch_size] for b in range(0, len(chunk),
                                                                   self.batch_size))
        if self.drop_last and out and len(out[-1]) < self.batch_size:
            out.pop()
        return out

    @property
    def pads(self) -> bool:
        """Whether the last step repeats samples so that every rank has a batch: the given
        ``pad``, else the loader's ``uneven`` (``"stop"``), else True."""
        if self.pad is not None:
            return self.pad
        return True if self._loader_pad is None else self._loader_pad

    def set_uneven(self, uneven: str) -> None:
        """Follow a `DistributedLoader`'s ``uneven`` (it calls this): with ``pad=None``,
        ``"stop"`` pads the last step, ``"pad"``/``"error"`` never repeat a sample. A ``pad``
        given explicitly that contradicts it is refused (``stop`` would leave the leftover
        samples of ranks without a batch untrained; ``pad``/``error`` promise each sample
        once)."""
        want = uneven == "stop"
        if self.pad is not None and self.pad != want:
            fix = ("pad=True (or None)" if want else "pad=False (or None)")
            raise ValueError(
                f"LengthGroupedBatchSampler(pad={self.pad}) does not fit uneven={uneven!r}: "
                + ("under 'stop' the ranks stop together, so a rank's unpadded last batch "
                   "would never be trained" if want else "'pad' and 'error' promise every "
                   "sample exactly once, and pad=True repeats some")
                + f"; build it with {fix}")
        self._loader_pad = want

    def counts(self, start: int | None = None) -> list[int]:
        """Batches each rank gets from global batch ``start`` on (default: the next pass's);
        with `pads` (and without ``drop_last``) the same on every rank."""
        s = self._next_start() if start is None else start
        return deal_counts(self._total(), s, self.num_replicas, self._leftover_samples(s),
                           pad=self.pads, drop_last=self.drop_last)

    def _leftover_samples(self, start: int) -> int:
        """Samples in the global batches left over by the round-robin deal from ``start``."""
        lo = max(0, self._total() - start) % self.num_replicas
        rest = len(self.lengths) % self.batch_size
        short = 1 if lo and rest and not self.drop_last else 0  # the epoch's last batch
        return lo * self.batch_size - short * (self.batch_size - rest)

    def _total(self) -> int:
        n = len(self.lengths)
        full, rest = divmod(n, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def _next_start(self) -> int:
        return self._pending if self._pending is not None else 0

    # ---- torch Sampler protocol -----------------------------------------------------------
    def begin(self) -> int:
        """Start a pass (the loader calls it; ``iter()`` does): the global batch it starts
        at - the loaded position, else 0."""
        self._start, self._pending, self._yielded = self._next_start(), None, 0
        return self._start

    def batches_from(self, start: int) -> Iterator[list[int]]:
        """This rank's batches of the current epoch from global batch ``start`` on (laid out
        now: a later ``set_epoch`` does not change them)."""
        mine = deal(self.global_batches(), start, self.num_replicas, self.rank,
                    pad=self.pads, drop_last=self.drop_last)
        return (b.tolist() for b in mine)

    def __iter__(self) -> Iterator[list[int]]:
        start = self.begin()
        for batch in self.batches_from(start):
            self._yielded += 1
            yield batch

    def __len__(self) -> int:
        """This rank's batches in a full epoch."""
        return self.counts(0)[self.rank]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the next ``iter()``; a pending load of another epoch goes."""
        if not is_int(epoch) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        if int(epoch) != self.epoch:
            self.epoch, self._pending = int(epoch), None

    def set_world(self, num_replicas: int, rank: int) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"Invalid rank {rank}, rank should be in the interval "
                             f"[0, {num_replicas - 1}]")
        self.num_replicas, self.rank = num_replicas, rank

    # ---- state ----------------------------------------------------------------------------
    def state_dict(self, steps: int | None = None) -> dict[str, Any]:
        """The position after ``steps`` steps of the current pass (default: what this rank's
        iterator yielded; every rank steps alike), as global batches consumed."""
        if self._pending is not None and steps is None:
            start = self._pending
        else:
            k = self._yielded if steps is None else steps
            start = min(self._total(), self._start + k * self.num_replicas)
        return {"type": _STATE_TYPE, "version": _STATE_VERSION, "epoch": self.epoch,
                "start": start, "n": len(self.lengths), "batch_size": self.batch_size,
                "group": self.group, "seed": self.seed, "shuffle": self.shuffle,
                "drop_last": self.drop_last}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Make the next ``iter()`` continue at ``state`` (on any world size)."""
        if not isinstance(state, Mapping) or state.get("type") != _STATE_TYPE:
            raise ValueError("not a LengthGroupedBatchSampler state; pass the dict returned "
                             "by its state_dict()")
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"LengthGroupedBatchSampler state version "
                             f"{state.get('version')!r} is not supported")
        mine = self.state_dict()
        for key in ("n", "batch_size", "group", "seed", "shuffle", "drop_last"):
            if state.get(key) != mine[key]:
                raise ValueError(f"the state was saved with {key}={state.get(key)!r}, this "
                                 f"batch sampler has {key}={mine[key]!r}; build it alike")
        start: Any = state.get("start")
        epoch: Any = state.get("epoch")
        if not (is_int(start) and is_int(epoch) and 0 <= start <= self._total()
                and epoch >= 0):
            raise ValueError(f"invalid LengthGroupedBatchSampler state: start={start!r}, "
                             f"epoch={epoch!r}")
        self.epoch, self._pending = int(epoch), int(start)

    def __repr__(self) -> str:
        return (f"LengthGroupedBatchSampler(n={len(self.lengths)}, batch_size="
                f"{self.batch_size}, num_replicas={self.num_replicas}, rank={self.rank}, "
                f"epoch={self.epoch})")


def batch_sampler_batches(batch_sampler: Any, skip: int) -> tuple[Iterator[np.ndarray],
                                                                    int | None]:
    """A batch sampler's batches as index arrays, and their count: ours from its position
    (loaded or 0), any other's from its ``skip``-th batch on (an index skip, no data read)."""
    if isinstance(batch_sampler, LengthGroupedBatchSampler):
        start = batch_sampler.begin()
        it: Iterator[list[int]] = batch_sampler.batches_from(start)
        count: int | None = batch_sampler.counts(start)[batch_sampler.rank]
    else:
        it = iter(batch_sampler)
        for _ in range(skip):
            if next(it, None) is None:
                break
        try:
            count = max(0, len(batch_sampler) - skip)
        except TypeError:
            count = None
    return (np.asarray(b, dtype=np.int64) for b in it), count


class RankBatches(torch.utils.data.Sampler[list[int]]):
    """``loader.batch_sampler`` of a `DistributedLoader` without one of its own: this
    rank's index batches of the current epoch from its beginning, as many as the loader's
    ``len()`` (what a framework that re-batches from ``batch_sampler`` must read)."""

    def __init__(self, loader: Any, batch_size: int) -> None:
        self._loader = loader
        self.batch_size = batch_size
        self.drop_last = loader.drop_last
        self.sampler = loader.sampler

    def __iter__(self) -> Iterator[list[int]]:
        n = len(self)
        if isinstance(self.sampler, DistributedSampler):
            arrays, _ = plan_batches(self.sampler.plan(), 0, self.batch_size, self.drop_last)
            for k, a in enumerate(arrays):
                if k >= n:
                    return
                yield a.tolist()
            return
        yield from torch.utils.data.BatchSampler(self.sampler, self.batch_size,
                                                 self.drop_last)

    def __len__(self) -> int:
        return len(self._loader)

    def set_epoch(self, epoch: int) -> None:
        """The loader's epoch (HF's Trainer sets it here after re-batching a resumed epoch)."""
        self._loader.set_epoch(epoch)
