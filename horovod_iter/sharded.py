"""`ShardedDataset`, moved to `horovod_iter.shards.dataset` (its pieces: ``shards/``): this
path keeps old imports working. It is that module itself (one entry in ``sys.modules``), so
that code patching a name here - tests patch ``get_worker_info`` - patches what the dataset
reads."""
from __future__ import annotations

import sys

from .shards import dataset as _dataset
from .shards.dataset import ShardedDataset

__all__ = ["ShardedDataset"]

sys.modules[__name__] = _dataset
