"""The loader's arguments: their checks (errors that name the value and the fix) and the
choice of sampler. Kept apart so that `loader.py` is the composition and the position only."""
from __future__ import annotations

import sys
from typing import Any, Callable

import torch
from torch.utils.data import IterableDataset, Sampler
from torch.utils.data.distributed import DistributedSampler as TorchDistributedSampler

from .backend import Backend
from .batching import LengthGroupedBatchSampler
from .errors import ShardingError, UnevenDataError
from .plan import EpochPlan
from .sampler import DistributedSampler, is_int
from .sync import UNEVEN

__all__ = ["UNSET", "Unset", "check_arguments", "check_batch_sampler", "check_even",
           "check_even_batches", "check_worker_options", "loader_sampler", "positive_int",
           "warn_foreign_world"]


class Unset:
    """The default of an argument whose absence means something (torch's batch_size=1)."""

    def __repr__(self) -> str:
        return "<unset>"


UNSET = Unset()


def positive_int(name: str, value: Any) -> int:
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_arguments(*, uneven: Any, prefetch: Any, num_workers: Any, timeout: Any,
                    drop_last: Any, progress: Any, log_stats: Any, shuffle: Any,
                    device_transform: Callable[[Any], Any] | None) -> None:
    """Raise naming the first bad argument of a loader and the values it accepts."""
    if uneven not in UNEVEN:
        raise ValueError(f"uneven must be one of {UNEVEN}, got {uneven!r}")
    for name, value in (("prefetch", prefetch), ("num_workers", num_workers)):
        if not is_int(value) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(
            timeout, (int, float)) or not timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, or None or 0 for no "
                         f"limit, got {timeout!r}")
    for flag, value in (("drop_last", drop_last), ("progress", progress),
                        ("log_stats", log_stats), ("shuffle", shuffle)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag} must be a bool, got {value!r}")
    if device_transform is not None and not callable(device_transform):
        raise TypeError(f"device_transform must be callable, got {device_transform!r}")
    if uneven == "pad" and drop_last:
        raise ValueError("uneven='pad' counts every sample exactly once and drop_last=True "
                         "drops samples; choose one")


def check_even_batches(even_batches: Any, mark_padding: Any, *, uneven: str,
                       batch_sampler: Any = None) -> int | None:
    """``even_batches`` fills padded batches with copies of real rows: only with ``pad``, a
    fixed batch size, and a ``mark_padding`` that tells the copies apart (else they would
    count twice, silently).

    ``batch_sampler``: the loader's batch sampler, or None. With one, every batch (short,
    and the padding batches of a rank that ran out) is filled to its ``batch_size``
    attribute (`LengthGroupedBatchSampler`'s, torch's ``BatchSampler``'s): returned, the
    ``even_rows`` for the end-of-data sync (None without a batch sampler, or without
    ``even_batches``). One without a ``batch_size`` (batches of no fixed size) is refused."""
    if not isinstance(even_batches, bool):
        raise TypeError(f"even_batches must be a bool, got {even_batches!r}")
    if mark_padding is not None and not callable(mark_padding):
        raise TypeError(f"mark_padding must be callable (batch, mask) -> batch, got "
                        f"{mark_padding!r}")
    if not even_batches:
        if mark_padding is not None:
            raise ValueError("mark_padding marks the rows that even_batches=True adds; pass "
                             "even_batches=True with it (with uneven='pad'), or drop it")
        return None
    if uneven != "pad":
        raise ValueError(f"even_batches=True fills the padding of uneven='pad'; got "
                         f"uneven={uneven!r} (whose batches are already alike on every rank)")
    rows: int | None = None
    if batch_sampler is not None and batch_sampler is not False:
        size: Any = getattr(batch_sampler, "batch_size", None)
        if not is_int(size) or size < 1:
            raise ValueError(
                f"even_batches=True fills every batch to the batch sampler's batch_size rows, "
                f"and this batch_sampler ({type(batch_sampler).__name__}) has no positive int "
                f"batch_size (got {size!r}), so its batches have no fixed size: give it a "
                "batch_size attribute (the most rows a batch of it has), or use "
                "uneven='pad' without even_batches and gather with hi.gather_rows")
        rows = int(size)
    if mark_padding is None:
        raise ValueError(
            "even_batches=True repeats real rows to fill batches, and they would count twice "
            "in metrics; pass mark_padding=hi.mask_labels() (labels of copies -100, what HF "
            "losses and metrics ignore) or mark_padding=hi.flag_padding() (a bool 'padding' "
            "key), or your own (batch, mask) -> batch")
    return rows


