"""Horovod elastic: ``hvd.elastic.TorchState(..., loader=loader)`` just works.

Horovod's ``TorchState`` looks up a handler for each attribute in the registry of
``horovod.torch.elastic.state``. Importing this module (``import horovod_iter`` does when
Horovod is installed) adds handlers for `DistributedLoader` and
`DistributedSampler`; they use only the public ``state_dict()``,
``load_state_dict()`` and ``abandon()``:

* ``commit()``/``save()`` keeps the state dict: a few integers, O(1) in the dataset (Horovod's
  own ``ElasticSampler`` allgathers the sets of processed indices: O(n)).
* ``restore()`` (after a rank failed) rolls back to the last commit: the batches handed out
  since are handed out again, so every sample is still trained on exactly once per epoch.
* ``sync()`` (after a reset) closes the pass in flight without waiting for its collectives,
  takes rank 0's last commit, and loads it: the next ``iter()`` lays the rest of the epoch out
  over the new world (for ``ShardedDataset``: deals the unfinished shards anew). A reset
  that skips ``sync()`` (ranks only removed) is noticed by the loader itself at the next
  ``iter()``, which reloads the last state every rank agreed on.
"""
from __future__ import annotations

import copy
import logging
from typing import Any

import horovod.torch as hvd
from horovod.torch.elastic import state as hvd_state

from ..backend import get_backend
from ..loader import DistributedLoader
from ..sampler import DistributedSampler

__all__ = ["LoaderStateHandler", "SamplerStateHandler", "register"]

log = logging.getLogger("horovod_iter")


class _StateDictHandler(hvd_state.StateHandler):
    """commit keeps ``state_dict()``, restore loads it back."""

    def __init__(self, value: Any) -> None:
        super().__init__(value)
        self._saved: dict[str, Any] = {}
        self.save()

    def save(self) -> None:
        self._saved = copy.deepcopy(self.value.state_dict())

    def restore(self) -> None:
        self.value.load_state_dict(self._saved)

    def _broadcast_state(self, name: str) -> dict[str, Any]:
        """Rank 0's last commit. Not the live state: after a reset the world changed, and a
        live state of sharded data would have to be gathered from ranks that may be gone;
        every rank holds the whole committed state (rank 0's is the one Horovod syncs).
        Through our backend: bounded, and a failure is our (Horovod-internal) error, on which
        Horovod elastic resets again."""
        state: dict[str, Any] = get_backend().broadcast_object(
            self._saved, root=0, what=f"rank 0's committed state ({name})")
        self._saved = copy.deepcopy(state)
        return state


class LoaderStateHandler(_StateDictHandler):
    """Save/restore/sync a `DistributedLoader` in a Horovod elastic state."""

    def restore(self) -> None:
        self.value.abandon()
        super().restore()

    def sync(self) -> None:
        loader: DistributedLoader = self.value
        loader.abandon()
        loader.backend.on_world_change()
        loader.load_state_dict(self._broadcast_state("horovod_iter.elastic.loader"))
        log.info("rank %d: loader synced after an elastic reset: %d ranks, epoch %d",
                 hvd.rank(), hvd.size(), loader.epoch)


class SamplerStateHandler(_StateDictHandler):
    """Save/restore/sync a standalone `DistributedSampler`."""

    def sync(self) -> None:
        sampler: DistributedSampler = self.value
        get_backend().on_world_change()
        state = self._broadcast_state("horovod_iter.elastic.sampler")
        sampler.set_world(hvd.size(), hvd.rank())
        sampler.load_state_dict(state)


def register() -> None:
    """Put our handlers in Horovod's elastic state registry (idempotent; done on import)."""
    ours = (DistributedLoader, DistributedSampler)
    registry: list[Any] = [(t, h) for t, h in hvd_state.get_handler_registry()
                           if t not in ours]
    registry += [(DistributedLoader, LoaderStateHandler),
                 (DistributedSampler, SamplerStateHandler)]
    hvd_state.set_handler_registry(registry)


register()
