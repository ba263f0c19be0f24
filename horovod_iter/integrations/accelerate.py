"""HF Accelerate (and HF ``transformers.Trainer``, built on it), through its public API.

``accelerator.prepare()`` passes a `DistributedLoader` through untouched (it is not a
``DataLoader``), so our loader needs nothing here. What this module is for:

* **Refusing a second sharding** (`check_not_resharded`). ``prepare()`` of a ``DataLoader``
  wraps it: ``BatchSamplerShard`` (map-style data) or ``IterableDatasetShard`` (iterable
  data, ``dispatch_batches=False``) keep 1/W of what the DataLoader yields on each rank, and
  ``DataLoaderDispatcher`` (``dispatch_batches=True``, accelerate's default for an
  ``IterableDataset``) iterates it on process 0 only and splits each batch over the
  processes. Our sampler and ``ShardedDataset`` already give each rank its own slice, so
  every one of these trains on 1/W of the data, silently. Accelerate's dataloaders register
  with its ``GradientState`` while they iterate (``active_dataloader``, a documented
  attribute); when ours is inside the active one's wrappers, it raises `ShardingError` on every
  rank at the first batch (the dispatcher calls ``set_epoch`` on every rank before any
  broadcast; the shards iterate on every rank). The sampler (and the dataset) import this
  module only once accelerate is loaded: nothing below the integrations depends on it.
* **Accelerate seeing another world** (`warn_foreign_world`): an ``Accelerator`` set up
  under horovodrun sees one process and synchronises no gradients.
* **The HF Trainer's settings our loader cannot honour** (`check_trainer`): ``split_batches``
  (``per_device_*_batch_size`` is then the global batch) and evaluation of ``uneven="pad"``
  without ``even_batches`` (the Trainer gathers every step's outputs with
  ``gather_for_metrics``, which needs the same rows on every rank). Accelerate keeps these
  on the ``Accelerator`` and ``TrainingArguments`` only, so the Trainer is found from the
  call: the ``self`` of a ``transformers.trainer`` frame (nothing else is read).
* **Gathered rows back in dataset order** (`gathered_order`, `in_dataset_order`): our
  sampler deals sample ``i`` to rank ``i mod W`` (torch's layout), so a gather per step
  (``gather_for_metrics``, ``Trainer.predict``) yields ``[0, 2, 4, 6, 1, 3, 5, 7, ...]`` plus
  the copies of ``even_batches``; the loader's plan says which sample every gathered row is.
"""
from __future__ import annotations

import dataclasses
import sys
import warnings
from types import FrameType
from typing import Any, Literal

import numpy as np
import torch

from ..errors import ShardingError

__all__ = ["check_not_resharded", "check_trainer", "gathered_order", "in_dataset_order",
           "warn_foreign_world"]

_WALK = ("batch_sampler", "sampler", "dataset")  # how accelerate's wrappers hold the data
_DEPTH = 6
_FIX = ("Give accelerator.prepare() a horovod_iter.DistributedLoader instead of the DataLoader "
        "(prepare() passes it through untouched and every rank reads its own slice)")


def _resharders(outer: Any, obj: Any, depth: int = _DEPTH) -> list[Any]:
    """The objects on the path from ``outer`` down to ``obj`` (empty: not held)."""
    if outer is obj:
        return [obj]
    if depth == 0 or outer is None:
        return []
    for a in _WALK:
        inner = getattr(outer, a, None)
        if inner is not None and inner is not outer:
            path = _resharders(inner, obj, depth - 1)
            if path:
                return [outer, *path]
    return []


def check_not_resharded(obj: Any, *, rank: int, world: int, what: str) -> None:
    """Raise `ShardingError` if the accelerate dataloader iterating now would shard ``obj``
    (our sampler or dataset, already one slice per rank of ``world``) again.

    Args:
        obj: the sampler or dataset about to be iterated (or given its epoch).
        rank, world: its place in our world; nothing is checked for ``world == 1``.
        what: what ``obj`` is to the user (``"horovod_iter.DistributedSampler"``).
    """
    data_loader = sys.modules.get("accelerate.data_loader")
    state = sys.modules.get("accelerate.state")
    if world <= 1 or data_loader is None or state is None:
        return
    active = state.GradientState().active_dataloader
    if active is None:
        return
    path = _resharders(active, obj)
    if not path:
        return
    dispatcher = getattr(data_loader, "DataLoaderDispatcher", ())
    shards = tuple(c for c in (getattr(data_loader, "BatchSamplerShard", None),
                               getattr(data_loader, "IterableDatasetShard", None)) if c)
    for wrapper in path:
        if isinstance(wrapper, shards) and getattr(wrapper, "num_processes", 1) > 1:
            raise ShardingError(
                f"rank {rank}: {what} already gives each of the {world} ranks its own slice, "
                f"and accelerate's {type(wrapper).__name__} (accelerator.prepare() of a "
                "DataLoader, also inside HF transformers' Trainer) shards it again: each rank "
                f"would train on 1/{wrapper.num_processes} of its slice, the rest of the data "
                f"never. {_FIX}, or a DataLoader without our sampler (accelerate then shards "
                "the dataset itself); see docs/frameworks.md")
    if isinstance(path[0], dispatcher) and state.PartialState().num_processes > 1:
        n = state.PartialState().num_processes
        raise ShardingError(
            f"rank {rank}: accelerate dispatches this DataLoader's batches "
            "(DataLoaderDispatcher: dispatch_batches=True, its default for an IterableDataset):"
            f" process 0 alone iterates it and splits every batch over the {n} processes, but "
            f"{what} gives process 0 only its own slice: each epoch would train on 1/{world} "
            f"of the data. {_FIX}. DataLoaderConfiguration(dispatch_batches=False) does not "
            "help here: accelerate then shards every rank's slice again; see "
            "docs/frameworks.md")