def loader_sampler(dataset: Any, sampler: Sampler[Any] | None, backend: Backend, *,
                   shuffle: bool, seed: int | None, drop_last: bool, uneven: str,
                   generator: torch.Generator | None = None) -> Sampler[Any] | None:
    """The sampler a loader uses: ours (padding only for ``uneven="stop"``), or the user's,
    refused where it would break the loader's promises.

    ``generator`` (the loader's, torch's DataLoader argument) seeds our sampler's shuffle
    as it seeds torch's ``RandomSampler``: the seed is drawn from it once, here (see
    `DistributedSampler`); then ``seed`` must be left at its default 0. A sampler of the
    user's is used as given (torch's DataLoader passes its generator to none either)."""
    if isinstance(dataset, IterableDataset):
        if sampler is not None:
            raise ValueError("sampler is for map-style datasets; an IterableDataset decides "
                             "its own order (shard it with horovod_iter.ShardedDataset)")
        return None
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise TypeError(
            f"dataset must be a map-style dataset (with __getitem__ and __len__) or a "
            f"torch IterableDataset, got {type(dataset).__name__}")
    b = backend
    if len(dataset) == 0:
        raise ValueError(
            f"rank {b.rank}: the dataset is empty (len 0), so there is nothing to "
            "iterate; check the path or the split it was built from")
    if sampler is None:
        if generator is not None and (seed is None or seed != 0):
            raise ValueError(f"pass seed or generator, not both: the generator seeds the "
                             f"shuffle (as in torch's DataLoader); got seed={seed!r}")
        return DistributedSampler(dataset, b.size, b.rank, shuffle=shuffle, seed=seed,
                                  drop_last=drop_last, pad=uneven == "stop",
                                  backend=b, generator=generator)
    if isinstance(sampler, DistributedSampler):
        if sampler.num_replicas != b.size:
            raise ValueError(
                f"the sampler was built for num_replicas={sampler.num_replicas}, but the "
                f"{b.name} backend has {b.size} ranks; build it with num_replicas={b.size}"
                " (or leave sampler out and let the loader build one)")
        pads = sampler.pad and not sampler.drop_last
    elif isinstance(sampler, TorchDistributedSampler):
        pads = not sampler.drop_last and sampler.total_size > len(dataset)
    else:
        pads = False
    if pads and uneven != "stop":
        raise ValueError(
            f"uneven={uneven!r} promises every sample exactly once, but the sampler "
            "pads (it repeats samples to even out the ranks); pass "
            "horovod_iter.DistributedSampler(dataset, pad=False), or leave sampler out")
    return sampler


def check_even(plan: EpochPlan, first: int, rank: int) -> None:
    """``uneven="error"`` on map-style data: refuse, on every rank alike (the plan is the
    same everywhere), a pass whose ranks would get different sample counts."""
    left = [max(0, n - first) for n in plan.counts]
    if len(set(left)) > 1:
        raise UnevenDataError(
            f"rank {rank}: uneven='error' and the {plan.remaining} samples of this pass do "
            f"not split evenly over {plan.world} ranks (per rank: {left}); use uneven='stop' "
            "(pads like torch), uneven='pad' (exact, with empty batches), drop_last=True, or a "
            "dataset length divisible by the ranks")


