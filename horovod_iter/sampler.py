"""DistributedSampler: every rank a disjoint slice of an epoch-seeded order, O(1) memory,
exact and elastic resume, with torch's and torchdata's iteration semantics.

The layout arithmetic is `EpochPlan`'s; this module adds the position:
a `Cursor` (a plan frozen at ``iter()`` plus the slots taken so far). Semantics:

* every ``iter()`` starts the current epoch from its beginning (torch's rule), except the first
  ``iter()`` after `load_state_dict()` (or `
  set_world()`), which resumes at the loaded position (torchdata ``StatefulDataLoader``'s rule);
* `state_dict()` describes what the current iterator has yielded, so
  torchdata's ``StatefulDataLoader``/``SamplerWrapper`` and a plain DataLoader loop
  (``num_workers=0``) resume exactly with no extra call;
* ``set_epoch()`` affects the next ``iter()``, never a pass in flight;
* the dataset's length is read again at ``set_epoch()`` and at every ``iter()`` (a dataset that
  grows or shrinks between epochs: its new samples are dealt from the next pass on, as torch's
  DataLoader takes them); a pass in flight keeps the length it started with.
"""
from __future__ import annotations

import random
import sys
from collections.abc import Iterator, Mapping, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data.distributed import DistributedSampler as _TorchDistributedSampler

from . import backend as _backend
from .plan import EpochPlan

__all__ = ["Cursor", "DistributedSampler", "generator_seed", "is_int"]

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


def is_int(x: Any) -> bool:
    """An int (Python or numpy), not a bool."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _dataset_length(dataset: Any) -> int:
    if is_int(dataset):
        n = int(dataset)
    elif isinstance(dataset, Sized):
        n = len(dataset)
    else:
        raise TypeError(
            "dataset must be a sized dataset (with __len__) or an int length, got "
            f"{type(dataset).__name__}; for an IterableDataset use horovod_iter.ShardedDataset "
            "or horovod_iter.split_stream() instead"
        )
    if n < 0:
        raise ValueError(f"dataset length must be >= 0, got {n}")
    return n


def generator_seed(generator: torch.Generator) -> int:
    """A shuffle seed drawn from ``generator`` (how torch's ``RandomSampler`` seeds itself
    without one: an int64 ``random_()``), in ``[0, 2**63)``; advances the generator."""
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return int(torch.empty((), dtype=torch.int64).random_(generator=generator).item())


def _check_world(num_replicas: Any, rank: Any) -> tuple[int, int]:
    if not is_int(num_replicas) or num_replicas < 1:
        raise ValueError(f"num_replicas must be an int >= 1, got {num_replicas!r}")
    if not is_int(rank) or not 0 <= rank < num_replicas:
        raise ValueError(
            f"Invalid rank {rank!r}, rank should be in the interval [0, {num_replicas - 1}]"
        )
    return int(num_replicas), int(rank)


class Cursor:
    """A pass's position: the plan frozen at ``iter()`` and the slots taken on every rank.

    ``slot`` starts at 0, or at the resumed slot, and moves as samples are handed out.
    Whoever hands samples out advances it: the sampler's own iterator per index,
    `DistributedLoader` per batch handed to the user (never prefetched).
    """

    __slots__ = ("_end", "plan", "slot")

    def __init__(self, plan: EpochPlan, slot: int = 0) -> None:
        self.plan = plan
        self.slot = slot
        self._end = plan.max_count

    def advance(self, slots: int) -> None:
        self.slot = min(self.slot + slots, self._end)


class _SamplerIterator(Iterator[int]):
    """The indices of a cursor's pass, one at a time; the cursor moves as they are yielded."""

    def __init__(self, cursor: Cursor) -> None:
        self._cursor = cursor
        self._buf: list[int] = []
        self._i = 0
        self._chunk = 256  # small first chunk: the first index comes in microseconds

    def __next__(self) -> int:
        if self._i >= len(self._buf):
            c = self._cursor
            self._buf = c.plan.indices(c.slot, c.slot + self._chunk).tolist()
            self._i = 0
            self._chunk = min(self._chunk * 4, _CHUNK)
            if not self._buf:
                raise StopIteration
        self._i += 1
        self._cursor.slot += 1
        return self._buf[self._i - 1]


