"""Horovod elastic support: ``hvd.elastic.TorchState(..., loader=loader)`` just works.

Horovod's ``TorchState`` looks up a handler for each attribute in the registry of
``horovod.torch.elastic.state`` (``get_handler_registry``/``set_handler_registry``). We add
handlers for :class:`DistributedLoader` and :class:`DistributedSampler` (registered when the
Horovod backend starts, or by calling :func:`register`):

* ``commit()``/``save()`` keeps the loader's state dict - a few integers, O(1) in the dataset
  (Horovod's own ``ElasticSampler`` allgathers the sets of processed indices: O(n)).
* ``restore()`` (after a rank failed) rolls back to the last commit: the batches handed out
  since are handed out again, so every sample is still trained on exactly once per epoch.
* ``sync()`` (after a reset: ranks removed or added) closes the iteration in flight, takes
  rank 0's position, and lays the rest of the epoch out over the new world size.
"""
from __future__ import annotations

import copy
import itertools
import logging
from typing import Any

__all__ = ["register"]

log = logging.getLogger("horovod_iter")


def _state_handler_base() -> type:
    from horovod.torch.elastic.state import StateHandler

    return StateHandler


def _make_handlers() -> tuple[type, type]:
    from horovod.torch import broadcast_object, rank, size

    from .loader import DistributedLoader
    from .sampler import DistributedSampler

    base = _state_handler_base()

    class _StateDictHandler(base):  # type: ignore[misc, valid-type]
        """commit keeps ``state_dict()``, restore loads it back."""

        def __init__(self, value: Any) -> None:
            super().__init__(value)
            self.save()

        def save(self) -> None:
            self._saved = copy.deepcopy(self.value.state_dict())

        def restore(self) -> None:
            self.value.load_state_dict(self._saved)

    class LoaderStateHandler(_StateDictHandler):
        """Save/restore/sync a :class:`DistributedLoader` in a Horovod elastic state."""

        def restore(self) -> None:
            self.value._abandon_active()
            super().restore()

        def sync(self) -> None:
            loader: DistributedLoader = self.value
            loader._abandon_active()
            backend = loader.backend
            if hasattr(backend, "_names"):  # the ranks' op-name counters must agree again
                backend._names = itertools.count()
            name = f"horovod_iter.elastic.loader.{loader._id}"
            state, serial = broadcast_object((loader.state_dict(), loader._serial),
                                             root_rank=0, name=name)
            loader._serial = serial
            loader._rebind_world(size(), rank())
            loader.load_state_dict(state)
            self._saved = copy.deepcopy(state)
            log.info("rank %d: loader synced after an elastic reset: %d ranks, epoch %d",
                     rank(), size(), loader.epoch)

    class SamplerStateHandler(_StateDictHandler):
        """Save/restore/sync a standalone :class:`DistributedSampler`."""

        def sync(self) -> None:
            sampler: DistributedSampler = self.value
            state = broadcast_object(sampler.state_dict(), root_rank=0,
                                     name="horovod_iter.elastic.sampler")
            sampler.num_replicas, sampler.rank = size(), rank()
            sampler.load_state_dict(state)
            self._saved = copy.deepcopy(state)

    return LoaderStateHandler, SamplerStateHandler


_registered = False


def register() -> bool:
    """Add our handlers to Horovod's elastic state registry (idempotent).

    Called when the Horovod backend starts; call it yourself if you build a ``TorchState``
    before anything of ours touched Horovod. Returns False when Horovod's elastic module is
    missing (nothing to register with).
    """
    global _registered
    if _registered:
        return True
    try:
        from horovod.torch.elastic import state as hvd_state
    except ImportError:
        return False
    from .loader import DistributedLoader
    from .sampler import DistributedSampler

    loader_handler, sampler_handler = _make_handlers()
    registry: list[Any] = list(hvd_state.get_handler_registry())
    registry = [(t, h) for t, h in registry if t not in (DistributedLoader, DistributedSampler)]
    registry += [(DistributedLoader, loader_handler), (DistributedSampler, sampler_handler)]
    hvd_state.set_handler_registry(registry)
    _registered = True
    return True
