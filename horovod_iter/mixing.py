"""Sources mixed in fixed proportions: map-style sources as one map-style dataset
(`MixedDataset`), streaming ones (`ShardedDataset` with a canonical layout) as one stream
(`MixedStream`).

An epoch of the mix has ``samples_per_epoch`` positions; source ``j`` owns a contiguous range of
``c_j`` of them (``c_j`` from the weights, largest remainders, summing to the epoch). Position
``t`` of source ``j``'s range in mixed epoch ``e`` is that source's draw ``k = e * c_j + t``,
which is sample ``k mod len_j`` of the source's own epoch ``k // len_j`` - in that epoch's order,
a `permute()` of the source from ``(seed + j, k // len_j)``. So each source runs through its own
epochs (a small corpus repeats, a large one is spread over several mixed epochs), every sample
of a source's epoch is drawn exactly once, and everything is a pure function of (seed, epoch).

The sampler (`DistributedSampler`, or the loader's) permutes and deals the positions as for
any map-style dataset, which interleaves the sources uniformly in every batch (a shuffling
sampler, the loader's default; a sampler in index order - the loader's ``shuffle=False`` -
reads the positions in order: one source's range after the other, as a ``ConcatDataset``)
and gives the mix the map-style guarantees for free: exactly once per epoch over the world,
an O(1) resume on any world size, the same global batches at any world size with
``global_batch_size``.
"""
from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ._deprecation import warn_deprecated
from .backend import get_backend
from .permutation import permute_epochs
from .sharded import ShardedDataset
from .shards.canonical import check_world, close_streams, stream_position

__all__ = ["MixedDataset", "MixedStream"]


