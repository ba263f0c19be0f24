"""Every exception horovod_iter raises on purpose, in one place (all exported).

Each error says what went wrong, on which rank (and step, when it is about the end of data),
and what to do about it. The hierarchy::

    HorovodIterError
    ├── BackendError            a backend is unavailable or contradicts the one in use
    ├── RankFailureError        another rank died, raised, or stopped answering
    │   └── DataTimeoutError    ... and we waited longer than ``timeout`` for it
    ├── UnevenDataError         ranks' data ends at different steps with uneven="error"
    ├── ConfigMismatchError     ranks were configured (or iterated) differently
    ├── SampleError             reading or collating a sample failed (names rank and index)
    ├── ShardingError           already-sharded data is being sharded again (a framework's
    │                           distributed sampler around ours): each rank would see 1/W of its 1/W
    └── OutOfRangeError         ``get_next()`` at the end of data (TensorFlow's name)

Under Horovod, a rank failure is raised as
``horovod_iter.backend_horovod.HorovodRankFailureError``: a `RankFailureError` that is
also Horovod's ``HorovodInternalError``, so ``hvd.elastic.run`` resets on it.
"""
from __future__ import annotations

__all__ = [
    "BackendError",
    "ConfigMismatchError",
    "DataTimeoutError",
    "HorovodIterError",
    "OutOfRangeError",
    "RankFailureError",
    "SampleError",
    "ShardingError",
    "UnevenDataError",
]


class HorovodIterError(Exception):
    """Base class of the library's errors."""


class BackendError(HorovodIterError, RuntimeError):
    """A backend was asked for that is unavailable or contradicts the one in use."""


class RankFailureError(HorovodIterError, RuntimeError):
    """A collective failed because another rank died, raised, or left the job."""


class DataTimeoutError(RankFailureError, TimeoutError):
    """A rank waited longer than ``timeout`` for the other ranks (a stalled or dead rank)."""


class UnevenDataError(HorovodIterError, RuntimeError):
    """Ranks ran out of data at different steps and ``uneven="error"`` was asked for."""


class ConfigMismatchError(HorovodIterError, ValueError):
    """Ranks were configured differently (dataset length, batch size, seed, ...), or one rank
    iterated a loader that the others did not."""


class SampleError(HorovodIterError, RuntimeError):
    """Reading or collating samples failed; the message names the rank and the indices (or,
    for iterable data, the rank and the step)."""


class ShardingError(HorovodIterError, ValueError):
    """Data already split over the ranks by horovod_iter is being split again by another
    distributed sampler (a framework's injection or a wrapper): every rank would see only
    1/W of its own slice. Raised on every rank alike, naming the wrapper and the fix."""


class OutOfRangeError(HorovodIterError):
    """Raised by ``DistributedIterator.get_next()`` at the end of data, at the same step on
    every rank (TensorFlow's ``tf.errors.OutOfRangeError``)."""
