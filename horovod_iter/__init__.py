"""horovod_iter: a distributed input pipeline for PyTorch under Horovod, torchrun or alone.

Public API (everything else is private and may change):

* ``init``, ``shutdown``, ``Backend``: ranks and collectives; ``gather_rows``: the exact
  evaluation gather (ranks with different row counts).
* ``DistributedLoader``: the input pipeline: sampler -> fetch -> allreduce-synchronised end of
  data -> CUDA-stream prefetch. ``iter(loader)`` returns a ``DistributedIterator`` (a type to
  annotate with, never built by users, so not in ``__all__``).
* ``DistributedSampler``: disjoint epoch-seeded slices, O(1) memory, exact resume.
* ``LengthGroupedBatchSampler``: distributed batches of similar lengths, resumable anywhere.
* ``mask_labels``, ``flag_padding``: mark the rows ``even_batches=True`` pads with.
* ``CudaPrefetcher``: side-stream host->GPU prefetch around any iterable.
* ``ShardedDataset``: streaming shards, each read once over the world, resumable on any world.
* ``MixedDataset``: map-style sources mixed in fixed proportions, per-source epochs;
  ``MixedStream``: the same for streaming ``ShardedDataset``s with a canonical layout.
* ``split_stream``: split one stream by rank and DataLoader worker (every consumer reads it
  all and keeps its share).
* ``read_tar``: a fast, resumable reader of WebDataset-layout tar shards.
* The exceptions of ``horovod_iter.errors``.

Deprecated, kept for one release (removed in 0.4), each warning with the name to use:
``get_backend()`` (use ``init()``, which returns the same backend), ``shard()`` (use
``split_stream()``), ``MixedDataset`` of streaming sources (use ``MixedStream``), and
``horovod_iter.EpochPlan`` (import it from ``horovod_iter.plan``; it is not public API).

With Horovod installed, importing the package registers the Horovod elastic state handlers
(``horovod_iter.integrations.horovod_elastic``), so ``hvd.elastic.TorchState(loader=...)``
works.
"""
from __future__ import annotations

import importlib.util
from typing import Any as _Any

from . import backend as _backend
from ._deprecation import warn_deprecated as _warn_deprecated
from .backend import Backend, gather_rows, init, shutdown
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
from .fetch import shard as shard  # deprecated: warns when called
from .fetch import split_stream
from .formats import read_tar
from .iterator import DistributedIterator as DistributedIterator  # iter(loader)'s type
from .loader import DistributedLoader
from .mixing import MixedDataset, MixedStream
from .padding import flag_padding, mask_labels
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
    "DistributedLoader",
    "DistributedSampler",
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
    "init",
    "mask_labels",
    "read_tar",
    "shutdown",
    "split_stream",
]


def get_backend() -> Backend:
    """Deprecated: use `init()`, which returns the same backend (initialised once,
    auto-detected); removed in horovod_iter 0.4."""
    _warn_deprecated("horovod_iter.get_backend()", "horovod_iter.init(), which returns the "
                     "same backend")
    return _backend.get_backend()


def __getattr__(name: str) -> _Any:
    """Names that left the public API, still importable for one release (with a warning)."""
    if name == "EpochPlan":
        _warn_deprecated("horovod_iter.EpochPlan", "horovod_iter.plan.EpochPlan (not public "
                         "API: it may change)")
        from .plan import EpochPlan

        return EpochPlan
    raise AttributeError(f"module 'horovod_iter' has no attribute {name!r}")


if importlib.util.find_spec("horovod") is not None:
    try:
        from .integrations import horovod_elastic as _horovod_elastic  # noqa: F401
    except ImportError:  # Horovod without its torch part: nothing to register with
        pass
