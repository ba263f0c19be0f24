"""Exceptions raised by horovod_iter.

Every error says what went wrong, on which rank (and step, when it is about the
end-of-data check), and what to do about it.
"""
from __future__ import annotations

__all__ = [
    "BackendError",
    "ConfigMismatchError",
    "DataTimeoutError",
    "OutOfRangeError",
    "UnevenDataError",
]


class BackendError(RuntimeError):
    """A backend was asked for that is unavailable or contradicts the one in use."""


class DataTimeoutError(TimeoutError):
    """A rank waited longer than ``timeout`` for the other ranks (a stalled or dead rank)."""


class UnevenDataError(RuntimeError):
    """Ranks ran out of data at different steps and ``uneven="error"`` was asked for."""


class ConfigMismatchError(ValueError):
    """Ranks were configured differently (dataset length, batch size, seed, ...)."""


class OutOfRangeError(Exception):
    """Raised by ``DistributedIterator.get_next()`` at the end of data, at the same step on
    every rank (TensorFlow's ``tf.errors.OutOfRangeError``)."""
