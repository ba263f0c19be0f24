"""The canonical layout's pure index math, moved to `horovod_iter.shards.canonical` (with
`CanonicalStreams`): this path keeps old imports working."""
from __future__ import annotations

from .shards.canonical import (
    BLOCK,
    Layout,
    check_world,
    merge_key,
    merge_offsets,
    stream_lengths,
    stream_pieces,
    stream_position,
    window_labels,
)

__all__ = ["BLOCK", "Layout", "check_world", "merge_key", "merge_offsets", "stream_lengths",
           "stream_pieces", "stream_position", "window_labels"]