def check_worker_options(*, num_workers: Any, prefetch_factor: Any, in_order: Any,
                         pin_memory_device: Any, multiprocessing_context: Any) -> int | None:
    """torch's rules for the DataLoader-worker arguments; returns the prefetch factor."""
    if prefetch_factor is not None:
        if not is_int(prefetch_factor) or prefetch_factor < 1:
            raise ValueError(f"prefetch_factor must be a positive int or None, "
                             f"got {prefetch_factor!r}")
        if num_workers == 0:
            raise ValueError("prefetch_factor option could only be specified in "
                             "multiprocessing. let num_workers > 0 to enable multiprocessing, "
                             "otherwise set prefetch_factor to None. (torch's rule)")
    if multiprocessing_context is not None and num_workers == 0:
        raise ValueError("multiprocessing_context can only be used with multi-process loading "
                         f"(num_workers > 0), but got num_workers={num_workers} (torch's rule)")
    if not isinstance(in_order, bool):
        raise TypeError(f"in_order must be a bool, got {in_order!r}")
    if not isinstance(pin_memory_device, str):
        raise TypeError(f"pin_memory_device must be a str, got {pin_memory_device!r}")
    return None if prefetch_factor is None else int(prefetch_factor)


def check_batch_sampler(batch_sampler: Any, dataset: Any, backend: Backend,
                        uneven: str | None = None) -> Any:
    """A user's batch sampler, refused where it would read the same batches on every rank
    (a plain one over the whole dataset) or does not fit the data. A
    `LengthGroupedBatchSampler` is told the loader's ``uneven`` (`set_uneven`: ``"stop"``
    gives every rank the same batch count with no sample dropped, ``"pad"``/``"error"``
    never repeat one)."""
    if batch_sampler is None:
        return None
    if isinstance(dataset, IterableDataset):
        raise ValueError("batch_sampler is for map-style datasets; an IterableDataset "
                         "decides its own batches")
    if not hasattr(batch_sampler, "__iter__"):
        raise TypeError(f"batch_sampler must be an iterable of index lists, got "
                        f"{type(batch_sampler).__name__}")
    if backend.size > 1 and not _distributed(batch_sampler):
        raise ShardingError(
            f"rank {backend.rank}: batch_sampler={type(batch_sampler).__name__} does not split "
            f"the data over the {backend.size} ranks: every rank would read every batch. "
            "Build it over this rank's slice (its `sampler` a horovod_iter.DistributedSampler "
            "or torch DistributedSampler), or use horovod_iter.LengthGroupedBatchSampler")
    if uneven is not None and isinstance(batch_sampler, LengthGroupedBatchSampler):
        batch_sampler.set_uneven(uneven)
    return batch_sampler


def _distributed(batch_sampler: Any) -> bool:
    """True if the batch sampler yields this rank's share only."""
    if getattr(batch_sampler, "num_replicas", 1) > 1:
        return True
    inner = getattr(batch_sampler, "sampler", None)
    return isinstance(inner, TorchDistributedSampler) and inner.num_replicas > 1


def warn_foreign_world(backend: Backend, *, uneven: str | None = None,
                       even_batches: bool = False,
                       global_batch_size: int | None = None) -> None:
    """At a loader's construction, what HF Accelerate set up in this process means for it
    (nothing is read unless accelerate or transformers is loaded):

    * warn when an ``Accelerator`` sees another number of processes than our backend
      (``accelerate launch`` under horovodrun: it synchronises no gradients, while our
      loader shards over the Horovod ranks);
    * inside an HF ``Trainer`` method (with ``uneven`` given): refuse ``split_batches`` without
      ``global_batch_size`` and evaluation of ``uneven="pad"`` without ``even_batches``
      (see `horovod_iter.integrations.accelerate.check_trainer`)."""
    if "accelerate.state" not in sys.modules or backend.size == 1:
        return
    from .integrations import accelerate

    accelerate.warn_foreign_world(backend.size, backend.name, stacklevel=3)
    if uneven is not None and "transformers.trainer" in sys.modules:
        accelerate.check_trainer(world=backend.size, uneven=uneven,
                                 even_batches=even_batches,
                                 global_batch_size=global_batch_size)