def _check_not_resharded(sampler: DistributedSampler) -> None:
    """Raise `ShardingError` where a framework's wrapper would shard our slice again.

    Only HF Accelerate builds such wrappers around a torch ``DistributedSampler``
    (``accelerator.prepare()`` of its DataLoader): Lightning leaves any
    ``DistributedSampler`` alone (``_requires_distributed_sampler``) and replaces the sampler
    of a batch sampler instead of wrapping it. The check reads accelerate's public state, and
    only once accelerate is loaded (`horovod_iter.integrations.accelerate`)."""
    if "accelerate.data_loader" in sys.modules and sampler.num_replicas > 1:
        from .integrations.accelerate import check_not_resharded

        check_not_resharded(sampler, rank=sampler.rank, world=sampler.num_replicas,
                            what="horovod_iter.DistributedSampler")


class DistributedSampler(_TorchDistributedSampler):
    """Drop-in for ``torch.utils.data.distributed.DistributedSampler``, ranked by Horovod.

    It *is* a torch ``DistributedSampler`` (a subclass), so frameworks that inject their own
    distributed sampler unless the DataLoader already has one (Lightning's
    ``use_distributed_sampler``) leave it alone; a wrapper that shards it again anyway
    (``accelerator.prepare()`` of its DataLoader) gets `ShardingError` on every rank
    instead of 1/W of each rank's slice.

    Each rank iterates a disjoint slice of an order shuffled from ``(seed, epoch)``, identical
    on every rank with no communication and O(1) memory in the dataset length. ``len()`` and,
    with ``shuffle=False``, every rank's order are exactly torch's.

    Args:
        dataset: a sized dataset, or its length as an int. Its length is read again at
            ``set_epoch()`` and at every ``iter()``, so samples added (or removed) between
            epochs are dealt from the next pass on; a pass in flight keeps its length.
        num_replicas: number of ranks; defaults to the backend's size (Horovod,
            torch.distributed or 1), read at first use, so a sampler built before a
            launcher sets up the ranks (Lightning's, inside ``trainer.fit()``) gets them. No
            collective is run.
        rank: this rank; defaults to the backend's rank.
        shuffle: shuffle the order each epoch (see `permutation`).
        seed: int seed shared by all ranks; ``None`` lets rank 0 draw one, broadcast at the
            first ``iter()`` or ``state_dict()`` (a collective: call those on every rank).
        drop_last: cut the tail so that every rank gets ``floor(n / W)`` samples.
        pad: with ``drop_last=False``, pad by wrapping around so every rank gets
            ``ceil(n / W)`` samples (torch's behaviour); ``pad=False`` gives an exact partition
            with no duplicate (ranks differ by at most one sample), for evaluation.
        backend: the backend for the defaults and the ``seed=None`` broadcast.
        generator: a ``torch.Generator`` that seeds the shuffle instead of ``seed``, as the
            ``generator`` of torch's ``DataLoader``/``RandomSampler`` does: the seed is drawn
            from it once, here (`generator_seed`), and the order is then a function of (that
            seed, epoch) as with ``seed``, so it resumes exactly. Seed it alike on every rank
            (``torch.Generator().manual_seed(1)``): a generator seeded per rank draws a
            different seed on each rank, and the ranks' slices would overlap and miss
            samples. `DistributedLoader` compares the drawn seed over the ranks at ``iter()``
            and raises `ConfigMismatchError` naming each rank's seed; used without the
            loader, nothing checks it. Not with ``seed`` other than its default;
            ``shuffle=False`` draws nothing.

    Call ``set_epoch(epoch)`` before every epoch, or every epoch has the same order.
    ``state_dict()`` is the position of the current iterator (what it has yielded), so it
    resumes exactly under torchdata's ``StatefulDataLoader`` and ``SamplerWrapper``, and in a
    plain ``DataLoader`` loop with ``num_workers=0`` (with workers, torch's DataLoader reads
    indices ahead of the batches it hands out: use ``StatefulDataLoader`` or
    `DistributedLoader`).

    Example:
        ```python
        sampler = DistributedSampler(dataset, seed=42)
        loader = DataLoader(dataset, batch_size=32, sampler=sampler)
        for epoch in range(start_epoch, epochs):
            sampler.set_epoch(epoch)
            for batch in loader:
                train_step(batch)
                if time_to_checkpoint:
                    torch.save({"sampler": sampler.state_dict()}, path)
        ```

    Raises:
        TypeError/ValueError: on a bad argument, naming it and the valid range.
    """

    def __init__(self, dataset: Any, num_replicas: int | None = None, rank: int | None = None,
                 shuffle: bool = True, seed: int | None = 0, drop_last: bool = False, *,
                 pad: bool = True, backend: _backend.Backend | None = None,
                 generator: torch.Generator | None = None) -> None:
        # not torch's __init__: it needs an initialised process group
        self.dataset = dataset
        #: the dataset's length as last read (at construction, set_epoch(), iter(), a load):
        #: the length of the next fresh pass; `length` is the current position's
        self.n = _dataset_length(dataset)
        self._world: tuple[int, int] | None = None
        self._world_arg = (num_replicas, rank)
        self._auto_world = False  # the world came from a provisional (local) backend
        self._world_backend: _backend.Backend | None = None
        if num_replicas is not None and rank is not None:
            self._world = _check_world(num_replicas, rank)
        elif num_replicas is not None and (not is_int(num_replicas) or num_replicas < 1):
            raise ValueError(f"num_replicas must be an int >= 1, got {num_replicas!r}")
        elif rank is not None and (not is_int(rank) or rank < 0):
            raise ValueError(f"Invalid rank {rank!r}, rank should be an int >= 0")
        for name, flag in (("shuffle", shuffle), ("drop_last", drop_last), ("pad", pad)):
            if not isinstance(flag, (bool, np.bool_)):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        if seed is not None and not is_int(seed):
            raise TypeError(f"seed must be an int (or None to draw one on rank 0), got {seed!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got "
                            f"{type(generator).__name__}")
        if generator is not None and (seed is None or seed != 0):
            raise ValueError(f"pass seed or generator, not both (the generator draws the "
                             f"seed): got seed={seed!r} and a generator")
        #: the generator the seed was drawn from (torch's ``RandomSampler.generator``)
        self.generator = generator
        if generator is not None and shuffle:
            seed = generator_seed(generator)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.pad = bool(pad)
        self._backend = backend
        self._seed: int | None = None if seed is None else int(seed)
        self._seed_from_broadcast = seed is None
        self.epoch = 0
        self._pending: Cursor | None = None   # what the next iter() resumes (after a load)
        self._current: Cursor | None = None   # the latest pass of this epoch

    # ---- the world ------------------------------------------------------------------------
    def _bound(self) -> tuple[int, int]:
        """This sampler's (num_replicas, rank): the given ones, else the backend's, read at
        first use - and read again while they came from a local backend that a launcher's
        environment has since replaced (keeping the epoch's progress)."""
        if self._world is not None and not (
                self._auto_world and self._world_backend is not None
                and _backend.is_provisional(self._world_backend)):
            return self._world
        b = self._backend or _backend.get_backend()
        n_arg, r_arg = self._world_arg
        world = _check_world(b.size if n_arg is None else n_arg, b.rank if r_arg is None
                             else r_arg)
        first = self._world is None
        self._world_backend = b  # first: set_world() below reads the old world
        self._auto_world = self._backend is None and b.name == "local"
        if first:
            self._world = world
        elif world != self._world:
            self.set_world(*world)
        return world

    @property
    def num_replicas(self) -> int:
        """Number of ranks (torch's attribute)."""
        return self._bound()[0]

    @num_replicas.setter
    def num_replicas(self, value: int) -> None:
        self._world = _check_world(value, min(self._bound()[1], value - 1))
        self._auto_world = False

    @property
    def rank(self) -> int:
        """This rank (torch's attribute)."""
        return self._bound()[1]

    @rank.setter
    def rank(self, value: int) -> None:
        self._world = _check_world(self._bound()[0], value)
        self._auto_world = False

    # ---- the plan -------------------------------------------------------------------------
    @property
    def seed(self) -> int:  # type: ignore[override]  # torch's: plain attributes
        """The seed (with ``seed=None``, rank 0's draw, broadcast on first use)."""
        if self._seed is None:
            drawn = random.SystemRandom().randrange(2**63)
            b = self._backend or _backend.get_backend()
            self._seed = int(b.broadcast_object(drawn, root=0))
        return self._seed

    def refresh_length(self) -> int:
        """Read the dataset's length again (an int dataset has a fixed one) and return it:
        the length of the next fresh pass. A pass in flight keeps its own."""
        if not is_int(self.dataset):
            self.n = _dataset_length(self.dataset)
        return self.n

    @property
    def length(self) -> int:
        """The dataset length the current position's plan is laid out for (a pass in flight,
        a pending load, else the next fresh pass): what every rank must agree on."""
        return self._position().plan.n

    def plan(self, epoch: int | None = None) -> EpochPlan:
        """The whole plan of ``epoch`` (default: the current one) on this rank. Pure."""
        return EpochPlan(self.n, self.num_replicas, self.rank, 0 if self._seed is None
                         else self._seed, self.epoch if epoch is None else epoch,
                         self.shuffle, self.pad, self.drop_last)

    def begin_iteration(self, resume: bool = True) -> Cursor:
        """Start a pass: the loaded position if a load is pending (and ``resume``: the loader
        passes False for a pass that must start afresh), else the epoch's beginning.

        The returned cursor becomes the one `state_dict()` describes; advance it as
        samples are handed out. ``iter()`` calls this; so does the loader. The dataset's
        length is read again here: a fresh pass takes the new one; a loaded position made for
        another length is refused (its samples would be other ones).
        """
        self.seed  # noqa: B018 - resolves a seed=None broadcast on every rank alike
        n = self.refresh_length()
        cursor = self._pending if resume else None
        if cursor is not None and cursor.plan.n != n:
            raise ValueError(
                f"the position this pass resumes (loaded with load_state_dict(), or carried "
                f"over a world change) is in epoch {cursor.plan.epoch} of a dataset of length "
                f"{cursor.plan.n}, but the dataset now has length {n}: resuming it would deal "
                f"other samples. Resume with the dataset of length {cursor.plan.n}, or call "
                f"set_epoch({cursor.plan.epoch + 1}) to start the next epoch over all {n}")
        self._pending = None
        if cursor is None:
            cursor = Cursor(self.plan())
        self._current = cursor
        return cursor

    def _position(self) -> Cursor:
        return self._pending or self._current or Cursor(self.plan())

    # ---- torch Sampler protocol ----------------------------------------------------------
    def __iter__(self) -> Iterator[int]:
        _check_not_resharded(self)
        return _SamplerIterator(self.begin_iteration())

    def __len__(self) -> int:
        """Indices a full pass of the current epoch yields on this rank (torch's)."""
        return self.num_samples

    @property
    def num_samples(self) -> int:  # type: ignore[override]  # torch's: plain attributes
        """Samples this rank yields in a full epoch (torch's attribute)."""
        return self.plan().count()

    @property
    def total_size(self) -> int:  # type: ignore[override]  # torch's: plain attributes
        """Schedule positions over all ranks in a full epoch (torch's attribute)."""
        return self.plan().total

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the next ``iter()`` (a pass in flight keeps its own).

        Setting the epoch a pending load is in keeps it (a resumed trainer calls
        ``set_epoch(saved_epoch)``); another epoch discards it and starts that one afresh.
        The dataset's length is read again (see `refresh_length`).
        """
        if not is_int(epoch) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        # accelerate's dispatcher sets the epoch on every rank but iterates on rank 0 only
        _check_not_resharded(self)
        self.refresh_length()
        if int(epoch) != self.epoch:
            self.epoch = int(epoch)
            self._pending = self._current = None

    def set_world(self, num_replicas: int, rank: int) -> None:
        """Move to another world size keeping the epoch's progress: the next ``iter()``
        resumes the rest of the epoch laid out over ``num_replicas`` ranks (a load)."""
        num_replicas, rank = _check_world(num_replicas, rank)
        if self._pending is None and self._current is None:
            self.refresh_length()  # nothing started: the epoch takes the length it has now
        state = self.state_dict()
        self._world = (num_replicas, rank)
        self.load_state_dict(state)

    # ---- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """A small JSON-serialisable dict: the current iterator's position (or a pending load,
        or the epoch's beginning). The same on every rank; changes nothing."""
        return self.state_at(self._position())

    def state_at(self, c: Cursor) -> dict[str, Any]:
        """The state dict of the position ``c`` (a cursor of this sampler's passes)."""
        p = c.plan
        return {
            _TYPE: _STATE_TYPE, _VERSION: _STATE_VERSION, _N: p.n, _SEED: self.seed,
            _EPOCH: p.epoch, _SHUFFLE: p.shuffle, _PAD: p.pad, _DROP_LAST: p.drop_last,
            _WORLD: p.world, _START: p.start, _CONSUMED: p.consumed(c.slot),
            _SAMPLES_CONSUMED: p.done(c.slot),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Make the next ``iter()`` resume exactly where ``state`` was saved, in O(1).

        At the same world size and padding the rest of the epoch is exactly what the saving
        run would have yielded next. Otherwise the epoch's unconsumed samples are laid out
        anew over this sampler's ranks: none repeated, none lost. A sampler built with
        ``seed=None`` adopts the saved seed; otherwise seed, length and shuffle must match.

        The length is the dataset's now (read again here): a state saved mid-epoch over
        another length is refused, naming both. One saved at the end of its epoch loads (a
        dataset that grew between epochs: ``set_epoch(next)`` then starts the next epoch over
        the new length), but iterating it without a new epoch is refused.
        """
        s = _validate_state(state)
        n = self.refresh_length()
        saved = EpochPlan(s[_N], s[_WORLD], 0, s[_SEED], s[_EPOCH], s[_SHUFFLE], s[_PAD],
                          s[_DROP_LAST], s[_START])
        if s[_CONSUMED] > saved.total:
            raise ValueError(
                f"invalid sampler state: consumed={s[_CONSUMED]} exceeds the segment's "
                f"{saved.total} positions at world_size={s[_WORLD]}"
            )
        if s[_N] != n and s[_CONSUMED] < saved.total:
            raise ValueError(
                f"sampler state was saved for a dataset of length {s[_N]}, but this sampler has "
                f"length {n}, and the state is in the middle of epoch {s[_EPOCH]}: resuming it "
                f"would deal other samples; load it into a sampler over the dataset of length "
                f"{s[_N]} (a state saved at the end of an epoch loads into any length)"
            )
        if not self._seed_from_broadcast and s[_SEED] != self._seed:
            how = (f"this sampler drew seed={self._seed} from its generator; seed the generator "
                   "as the saving run did" if self.generator is not None and self.shuffle else
                   f"this sampler has seed={self._seed}; construct it with seed={s[_SEED]} (or "
                   "seed=None to adopt it)")
            raise ValueError(f"sampler state was saved with seed={s[_SEED]}, but {how}")
        if s[_SHUFFLE] != self.shuffle:
            raise ValueError(
                f"sampler state was saved with shuffle={s[_SHUFFLE]}, but this sampler has "
                f"shuffle={self.shuffle}; construct it with shuffle={s[_SHUFFLE]}"
            )
        self._seed = s[_SEED]
        self.epoch = s[_EPOCH]
        if (saved.world, saved.pad, saved.drop_last) == (self.num_replicas, self.pad,
                                                          self.drop_last):
            plan = EpochPlan(s[_N], self.num_replicas, self.rank, s[_SEED], s[_EPOCH],
                             self.shuffle, self.pad, self.drop_last, s[_START])
            cursor = Cursor(plan, -(-s[_CONSUMED] // self.num_replicas))
        else:  # another layout: the unconsumed samples form a new segment
            slots = -(-s[_CONSUMED] // saved.world)
            cursor = Cursor(saved.resegment(slots, world=self.num_replicas, rank=self.rank,
                                            pad=self.pad, drop_last=self.drop_last))
        self._pending = cursor
        self._current = None

    def __repr__(self) -> str:
        return (f"DistributedSampler(n={self.n}, num_replicas={self.num_replicas}, "
                f"rank={self.rank}, shuffle={self.shuffle}, seed={self._seed}, "
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
        if not is_int(v):
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