def warn_foreign_world(size: int, backend_name: str, stacklevel: int = 3) -> None:
    """Warn when an ``Accelerator`` of this process sees another number of processes than
    our backend's ``size`` (``accelerate launch`` under horovodrun: accelerate sees one and
    synchronises no gradients, while our loader shards over the Horovod ranks)."""
    state = sys.modules.get("accelerate.state")
    if state is None or size == 1 or not state.is_initialized():
        return
    n = state.PartialState().num_processes
    if isinstance(n, int) and n != size:
        warnings.warn(
            f"HF Accelerate sees {n} process(es) but horovod_iter's {backend_name} backend has "
            f"{size} ranks: accelerate will not synchronise gradients over them. Launch "
            "with `accelerate launch --multi_gpu` or torchrun, or synchronise gradients "
            "yourself (Horovod's DistributedOptimizer)", stacklevel=stacklevel + 1)


def _calling_trainer() -> tuple[Any, str] | None:
    """The HF ``Trainer`` whose method (and that method's name) is building a loader, if
    one is: the ``self`` of the nearest ``transformers.trainer`` frame (only those frames'
    locals are read)."""
    module = sys.modules.get("transformers.trainer")
    cls = getattr(module, "Trainer", None)
    if cls is None:
        return None
    frame: FrameType | None = sys._getframe(1)
    for _ in range(12):
        if frame is None:
            return None
        if frame.f_globals.get("__name__") == "transformers.trainer":
            obj = frame.f_locals.get("self")
            if isinstance(obj, cls):
                return obj, frame.f_code.co_name
        frame = frame.f_back
    return None


def check_trainer(*, world: int, uneven: str, even_batches: bool,
                  global_batch_size: int | None) -> None:
    """Refuse, at a loader's construction inside an HF ``Trainer`` method, the settings it
    would ignore or that abort the Trainer's gathers (on every rank alike: every rank builds
    its loader there).

    * ``split_batches=True`` (``TrainingArguments(accelerator_config=...)``): the Trainer's
      ``per_device_*_batch_size`` is then the global batch; ours is per rank unless
      ``global_batch_size`` is given.
    * ``evaluate()``/``predict()`` with ``uneven="pad"`` and ``even_batches=False``: the
      Trainer gathers each step's outputs across ranks with ``gather_for_metrics``, which
      needs every rank's batch to have the same rows; a short or empty padding batch aborts
      the gather (gloo) or the model (an empty batch).
    """
    found = _calling_trainer()
    if found is None or world <= 1:
        return
    trainer, method = found
    accelerator = getattr(trainer, "accelerator", None)
    if getattr(accelerator, "split_batches", False) and global_batch_size is None:
        raise ValueError(
            "the HF Trainer's accelerator has split_batches=True, so per_device_*_batch_size "
            f"means the global batch, split over the {world} ranks; a "
            "horovod_iter.DistributedLoader is passed through, and its batch_size is per rank: "
            f"each step would take {world}x the batch you set. Pass "
            "global_batch_size=self.args.per_device_train_batch_size (or "
            "per_device_eval_batch_size) instead of batch_size, or leave split_batches off")
    if method in ("evaluate", "predict", "evaluation_loop", "prediction_loop") and \
            uneven == "pad" and not even_batches:
        raise ValueError(
            f"HF Trainer.{method}() gathers every step's outputs from all {world} ranks with "
            "accelerate's gather_for_metrics, which needs the same rows on every rank; "
            "uneven='pad' alone gives a rank that ran out (or whose last batch is short) "
            "fewer rows, which aborts the gather. Pass even_batches=True with "
            "mark_padding=hi.mask_labels() (copies of real rows, labelled -100, fill every "
            "batch), as docs/frameworks.md's evaluation recipe does")


