"""horovod_iter: a distributed input pipeline for PyTorch under Horovod, torchrun or alone.

Public API (everything else is private and may change):

* ``init``, ``get_backend``, ``shutdown``, ``Backend``: ranks and collectives;
  ``gather_rows``: the exact evaluation gather (ranks with different row counts).
* ``DistributedLoader`` / ``DistributedIterator``: the input pipeline: sampler -> fetch ->
  allreduce-synchronised end of data -> CUDA-stream prefetch.
* ``DistributedSampler``: disjoint epoch-seeded slices, O(1) memory, exact resume.
* ``LengthGroupedBatchSampler``: distributed batches of similar lengths, resumable anywhere.
* ``mask_labels``, ``flag_padding``: mark the rows ``even_batches=True`` pads with.
* ``EpochPlan``: the pure layout of an epoch over the ranks.
* ``CudaPrefetcher``: side-stream host->GPU prefetch around any iterable.
* ``ShardedDataset``: streaming shards, each read once over the world, resumable on any world.
* ``MixedDataset``: sources mixed in fixed proportions, per-source epochs (map-style; or
  streaming ``ShardedDataset``s with a canonical layout, as a ``MixedStream``).
* ``shard``: split an iterable by rank and DataLoader worker (every consumer reads it all).
* ``read_tar``: a fast, resumable reader of WebDataset-layout tar shards.
* The exceptions of ``horovod_iter.errors``.

With Horovod installed, importing the package registers the Horovod elastic state handlers
(``horovod_iter.integrations.horovod_elastic``), so ``hvd.elastic.TorchState(loader=...)``
works.
"""
from __future__ import annotations

import importlib.util

from .backend import Backend, gather_rows, get_backend, init, shutdown
from .batching import LengthGroupedBatchSampler
from .errors import (
    BackendError,
    ConfigMismatchError,
    DataTimeoutError,
    HorovodIterError,
    OutOfRangeError,
    RankFailureError,
    SampleError,
    ShardingError,
    UnevenDataError,
)
from .fetch import shard
from .formats import read_tar
from .iterator import DistributedIterator
from .loader import DistributedLoader
from .mixing import MixedDataset, MixedStream
from .padding import flag_padding, mask_labels
from .plan import EpochPlan
from .prefetch import CudaPrefetcher
from .sampler import DistributedSampler
from .sharded import ShardedDataset

__version__ = "0.2.0"

__all__ = [
    "Backend",
    "BackendError",
    "ConfigMismatchError",
    "CudaPrefetcher",
    "DataTimeoutError",
    "DistributedIterator",
    "DistributedLoader",
    "DistributedSampler",
    "EpochPlan",
    "HorovodIterError",
    "LengthGroupedBatchSampler",
    "MixedDataset",
    "MixedStream",
    "OutOfRangeError",
    "RankFailureError",
    "SampleError",
    "ShardedDataset",
    "ShardingError",
    "UnevenDataError",
    "flag_padding",
    "gather_rows",
    "get_backend",
    "init",
    "mask_labels",
    "read_tar",
    "shard",
    "shutdown",
]

if importlib.util.find_spec("horovod") is not None:
    try:
        from .integrations import horovod_elastic as _horovod_elastic  # noqa: F401
    except ImportError:  # Horovod without its torch part: nothing to register with
        pass
