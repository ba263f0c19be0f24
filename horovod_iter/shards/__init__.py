"""`ShardedDataset` by job: ``deal`` (pure: the epoch's shard order, the deal to consumers,
the deal anew after a change of layout, the merge of their positions), ``reader`` (one shard
reader: seek or skip, cache pin and release, the seeded interleave, the shuffle buffer),
``canonical`` (the canonical layout: pure index math, and `CanonicalStreams`, whose
``stream(j, epoch, start)`` `MixedStream` reads), ``remote`` (the shard cache for object
stores) and ``dataset`` (`ShardedDataset`: checks, world and epoch, the two layouts)."""
from __future__ import annotations

from .dataset import ShardedDataset

__all__ = ["ShardedDataset"]
