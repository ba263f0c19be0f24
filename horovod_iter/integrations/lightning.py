"""PyTorch Lightning: `LoaderProgress`, a ``Callback`` that tells every `DistributedLoader` of
``trainer.fit()`` what the trainer did with its batches, through Lightning's public hooks.

Lightning sets the epoch on ``dataloader.sampler`` (the loader relays it, iterable data too),
and saves and loads the loader's state in its checkpoints. For data without ``len()`` (a
`ShardedDataset` without ``sizes``, any ``IterableDataset`` without ``__len__``) it also fetches
one batch ahead of the training step, and the loader cannot see that by itself:

* **the position**: the loader has handed out one batch more than the training step took; a
  checkpoint that counted it would skip it on resume. ``on_train_batch_start`` reports the
  trainer's count (``batch_idx + 1``: its batches of this epoch, a resumed epoch's included),
  and the loader's ``state_dict()`` leaves out the batches Lightning holds.
* **the epoch of a resumed fit**: Lightning takes that first batch in its ``setup_data()``,
  before it sets the epoch, so a fit resumed from an epoch-end checkpoint would start with the
  checkpoint's epoch's order. ``on_train_start`` sets the epoch Lightning is about to run and,
  if a loader was in another, restarts Lightning's fetch so its first batch is of that epoch.

Data with ``len()`` (map-style, ``ShardedDataset(sizes=)``, the canonical layout) needs neither:
Lightning fetches nothing ahead, and the callback changes nothing for it.

Every ``Trainer`` gets the callback without user code: horovod_iter registers `callbacks` under
Lightning's entry point for external callbacks (``lightning.pytorch.callbacks_factory``;
``pytorch_lightning.callbacks_factory`` for the older package), so adding it by hand is only
needed where entry points are not installed (running from a source tree). A second instance
does nothing more: the hooks are idempotent.

Limits: the count is the epoch's, so a loader that Lightning restarts within an epoch (a
shorter one in ``CombinedLoader(mode="max_size_cycle")``) is not followed; with a
``training_step(dataloader_iter)`` your step takes the batches itself and nothing is reported.

Example:
    ```python
    import lightning as L
    from horovod_iter.integrations.lightning import LoaderProgress

    trainer = L.Trainer(strategy="ddp", devices=2, callbacks=[LoaderProgress()])
    trainer.fit(model)  # model.train_dataloader() returns a hi.DistributedLoader
    ```
"""
from __future__ import annotations

import functools
import inspect
import logging
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, cast

from ..loader import DistributedLoader

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError:  # the package's older name
    from pytorch_lightning import (  # type: ignore[assignment]
        Callback,
        LightningModule,
        Trainer,
    )

__all__ = ["LoaderProgress", "callbacks", "pytorch_lightning_callbacks", "train_loaders"]

log = logging.getLogger("horovod_iter")


def _leaves(obj: Any) -> Iterator[Any]:
    """The loaders in Lightning's nesting of them (one, a list, a dict, nested)."""
    if isinstance(obj, Mapping):
        for v in obj.values():
            yield from _leaves(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _leaves(v)
    elif obj is not None:
        yield obj


def train_loaders(trainer: Trainer) -> list[DistributedLoader]:
    """The `DistributedLoader` objects among the training dataloaders of ``trainer.fit()``."""
    return [dl for dl in _leaves(trainer.train_dataloader) if isinstance(dl, DistributedLoader)]


def _set_consumed(loader: DistributedLoader, steps: int) -> None:
    """Tell ``loader`` the trainer used the first ``steps`` batches of its current epoch."""
    loader.set_consumed(steps)


class _Hooks:
    """The hooks, for either package's ``Callback`` (see `LoaderProgress`)."""

    _step_takes_iterator = False

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._step_takes_iterator = _takes_iterator(pl_module)
        # the epoch FitLoop passes to set_epoch at the start of the epoch it is about to run
        epoch = int(cast(Any, trainer.fit_loop.epoch_progress.current).processed)
        moved = [loader for loader in train_loaders(trainer) if loader.epoch != epoch]
        for loader in moved:
            loader.set_epoch(epoch)
        if any(not _has_len(loader) for loader in moved):  # Lightning fetched ahead
            _restart_fetch(trainer, epoch)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._step_takes_iterator:
            return  # the step takes its batches itself: every batch handed out is used
        for loader in train_loaders(trainer):
            _set_consumed(loader, batch_idx + 1)


class LoaderProgress(_Hooks, Callback):
    """Keep the `DistributedLoader` objects of ``trainer.fit()`` in step with the trainer: the
    epoch it runs and the batches its training step used (see the module's docstring).
    Registered for every ``Trainer`` through Lightning's entry point; add it to
    ``Trainer(callbacks=[...])`` yourself where horovod_iter is not installed."""


def callbacks() -> list[Callback]:
    """Lightning's ``lightning.pytorch.callbacks_factory`` entry point: the callbacks every
    ``Trainer`` gets (nothing happens without a `DistributedLoader` among its loaders)."""
    return [LoaderProgress()]


def pytorch_lightning_callbacks() -> list[Any]:
    """The ``pytorch_lightning.callbacks_factory`` entry point (the package's older name: its
    own ``Callback`` class)."""
    return [_pytorch_lightning_class()()]


@functools.lru_cache(maxsize=1)
def _pytorch_lightning_class() -> type:
    import pytorch_lightning as pl

    if issubclass(LoaderProgress, pl.Callback):
        return LoaderProgress
    return type("LoaderProgress", (_Hooks, pl.Callback),
                {"__doc__": LoaderProgress.__doc__, "__module__": __name__})


def _has_len(loader: DistributedLoader) -> bool:
    """Lightning fetches ahead of the training step only from loaders without ``len()``."""
    try:
        len(loader)
    except (TypeError, NotImplementedError):  # what Lightning's sized_len catches
        return False
    return True


def _takes_iterator(pl_module: LightningModule) -> bool:
    """``training_step(dataloader_iter)``: Lightning hands the step an iterator, not a batch."""
    try:
        return "dataloader_iter" in inspect.signature(pl_module.training_step).parameters
    except (TypeError, ValueError):
        return False


def _restart_fetch(trainer: Trainer, epoch: int) -> None:
    """Make Lightning iterate its training loaders again (it fetched the first batch before it
    set the epoch). Lightning has no public call for this: its fit loop's data fetcher."""
    fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
    if fetcher is None or not hasattr(fetcher, "combined_loader"):
        warnings.warn(
            f"LoaderProgress: this Lightning version has no fit_loop._data_fetcher, so the "
            f"first batch of epoch {epoch} is one Lightning fetched before it set the epoch "
            "(data without len()); give the data a len() (ShardedDataset(sizes=)) to avoid it",
            RuntimeWarning, stacklevel=2)
        return
    log.debug("LoaderProgress: epoch %d; Lightning's fetch restarted", epoch)
    iter(fetcher)