def _counts(weights: Sequence[float], total: int) -> list[int]:
    """``total`` split in proportion to ``weights`` (largest remainders: sums exactly)."""
    s = float(sum(weights))
    raw = [w / s * total for w in weights]
    out = [math.floor(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda j: (out[j] - raw[j], j))
    for j in order[: total - sum(out)]:
        out[j] += 1
    return out


def _shares(weights: Sequence[float] | Mapping[str, float] | None, names: list[str],
            lengths: list[int], samples_per_epoch: int | None) -> tuple[list[float], int]:
    """The normalised weights (default: by length) and the epoch size, checked. Weights are
    a list in the sources' order, or a dict keyed by the names of a dict of sources."""
    if weights is None:
        weights = [float(n) for n in lengths]
    if isinstance(weights, Mapping):
        by_name = {str(k): w for k, w in weights.items()}
        if set(by_name) != set(names):
            raise ValueError(
                f"weights given as a dict need one key per source name, {names}; got the keys "
                f"{sorted(by_name)}. Or give a list in the sources' order: weights="
                f"{[by_name.get(n, '?') for n in names]!r}")
        weights = [by_name[n] for n in names]
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise ValueError(f"weights must be a list of {len(lengths)} positive numbers, one per "
                         f"source in the sources' order ({names}), got {weights!r}")
    if len(weights) != len(lengths) or any(
            isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0
            or not math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be {len(lengths)} positive numbers, one per source "
                         f"in the sources' order ({names}), got {weights!r}")
    total = sum(lengths) if samples_per_epoch is None else samples_per_epoch
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise ValueError(f"samples_per_epoch must be a positive int, got "
                         f"{samples_per_epoch!r}")
    return [float(w) / float(sum(weights)) for w in weights], total


def _names(sources: Sequence[Any] | Mapping[str, Any]) -> tuple[list[str], list[Any]]:
    if isinstance(sources, Mapping):
        return [str(k) for k in sources], list(sources.values())
    if isinstance(sources, Sequence) and not isinstance(sources, (str, bytes)):
        return [str(j) for j in range(len(sources))], list(sources)
    raise TypeError(f"sources must be a list or a dict of datasets, got "
                    f"{type(sources).__name__}")


class MixedDataset(Dataset[Any]):
    """Map-style sources mixed with fixed proportions (see the module docstring).

    Args:
        sources: map-style datasets (with ``__len__``), a list or a ``{name: dataset}`` dict
            (streaming sources mix in a `MixedStream`).
        weights: each source's share of an epoch (any positive numbers; normalised): a list
            in the sources' order, or a dict keyed by the sources' names. Default: in
            proportion to their lengths (a plain concatenation).
        samples_per_epoch: positions of a mixed epoch; default: the sources' total length.
        seed: seeds each source's own epoch order (``seed + j`` for source ``j``).
        shuffle: each source's own epochs in a permuted order (else in index order). It
            decides *which* samples of a source fill its positions, not where the positions
            go: batches mix the sources because the loader's sampler shuffles the positions
            (its default); with the loader's ``shuffle=False`` the batches take one source's
            range after the other.

    Call `set_epoch` every epoch (`DistributedLoader` does, like it does its sampler's). Use
    it like any map-style dataset:

    ```python
    mix = hi.MixedDataset({"web": web, "code": code, "books": books},
                          weights=[0.6, 0.3, 0.1], samples_per_epoch=1_000_000)
    loader = hi.DistributedLoader(mix, global_batch_size=1024)
    ```
    """

    def __new__(cls, sources: Any = (), *args: Any, **kwargs: Any) -> Any:
        """Deprecated: streaming sources (``IterableDataset``s) make a `MixedStream`, with a
        ``DeprecationWarning``; build ``MixedStream(...)`` yourself (removed in 0.4)."""
        values = list(sources.values()) if isinstance(sources, Mapping) else sources
        if cls is MixedDataset and isinstance(values, Sequence) and any(
                isinstance(d, IterableDataset) for d in values):
            warn_deprecated("horovod_iter.MixedDataset(...) of streaming sources (which made "
                            "a MixedStream)", "horovod_iter.MixedStream(...) with the same "
                            "arguments")
            return MixedStream(sources, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, sources: Sequence[Any] | Mapping[str, Any],
                 weights: Sequence[float] | Mapping[str, float] | None = None, *,
                 samples_per_epoch: int | None = None,
                 seed: int = 0, shuffle: bool = True) -> None:
        names, datasets = _names(sources)
        if not datasets:
            raise ValueError("sources is empty: pass at least one dataset")
        lengths = []
        for name, d in zip(names, datasets):
            if not hasattr(d, "__getitem__") or not hasattr(d, "__len__"):
                raise TypeError(f"source {name!r} ({type(d).__name__}) is not a map-style "
                                "dataset (__getitem__ and __len__); mix streaming sources as "
                                "ShardedDatasets with canonical_ranks= (see MixedStream)")
            if len(d) == 0:
                raise ValueError(f"source {name!r} is empty (len 0); drop it or fix its path")
            lengths.append(len(d))
        weights, total = _shares(weights, names, lengths, samples_per_epoch)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.names, self.sources = names, datasets
        self.lengths = lengths
        self.weights = weights
        self.counts = _counts(self.weights, total)
        self._starts = np.cumsum([0, *self.counts])
        self.seed, self.shuffle = seed, bool(shuffle)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the mixed epoch (and so every source's draws of it)."""
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch = epoch

    def __len__(self) -> int:
        return int(self._starts[-1])

    def fingerprint(self) -> str:
        """What decides every draw (sources' names and lengths, weights, the epoch's counts,
        seed, shuffle): the loader compares it over the ranks and with a saved state, so a
        mix built otherwise on one rank, or resumed into another mix, is refused."""
        blob = repr((self.names, self.lengths, self.weights, self.counts, self.seed,
                     self.shuffle)).encode()
        digest = hashlib.blake2b(blob, digest_size=8).hexdigest()
        return f"MixedDataset({len(self.sources)} sources, {digest})"

    def source_of(self, indices: Any) -> np.ndarray:
        """The source of each mixed index (an int array), vectorised."""
        idx = np.asarray(indices, dtype=np.int64)
        return np.searchsorted(self._starts, idx, side="right") - 1

    def locate(self, indices: Any) -> tuple[np.ndarray, np.ndarray]:
        """(source, index into that source) of each mixed index of the current epoch."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            bad = int(idx[(idx < 0) | (idx >= len(self))][0])
            raise IndexError(f"MixedDataset index {bad} out of range for {len(self)} samples")
        src = self.source_of(idx)
        inner = np.empty_like(idx)
        for j in np.unique(src).tolist():
            sel = src == j
            n = self.lengths[j]
            draws = self.epoch * self.counts[j] + (idx[sel] - self._starts[j])
            pos, src_epoch = draws % n, draws // n
            if not self.shuffle:
                inner[sel] = pos
                continue
            # a small source spans many of its epochs in one batch: all at once
            inner[sel] = permute_epochs(pos, n, self.seed + j, src_epoch)
        return src, inner

    def __getitem__(self, index: int) -> Any:
        src, inner = self.locate([index])
        return self.sources[int(src[0])][int(inner[0])]

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        """A batch, each source asked once (its own ``__getitems__`` where it has one)."""
        src, inner = self.locate(indices)
        out: list[Any] = [None] * len(src)
        for j in np.unique(src).tolist():
            where = np.flatnonzero(src == j)
            d = self.sources[j]
            keys = inner[where].tolist()
            many = getattr(d, "__getitems__", None)
            got = many(keys) if callable(many) else [d[k] for k in keys]
            for w, g in zip(where.tolist(), got):
                out[w] = g
        return out

    def proportions(self, counts: Sequence[int]) -> dict[str, float]:
        """Samples per source (e.g. ``loader.stats()["source_counts"]``) as fractions."""
        total = sum(counts)
        return {n: (c / total if total else 0.0) for n, c in zip(self.names, counts)}

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}: {w:.3g} ({c} of {ln}/epoch)" for n, w, c, ln in
                          zip(self.names, self.weights, self.counts, self.lengths))
        return f"MixedDataset({parts})"


class MixedStream(IterableDataset[Any]):
    """Streaming sources mixed with fixed proportions: every global batch takes ``g_j`` records
    from source ``j`` (``g_j`` from the weights, largest remainders, summing to the global
    batch), so each global batch holds the proportions exactly ("stratified"). Canonical rank
    ``rho`` gives ``G / canonical_ranks`` of them, in a share that rotates with the step, so
    every stream of a source is read at the same rate.

    The sources are `ShardedDataset`s with the same canonical layout (``canonical_ranks``
    and ``canonical_workers``). Each canonical stream of a source runs through
    the source's epochs one after another (a new shard order each), so every record of a
    source's epoch is read exactly once, a small source repeats and a large one spans several
    mixed epochs. A mixed epoch is ``samples_per_epoch // global_batch`` steps, the same on
    every rank. Where a stream stands is a pure function of the global step, so the state is
    a count: saved by any rank alone, resumed on any world the layouts allow, with the same
    global batches.

    ```python
    web = hi.ShardedDataset(web_shards, read, sizes=web_sizes, canonical_ranks=8)
    code = hi.ShardedDataset(code_shards, read, sizes=code_sizes, canonical_ranks=8)
    mix = hi.MixedStream({"web": web, "code": code}, weights=[0.7, 0.3],
                         samples_per_epoch=1_000_000)
    loader = hi.DistributedLoader(mix, global_batch_size=512)
    ```
    """

    #: the loader resumes it from one state, on any world the layouts allow
    elastic_state = True

    def __init__(self, sources: Sequence[Any] | Mapping[str, Any],
                 weights: Sequence[float] | Mapping[str, float] | None = None, *,
                 samples_per_epoch: int | None = None,
                 seed: int | None = None, shuffle: bool | None = None,
                 rank: int | None = None, num_replicas: int | None = None) -> None:
        if seed is not None or shuffle is not None:
            raise ValueError("a MixedStream takes its order from its sources: give seed= and "
                             "shuffle= to each ShardedDataset, not to the mix")
        names, datasets = _names(sources)
        if not datasets:
            raise ValueError("sources is empty: pass at least one dataset")
        for name, d in zip(names, datasets):
            if not isinstance(d, ShardedDataset) or d.canonical is None:
                raise TypeError(
                    f"source {name!r} ({type(d).__name__}) cannot be mixed as a stream: "
                    "streaming sources must be ShardedDatasets with a canonical layout "
                    "(sizes=..., canonical_ranks=...), whose positions are counts; map-style "
                    "sources mix in a MixedDataset of map-style sources only")
        layouts = {tuple(d.canonical) for d in datasets}
        if len(layouts) != 1:
            raise ValueError(f"the sources' canonical layouts differ ((canonical_ranks, "
                             f"canonical_workers): {sorted(layouts)}): build them alike")
        lengths = [sum(d.sizes) for d in datasets]
        weights, total = _shares(weights, names, lengths, samples_per_epoch)
        self.names, self.sources, self.lengths = names, datasets, lengths
        self.weights = weights
        self.samples_per_epoch = total
        #: the sources' (canonical ranks, canonical workers), for the loader
        self.canonical: tuple[int, int] = layouts.pop()
        self.shares: list[int] = []
        self._rows: list[list[int]] = []
        self._batching: tuple[int, bool] | None = None
        self._resume: dict[str, Any] | None = None
        self._own: dict[tuple[int, int], int] = {}
        self._consumer = (0, 1)
        self.epoch = 0
        if rank is None or num_replicas is None:
            b = get_backend()
            rank = b.rank if rank is None else rank
            num_replicas = b.size if num_replicas is None else num_replicas
        self.set_world(num_replicas, rank)

    # -- configuration ----------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the mixed epoch."""
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch = epoch

    def set_world(self, num_replicas: int, rank: int) -> None:
        """This rank's place in the world (the loader calls it after an elastic reset)."""
        for d in self.sources:
            d.set_world(num_replicas, rank)
        self.rank, self.num_replicas = rank, num_replicas

    def set_batching(self, global_batch: int, drop_last: bool = False) -> None:
        """The global batch size the steps are cut for (`DistributedLoader` sets it)."""
        r = self.canonical[0]
        if not isinstance(global_batch, int) or global_batch < r or global_batch % r:
            raise ValueError(f"global batch size {global_batch!r} is not a multiple of "
                             f"canonical_ranks={r}: every canonical rank gives the same number "
                             f"of records to a step; use a multiple of {r}")
        shares = _counts(self.weights, global_batch)
        empty = [n for n, g in zip(self.names, shares) if g == 0]
        if empty:
            raise ValueError(f"a global batch of {global_batch} gives source(s) {empty} no "
                             f"record at weights {self.weights}: use a global batch of at "
                             f"least {math.ceil(1 / min(self.weights))}")
        if self.samples_per_epoch < global_batch:
            raise ValueError(f"samples_per_epoch={self.samples_per_epoch} is less than one "
                             f"global batch ({global_batch})")
        self._batching = (global_batch, bool(drop_last))
        self.shares = shares
        # a step's G records as R rows of G/R, filled source after source; canonical rank rho
        # takes row (rho + step // K) mod R, so each of its streams (one use per K steps)
        # cycles through every row: every stream of a source is read at the same rate
        per, starts = global_batch // r, np.cumsum([0, *shares]).tolist()
        self._rows = [[max(0, min((t + 1) * per, starts[j + 1]) - max(t * per, starts[j]))
                       for j in range(len(shares))] for t in range(r)]

    @property
    def steps_per_epoch(self) -> int:
        """Global steps of a mixed epoch: ``samples_per_epoch // global_batch``."""
        if self._batching is None:
            raise ValueError("set_batching(global_batch) first (DistributedLoader does)")
        return self.samples_per_epoch // self._batching[0]

    def fingerprint(self) -> str:
        """What every rank must agree on: the sources', the weights and the epoch size."""
        blob = repr(([d.fingerprint() for d in self.sources], self.weights,
                     self.samples_per_epoch)).encode()
        digest = hashlib.blake2b(blob, digest_size=8).hexdigest()
        return f"MixedStream({len(self.sources)} sources, {digest})"

    def layout(self, world: int, workers: int,
               resume: dict[str, Any] | None = None) -> _MixLayout:
        """The pass's shape; refuses a world that a source's layout does not allow."""
        if self._batching is None:
            raise ValueError("the mix cuts steps of a global batch size: iterate it with "
                             "DistributedLoader, or call set_batching(global_batch) first")
        for d in self.sources:
            r, k = d.canonical
            check_world(r, k, world, workers, None, sum(d.sizes))
        start = resume["step"] if resume is not None and resume["epoch"] == self.epoch else 0
        return _MixLayout(self.steps_per_epoch, start, self._batching[0])

    def _cell(self, rho: int, j: int, step: int) -> int:
        """Records canonical rank ``rho`` takes from source ``j`` at global ``step``."""
        return self._rows[(rho + step // self.canonical[1]) % len(self._rows)][j]

    def _before(self, j: int, rho: int, kind: int, step: int) -> int:
        """Records stream ``(rho, kind)`` of source ``j`` gave to the global steps before
        ``step`` (its ``i``-th use takes row ``rho + i``): O(canonical ranks)."""
        k, r = self.canonical[1], len(self._rows)
        n = max(0, (step - kind + k - 1) // k)
        col = [self._rows[(rho + i) % r][j] for i in range(r)]
        return n // r * sum(col) + sum(col[:n % r])

    # -- iteration ------------------------------------------------------------------------
    def __len__(self) -> int:
        """Records this rank reads in a mixed epoch."""
        if self._batching is None:
            raise TypeError("len() of a MixedStream needs the global batch: set_batching()")
        return self.steps_per_epoch * self._batching[0] // self.num_replicas

    def __iter__(self) -> Iterator[Any]:
        return itertools.chain.from_iterable(self.step_batches())

    def step_batches(self) -> Iterator[list[Any]]:
        """This consumer's batches: steps ``j, j+w, ...`` of the pass for worker ``j``."""
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        lay = self.layout(self.num_replicas, workers, self._resume)
        self._consumer = (self.rank * workers + worker, self.num_replicas * workers)
        first = self.epoch * lay.steps + lay.start  # the pass's first global step
        mine = range(first + worker, (self.epoch + 1) * lay.steps, workers)
        self._own = {}
        for j, d in enumerate(self.sources):
            r, k = d.canonical
            per = r // self.num_replicas
            for step in mine[:k // workers]:  # the stream kinds this worker reads
                for rho in range(self.rank * per, (self.rank + 1) * per):
                    self._own[j, rho * k + step % k] = self._before(j, rho, step % k, step)
        return self._run(mine)

    def _run(self, mine: range) -> Iterator[list[Any]]:
        streams: dict[tuple[int, int], Iterator[Any]] = {}
        try:
            for step in mine:
                batch: list[Any] = []
                for j, d in enumerate(self.sources):
                    r, k = d.canonical
                    per = r // self.num_replicas
                    for rho in range(self.rank * per, (self.rank + 1) * per):
                        n = self._cell(rho, j, step)
                        if not n:
                            continue
                        key = (j, rho * k + step % k)
                        it = streams.get(key)
                        if it is None:
                            it = streams[key] = self._endless(d, key[1], self._own[key])
                        batch.extend(itertools.islice(it, n))
                        self._own[key] += n
                yield batch
        finally:
            close_streams(streams.values())

    @staticmethod
    def _endless(d: Any, stream: int, start: int) -> Iterator[Any]:
        """Canonical stream ``stream`` of source ``d`` through its epochs, one after another,
        from its record ``start`` (counted from epoch 0) on."""
        r, k = d.canonical
        epoch, offset = stream_position(sum(d.sizes), r * k, stream, start)
        for e in itertools.count(epoch):
            yield from d.streams.stream(stream, e, offset)
            offset = 0

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This consumer's streams' positions (inside its worker)."""
        c, n = self._consumer
        return {"consumer": c, "consumers": n, "epoch": self.epoch,
                "streams": sorted([j, s, o] for (j, s), o in self._own.items())}

    def canonical_state(self, steps: int, base: dict[str, Any] | None, world: int,
                        workers: int, local: dict[int, Any]) -> dict[str, Any]:
        """The mix's position after ``steps`` batches of this epoch: the step itself (every
        stream's position follows from it), checked against this rank's consumers."""
        resume = self._normalise(base) if base is not None else None
        lay = self.layout(world, workers, resume)
        step = self.epoch * lay.steps + steps
        for c, st in local.items():
            for j, s, off in (st or {}).get("streams", ()):
                k = self.canonical[1]
                want = self._before(j, s // k, s % k, step)
                if want != off:
                    raise RuntimeError(
                        f"rank {self.rank}: consumer {c} read stream {s} of source "
                        f"{self.names[j]!r} to record {off}, but the mix says {want} after "
                        f"{steps} steps; the position cannot be saved exactly (please report)")
        return {"type": _MIX_STATE, "version": 1, "epoch": self.epoch, "step": steps,
                "global_batch": lay.global_batch, "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Make the next iteration resume from ``state`` (``None``: start afresh)."""
        if state is None:
            self._resume = None
            return
        self._resume = self._normalise(state)
        self.epoch = self._resume["epoch"]

    def _normalise(self, state: Any) -> dict[str, Any]:
        if not isinstance(state, dict) or state.get("type") != _MIX_STATE:
            raise ValueError(f"not a MixedStream state: {state!r:.200}")
        if state.get("fingerprint") != self.fingerprint():
            raise ValueError(f"the MixedStream state was saved for {state.get('fingerprint')}"
                             f", this mix is {self.fingerprint()} (other sources, weights or "
                             "samples_per_epoch): build the mix as it was saved")
        if self._batching is not None and state.get("global_batch") != self._batching[0]:
            raise ValueError(f"the MixedStream state was saved with a global batch of "
                             f"{state.get('global_batch')}, this loader has "
                             f"{self._batching[0]}: the positions are counted in its steps; "
                             f"resume with global_batch_size={state.get('global_batch')}")
        try:
            epoch, step = int(state["epoch"]), int(state["step"])
        except (KeyError, TypeError, ValueError):
            raise ValueError("invalid MixedStream state: expected 'epoch' and 'step'") from None
        return {"epoch": epoch, "step": step}

    # -- figures --------------------------------------------------------------------------
    def rank_source_counts(self, steps: int) -> list[int]:
        """Records of each source in this rank's first ``steps`` batches of the epoch."""
        if self._batching is None:
            return [0] * len(self.sources)
        r, k = len(self._rows), self.canonical[1]
        per = r // self.num_replicas
        first = self.epoch * self.steps_per_epoch

        def upto(x: int, m: int) -> int:  # steps before x whose row rotation is m
            return x // (k * r) * k + min(k, max(0, x % (k * r) - m * k))

        out = [0] * len(self.sources)
        for m in range(r):
            n = upto(first + steps, m) - upto(first, m)
            for rho in range(self.rank * per, (self.rank + 1) * per):
                for j in range(len(out)):
                    out[j] += n * self._rows[(rho + m) % r][j]
        return out

    def proportions(self, counts: Sequence[int]) -> dict[str, float]:
        """Records per source as fractions."""
        total = sum(counts)
        return {n: (c / total if total else 0.0) for n, c in zip(self.names, counts)}


_MIX_STATE = "horovod_iter.MixedStream"


class _MixLayout:
    """A pass of a `MixedStream`: every rank takes the epoch's steps from ``start`` on."""

    def __init__(self, steps: int, start: int, global_batch: int) -> None:
        self.steps, self.start, self.global_batch = steps, start, global_batch

    def rank_batches(self, rank: int) -> int:
        return max(0, self.steps - self.start)
