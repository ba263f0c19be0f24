"""The one walk over nested batches, and the one box for an error raised elsewhere.

Batches may be any nesting of tensors in dicts (and other mappings), lists, tuples,
namedtuples and dataclasses; other leaves (strings, ints, None) pass through. Mutable mappings
are copied and updated, so subclass state survives (torch's ``pin_memory`` does the same).
"""
from __future__ import annotations

import copy
import dataclasses
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, Callable, NoReturn

import numpy as np
import torch

__all__ = [
    "ErrorBox",
    "batch_rows",
    "empty_like",
    "fill_rows",
    "first_rows",
    "first_tensor",
    "host_bytes",
    "tree_leaves",
    "tree_map",
    "tree_structure",
]


def _walk(obj: Any, leaf: Callable[[Any], Any], is_leaf: Callable[[Any], bool]) -> Any:
    if is_leaf(obj):
        return leaf(obj)
    if isinstance(obj, (str, bytes)):
        return obj
    if isinstance(obj, Mapping):
        items = {k: _walk(v, leaf, is_leaf) for k, v in obj.items()}
        if isinstance(obj, MutableMapping):
            try:
                clone = copy.copy(obj)
                clone.update(items)
                return clone
            except Exception:  # an odd mapping: a plain dict keeps the data
                return items
        try:
            return type(obj)(items)  # type: ignore[call-arg]
        except TypeError:
            return items
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_walk(v, leaf, is_leaf) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_walk(v, leaf, is_leaf) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _walk(getattr(obj, f.name), leaf, is_leaf)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def _is_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor)


def tree_map(fn: Callable[[torch.Tensor], Any], obj: Any) -> Any:
    """Apply ``fn`` to every tensor in a nested batch, keeping its structure."""
    return _walk(obj, fn, _is_tensor)


def tree_leaves(obj: Any) -> list[torch.Tensor]:
    """The tensors of a nested batch, in walk order."""
    found: list[torch.Tensor] = []

    def keep(t: torch.Tensor) -> torch.Tensor:
        found.append(t)
        return t

    _walk(obj, keep, _is_tensor)
    return found


