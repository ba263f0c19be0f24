"""Marks for the padding rows of ``even_batches=True``: the rows a rank that ran out (or whose
last batch is short) repeats so that every rank's batch has the same shape, told apart from
the real rows by the loss, the metrics and the gathers that come after."""
from __future__ import annotations

import copy
from collections.abc import Mapping, MutableMapping
from typing import Any, Callable

import torch

__all__ = ["flag_padding", "mask_labels"]

Marker = Callable[[Any, torch.Tensor], Any]


def _get(batch: Any, key: str | int) -> Any:
    try:
        return batch[key]
    except (KeyError, IndexError, TypeError):
        raise KeyError(f"the batch ({type(batch).__name__}) has no entry {key!r} to mark its "
                       "padding rows in; pass the key of its labels (a dict key, or the "
                       "position in a tuple batch)") from None


def _with(batch: Any, key: str | int, value: Any) -> Any:
    if isinstance(batch, MutableMapping):
        try:  # a copy keeps the mapping's type (HF's BatchEncoding, say)
            out = copy.copy(batch)
            out[key] = value
            return out
        except Exception:
            return {**batch, key: value}
    if isinstance(batch, Mapping):
        return {**batch, key: value}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        fields: tuple[str, ...] = batch._fields
        return batch._replace(  # type: ignore[attr-defined]
            **{fields[key] if isinstance(key, int) else key: value})
    if isinstance(batch, (list, tuple)) and isinstance(key, int):
        items = list(batch)
        items[key] = value
        return type(batch)(items)
    raise TypeError(f"cannot set {key!r} of a {type(batch).__name__} batch; use a dict, a "
                    "tuple or a list batch, or a mark_padding of your own")


def mask_labels(key: str | int = "labels", value: int = -100) -> Marker:
    """``mark_padding`` that sets the labels of padding rows to ``value`` (-100: what
    ``torch.nn.CrossEntropyLoss``, HF models' losses and HF ``compute_metrics`` recipes
    ignore). ``key``: the labels' dict key, or their position in a tuple batch."""
    def mark(batch: Any, padding: torch.Tensor) -> Any:
        labels = _get(batch, key)
        if not isinstance(labels, torch.Tensor) or labels.dim() == 0:
            raise TypeError(f"mask_labels: batch[{key!r}] must be a tensor with a row per "
                            f"sample, got {type(labels).__name__}")
        if not padding.any():
            return batch
        # the mask is made on the CPU; labels of a GPU-resident batch are on the GPU, where
        # masked_fill wants its mask
        rows = padding.to(labels.device).view(-1, *([1] * (labels.dim() - 1)))
        return _with(batch, key, labels.masked_fill(rows, value))

    return mark


def flag_padding(key: str = "padding") -> Marker:
    """``mark_padding`` that adds a bool tensor ``batch[key]``, True for padding rows, to a
    dict batch (pop it before ``model(**batch)``; gather it with the outputs to drop the
    padding after ``gather_for_metrics``)."""
    def mark(batch: Any, padding: torch.Tensor) -> Any:
        if not isinstance(batch, Mapping):
            raise TypeError(f"flag_padding adds a key to a dict batch, got a "
                            f"{type(batch).__name__}; use mask_labels(key=<position>) or a "
                            "mark_padding of your own")
        return _with(batch, key, padding)

    return mark