Gathered = Literal["per_step", "per_rank"]


def gathered_order(loader: Any, gathered: Gathered = "per_step") -> np.ndarray:
    """The dataset index of every row gathered from a pass of ``loader`` over all ranks
    (-1 for a copy that ``even_batches`` added), in the order of the gather:

    * ``"per_step"``: each step's batches gathered across ranks, in rank order, then the
      steps one after another: ``accelerator.gather_for_metrics`` in a loop, HF
      ``Trainer.evaluate()``/``predict()`` (``eval_do_concat_batches``, the default);
    * ``"per_rank"``: each rank's rows of the whole pass, in rank order:
      ``hi.gather_rows`` of the concatenated outputs.

    For map-style data with the loader's own sampler and ``uneven="pad"`` (every sample
    once), a pass of the current epoch from its start. Pure: no collective.
    """
    if gathered not in ("per_step", "per_rank"):
        raise ValueError(f"gathered must be 'per_step' or 'per_rank', got {gathered!r}")
    sampler = getattr(loader, "sampler", None)
    from ..sampler import DistributedSampler  # a lower layer: no cycle at call time

    if not isinstance(sampler, DistributedSampler) or getattr(loader, "uneven", None) != "pad" \
            or getattr(loader, "batch_size", None) is None:
        raise TypeError(
            "gathered_order() lays out a horovod_iter.DistributedLoader over map-style data "
            "with its own sampler, batch_size and uneven='pad' (every sample once); got "
            f"{type(loader).__name__} with sampler {type(sampler).__name__}, uneven="
            f"{getattr(loader, 'uneven', None)!r}")
    even = bool(getattr(loader, "even_batches", False))
    if gathered == "per_step" and not even:
        raise ValueError(
            "a gather per step needs the same rows on every rank at every step: build the "
            "loader with even_batches=True (and mark_padding), or gather each rank's rows "
            "once with hi.gather_rows and pass gathered='per_rank'")
    sampler.seed  # noqa: B018 - a seed=None broadcast resolves on every rank alike
    plan = sampler.plan()
    batch = int(loader.batch_size)
    per_rank = [dataclasses.replace(plan, rank=r) for r in range(plan.world)]
    steps = max(-(-p.count() // batch) for p in per_rank)
    blocks: list[list[np.ndarray]] = [[] for _ in per_rank]
    for s in range(steps):
        for r, p in enumerate(per_rank):
            idx = p.indices(s * batch, (s + 1) * batch)
            if even and len(idx) < batch:
                idx = np.concatenate([idx, np.full(batch - len(idx), -1, dtype=np.int64)])
            blocks[r].append(idx)
    if gathered == "per_rank":
        return np.concatenate([b for rank in blocks for b in rank] or [np.empty(0, np.int64)])
    return np.concatenate([blocks[r][s] for s in range(steps) for r in range(len(blocks))]
                          or [np.empty(0, np.int64)])


def in_dataset_order(rows: Any, loader: Any, gathered: Gathered = "per_step") -> Any:
    """``rows`` gathered from a pass of ``loader`` (a tensor or array, or a tuple, list or
    dict of them, with a row per gathered row: HF ``PredictionOutput.predictions``), with
    the copies of ``even_batches`` dropped and the rest in dataset order: row ``i`` is
    sample ``i``. See `gathered_order` for ``gathered`` and the loaders it takes.

    Example (HF ``Trainer.predict`` over the evaluation recipe's loader):
        ```python
        out = trainer.predict(test_set)
        preds = in_dataset_order(out.predictions, trainer.get_test_dataloader(test_set))
        ```
    """
    order = gathered_order(loader, gathered)
    keep = np.flatnonzero(order >= 0)
    take = keep[np.argsort(order[keep], kind="stable")]

    def pick(leaf: Any) -> Any:
        if not isinstance(leaf, (np.ndarray, torch.Tensor)):
            raise TypeError(f"in_dataset_order takes tensors or numpy arrays (or tuples, "
                            f"lists, dicts of them), got a {type(leaf).__name__}")
        if len(leaf) != len(order):
            raise ValueError(
                f"the gathered rows have {len(leaf)} rows, but a {gathered!r} gather of this "
                f"loader's pass has {len(order)} (epoch {loader.epoch}, {len(keep)} samples): "
                "pass the loader the rows came from, after the whole pass, with the same "
                "epoch (and for HF's Trainer, eval_do_concat_batches=True, its default)")
        if isinstance(leaf, torch.Tensor):
            return leaf[torch.as_tensor(take, device=leaf.device)]
        return leaf[take]

    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)) and not isinstance(x, str):
            items = [walk(v) for v in x]
            return type(x)(*items) if hasattr(x, "_fields") else type(x)(items)
        return pick(x)

    return walk(rows)