def first_tensor(obj: Any) -> torch.Tensor | None:
    """The first tensor of a nested batch in walk order, found without rebuilding anything
    (per batch, so it stops at the first tensor)."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (str, bytes)):
        return None
    if isinstance(obj, Mapping):
        children: Any = obj.values()
    elif isinstance(obj, (list, tuple)):
        children = obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        children = (getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init)
    else:
        return None
    for child in children:
        found = first_tensor(child)
        if found is not None:
            return found
    return None


def _describe(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return ("Tensor", tuple(x.shape), str(x.dtype))
    if isinstance(x, np.ndarray):
        return ("ndarray", x.shape, str(x.dtype))
    return type(x).__name__


def _is_container(x: Any) -> bool:
    return (isinstance(x, (Mapping, list, tuple)) and not isinstance(x, (str, bytes))) or (
        dataclasses.is_dataclass(x) and not isinstance(x, type))


def tree_structure(obj: Any) -> Any:
    """A comparable description of a sample: its containers, with tensor and array leaves
    described by shape and dtype and other leaves by type (equal iff they collate alike)."""
    return _walk(obj, _describe, lambda x: not _is_container(x))


def _per_sample_list(x: Any) -> bool:
    """A list/tuple of per-sample values (strings, ints, ...), which an empty batch empties."""
    containers = (torch.Tensor, np.ndarray, Mapping, list, tuple)
    return (isinstance(x, (list, tuple)) and not hasattr(x, "_fields")
            and not (x and all(isinstance(v, containers) for v in x))
            and not dataclasses.is_dataclass(x))


def _empty_leaf(x: Any) -> Any:
    if isinstance(x, (torch.Tensor, np.ndarray)):
        # rows sliced away; a 0-dim leaf (a token count, a scalar weight) has no rows: zeroed
        return x[:0] if x.ndim else (torch.zeros_like(x) if isinstance(x, torch.Tensor)
                                     else np.zeros_like(x))
    return type(x)()


def empty_like(batch: Any) -> Any:
    """The same structure with zero rows: tensors and arrays sliced to ``[:0]`` (0-dim ones
    zeroed), lists of per-sample values emptied, other leaves kept."""
    return _walk(batch, _empty_leaf, _is_row_leaf)


def _is_row_leaf(x: Any) -> bool:
    return isinstance(x, (torch.Tensor, np.ndarray)) or _per_sample_list(x)


def batch_rows(batch: Any) -> int:
    """Rows of a collated batch: the first tensor's or array's leading size, else the length
    of the first list of per-sample values (0 if it has neither)."""
    found: list[int] = []

    def rows(x: Any) -> Any:
        if not found and (not isinstance(x, (torch.Tensor, np.ndarray)) or x.ndim):
            found.append(len(x))
        return x

    _walk(batch, rows, _is_row_leaf)
    return found[0] if found else 0


def first_rows(batch: Any, n: int) -> Any:
    """A copy of the batch's first ``n`` rows (0-dim leaves and other leaves kept)."""
    def take(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return x[:n].clone() if x.ndim else x.clone()
        if isinstance(x, np.ndarray):
            return x[:n].copy() if x.ndim else x.copy()
        return type(x)(x[:n])

    return _walk(batch, take, _is_row_leaf)


def _row_leaves(batch: Any) -> list[Any]:
    """The row-carrying leaves (tensors, arrays, lists of per-sample values) in walk order."""
    found: list[Any] = []

    def keep(x: Any) -> Any:
        found.append(x)
        return x

    _walk(batch, keep, _is_row_leaf)
    return found


def fill_rows(batch: Any, row: Any, total: int) -> Any:
    """``batch`` with copies of ``row`` (a one-row batch of the same structure) appended
    until it has ``total`` rows; 0-dim leaves keep the batch's value. Raises ``ValueError``
    naming the leaf whose shape the row does not match."""
    rows = iter(_row_leaves(row))
    need = total - batch_rows(batch)

    def fill(x: Any) -> Any:
        r = next(rows)
        if need <= 0:
            return x
        if isinstance(x, (torch.Tensor, np.ndarray)):
            if not x.ndim:
                return x
            if tuple(r.shape[1:]) != tuple(x.shape[1:]) or len(r) < 1:
                raise ValueError(
                    f"cannot fill a batch leaf of shape {tuple(x.shape)} with a padding row of "
                    f"shape {tuple(r.shape)}: even_batches needs rows of one shape per rank "
                    "(a collate_fn that pads to the batch's longest sample gives other shapes "
                    "once a rank runs out; pad to a fixed length instead)")
            if isinstance(x, torch.Tensor):
                return torch.cat([x, r[:1].to(x.dtype).expand(need, *r.shape[1:])])
            return np.concatenate([x, np.repeat(r[:1].astype(x.dtype), need, axis=0)])
        return type(x)(list(x) + [r[0]] * need)

    return _walk(batch, fill, _is_row_leaf)


_FLAT = (bytes, str, int, float, bool)


def host_bytes(obj: Any, _depth: int = 0) -> int:
    """Memory a batch holds, estimated: tensors and arrays by their data, ``bytes``/``str``
    by ``sys.getsizeof``, containers by their items plus themselves, anything else by
    ``sys.getsizeof`` (what the iterable look-ahead counts against its budget: a batch of
    raw JPEG bytes or text is its bytes, not zero)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes) + (sum(host_bytes(v, _depth + 1) for v in obj.flat)
                                  if obj.dtype == object and _depth < 8 else 0)
    if isinstance(obj, (str, bytes, bytearray)):
        return sys.getsizeof(obj)
    if isinstance(obj, memoryview):
        return obj.nbytes
    if _depth >= 8:
        return sys.getsizeof(obj)
    if isinstance(obj, Mapping):
        return sys.getsizeof(obj) + sum(host_bytes(k, _depth + 1) + host_bytes(v, _depth + 1)
                                        for k, v in obj.items())
    if isinstance(obj, (list, tuple, set, frozenset)):
        if obj:  # the common batch of raw records (bytes, str, numbers): one pass in C
            t = type(next(iter(obj)))
            if t in _FLAT and all(type(v) is t for v in obj):
                return sys.getsizeof(obj) + sum(map(sys.getsizeof, obj))
        return sys.getsizeof(obj) + sum(host_bytes(v, _depth + 1) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sys.getsizeof(obj) + sum(host_bytes(getattr(obj, f.name), _depth + 1)
                                        for f in dataclasses.fields(obj))
    try:
        return sys.getsizeof(obj)
    except TypeError:  # an object without a size: count a pointer's worth
        return 8


class ErrorBox:
    """An exception raised in another thread, process or look-ahead step, carried as a value
    to be re-raised where (and when) its step is handed out."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def reraise(self) -> NoReturn:
        raise self.exc


def concat_rows(trees: list[Any]) -> Any:
    """Trees of the same structure with tensor leaves only, concatenated leaf by leaf along
    dim 0 (in list order); raises ``TypeError`` naming a leaf that is not a tensor."""
    def check(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected tensors (or dicts, lists, tuples of them), got a leaf "
                            f"of type {type(x).__name__}")
        return x

    _walk(trees[0], check, lambda x: not _is_container(x))
    columns = iter([torch.cat(ts) for ts in zip(*(tree_leaves(t) for t in trees))])
    return tree_map(lambda _: next(columns), trees[0])
