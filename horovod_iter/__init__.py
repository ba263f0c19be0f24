"""horovod_iter: a distributed input pipeline for PyTorch under Horovod, torchrun or alone.

Public API (everything else is private and may change):

* :func:`init`, :func:`get_backend`, :func:`shutdown`, :class:`Backend` - ranks and collectives.
* :class:`DistributedSampler` - disjoint epoch-seeded slices, O(1) memory, exact resume.
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
from .sampler import DistributedSampler

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "BackendError",
    "ConfigMismatchError",
    "DataTimeoutError",
    "DistributedSampler",
    "OutOfRangeError",
    "UnevenDataError",
    "get_backend",
    "init",
    "shutdown",
]
