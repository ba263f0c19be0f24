"""MixedDataset: several map-style sources mixed in fixed proportions, as one map-style dataset.

An epoch of the mix has ``samples_per_epoch`` positions; source ``j`` owns a contiguous range of
``c_j`` of them (``c_j`` from the weights, largest remainders, summing to the epoch). Position
``t`` of source ``j``'s range in mixed epoch ``e`` is that source's draw ``k = e * c_j + t``,
which is sample ``k mod len_j`` of the source's own epoch ``k // len_j`` - in that epoch's order,
a `permute()` of the source from ``(seed + j, k // len_j)``. So each source runs through its own
epochs (a small corpus repeats, a large one is spread over several mixed epochs), every sample
of a source's epoch is drawn exactly once, and everything is a pure function of (seed, epoch).

The sampler (`DistributedSampler`, or the loader's) permutes and deals the positions as for
any map-style dataset, which interleaves the sources uniformly in every batch and gives the mix
the map-style guarantees for free: exactly once per epoch over the world, an O(1) resume on any
world size, the same global batches at any world size with ``global_batch_size``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from .permutation import permute

__all__ = ["MixedDataset"]


def _counts(weights: Sequence[float], total: int) -> list[int]:
    """``total`` split in proportion to ``weights`` (largest remainders: sums exactly)."""
    s = float(sum(weights))
    raw = [w / s * total for w in weights]
    out = [math.floor(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda j: (out[j] - raw[j], j))
    for j in order[: total - sum(out)]:
        out[j] += 1
    return out


class MixedDataset(Dataset[Any]):
    """Map-style sources mixed with fixed proportions (see the module docstring).

    Args:
        sources: map-style datasets (with ``__len__``), a list or a ``{name: dataset}`` dict.
        weights: each source's share of an epoch (any positive numbers; normalised). Default:
            in proportion to their lengths (a plain concatenation).
        samples_per_epoch: positions of a mixed epoch; default: the sources' total length.
        seed: seeds each source's own epoch order (``seed + j`` for source ``j``).
        shuffle: each source's epochs in a permuted order (else in index order).

    Call `set_epoch` every epoch (`DistributedLoader` does, like it does its sampler's). Use
    it like any map-style dataset:

    ```python
    mix = hi.MixedDataset({"web": web, "code": code, "books": books},
                          weights=[0.6, 0.3, 0.1], samples_per_epoch=1_000_000)
    loader = hi.DistributedLoader(mix, global_batch_size=1024)
    ```
    """

    def __init__(self, sources: Sequence[Any] | Mapping[str, Any],
                 weights: Sequence[float] | None = None, *, samples_per_epoch: int | None = None,
                 seed: int = 0, shuffle: bool = True) -> None:
        if isinstance(sources, Mapping):
            names, datasets = [str(k) for k in sources], list(sources.values())
        elif isinstance(sources, Sequence) and not isinstance(sources, (str, bytes)):
            datasets = list(sources)
            names = [str(j) for j in range(len(datasets))]
        else:
            raise TypeError(f"sources must be a list or a dict of map-style datasets, got "
                            f"{type(sources).__name__}")
        if not datasets:
            raise ValueError("sources is empty: pass at least one dataset")
        lengths = []
        for name, d in zip(names, datasets):
            if not hasattr(d, "__getitem__") or not hasattr(d, "__len__"):
                raise TypeError(f"source {name!r} ({type(d).__name__}) is not a map-style "
                                "dataset (__getitem__ and __len__); stream iterable sources "
                                "through ShardedDataset, one loader each")
            if len(d) == 0:
                raise ValueError(f"source {name!r} is empty (len 0); drop it or fix its path")
            lengths.append(len(d))
        if weights is None:
            weights = [float(n) for n in lengths]
        if len(weights) != len(datasets) or any(
                isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0
                or not math.isfinite(w) for w in weights):
            raise ValueError(f"weights must be {len(datasets)} positive numbers (one per "
                             f"source), got {weights!r}")
        total = sum(lengths) if samples_per_epoch is None else samples_per_epoch
        if isinstance(total, bool) or not isinstance(total, int) or total < 1:
            raise ValueError(f"samples_per_epoch must be a positive int, got "
                             f"{samples_per_epoch!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.names, self.sources = names, datasets
        self.lengths = lengths
        self.weights = [float(w) / float(sum(weights)) for w in weights]
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
            out = np.empty_like(pos)
            for f in np.unique(src_epoch).tolist():  # at most two source epochs per mixed one
                at = src_epoch == f
                out[at] = permute(pos[at], n, self.seed + j, int(f))
            inner[sel] = out
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
