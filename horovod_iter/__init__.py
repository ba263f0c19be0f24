"""horovod_iter: a distributed input pipeline for PyTorch under Horovod, torchrun or alone.

Public API (everything else is private and may change):

* :func:`init`, :func:`get_backend`, :func:`shutdown`, :class:`Backend` - ranks and collectives.
* :class:`DistributedLoader` / :class:`DistributedIterator` - the input pipeline: sampler ->
  fetch -> allreduce-synchronised end of data -> CUDA-stream prefetch.
* :class:`DistributedSampler` - disjoint epoch-seeded slices, O(1) memory, exact resume.
* :class:`CudaPrefetcher` - side-stream host->GPU prefetch around any iterable.
* :func:`shard` - split an iterable by rank and DataLoader worker.
"""
from __future__ import annotations

from .backend import Backend, get_backend, init, shutdown
from .errors import (
    BackendError,
    ConfigMismatchError,
    DataTimeoutError,
    OutOfRangeError,
    UnevenDataError,
)
from .fetch import shard
from .loader import DistributedIterator, DistributedLoader
from .prefetch import CudaPrefetcher
from .sampler import DistributedSampler

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "BackendError",
    "ConfigMismatchError",
    "CudaPrefetcher",
    "DataTimeoutError",
    "DistributedIterator",
    "DistributedLoader",
    "DistributedSampler",
    "OutOfRangeError",
    "UnevenDataError",
    "get_backend",
    "init",
    "shard",
    "shutdown",
]
