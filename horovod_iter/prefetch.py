"""Device prefetch: copy batches host->GPU on a side CUDA stream, ``depth`` batches ahead.

Usable alone around any iterable of batches (e.g. your own DataLoader)::

    for batch in horovod_iter.CudaPrefetcher(loader, device="cuda:0", depth=2):
        train_step(batch)

Stream semantics (why it is safe): each batch is pinned (if it is not already) and copied with
``non_blocking=True`` on a dedicated side stream, after which an event is recorded. When the
batch is handed out, the consumer's current stream waits on that event (a GPU-side wait, the
host does not block), and every device tensor is ``record_stream``-ed on the consumer stream so
the caching allocator cannot hand its memory to another tensor while the consumer's kernels
still use it. Pinned host blocks come from torch's caching host allocator, which records the
copy's event and does not reuse a block before its copy has finished. On a CPU device the same
API simply passes batches through (keeping ``depth`` batches pulled ahead, so upstream look-ahead
behaves the same).

Batches may be any nesting of tensors in tuples, lists, dicts, namedtuples and dataclasses;
non-tensor leaves pass through untouched.
"""
from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Callable

import torch

__all__ = ["CudaPrefetcher", "batch_nbytes", "tree_map"]


def tree_map(fn: Callable[[torch.Tensor], Any], obj: Any) -> Any:
    """Apply ``fn`` to every tensor in a nested batch, keeping its structure."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        try:
            return type(obj)({k: tree_map(fn, v) for k, v in obj.items()})  # type: ignore[call-arg]
        except TypeError:
            return {k: tree_map(fn, v) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(tree_map(fn, v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(tree_map(fn, v) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: tree_map(fn, getattr(obj, f.name))
                   for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **changes)
    return obj


def _tensors(obj: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    tree_map(lambda t: found.append(t), obj)
    return found


def batch_nbytes(obj: Any) -> int:
    """Total bytes of the tensors in a nested batch."""
    return sum(t.numel() * t.element_size() for t in _tensors(obj))


def _resolve_device(device: Any) -> torch.device:
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={device!r} but CUDA is not available in this process; pass "
                "device='cpu' or run on a machine with a GPU"
            )
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


class CudaPrefetcher:
    """Iterate ``iterable`` with each batch already on ``device``, copied ``depth`` ahead.

    Args:
        iterable: anything yielding batches (a DataLoader, a generator, ...). Each ``iter()``
            of the prefetcher starts a new pass over it.
        device: target device; ``None`` means the current CUDA device, or CPU without CUDA.
        depth: batches in flight ahead of the one being consumed (>= 1 to overlap; 0 copies
            synchronously on demand).
        pin_memory: pin host tensors that are not pinned yet (CUDA only), so copies are
            asynchronous.

    ``close()`` (or leaving a ``with`` block, or garbage collection) drops the batches in
    flight and closes the source iterator if it has ``close``.
    """

    def __init__(self, iterable: Iterable[Any], device: Any = None, depth: int = 2,
                 pin_memory: bool = True) -> None:
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
            raise ValueError(f"depth must be an int >= 0, got {depth!r}")
        self.iterable = iterable
        self.device = _resolve_device(device)
        self.depth = depth
        self.pin_memory = bool(pin_memory) and self.device.type == "cuda"
        self._source: Iterator[Any] | None = None
        self._queue: collections.deque[tuple[Any, Any]] = collections.deque()
        self._exhausted = False
        self._error: Exception | None = None
        self._stream: Any = None
        #: seconds the consumer spent waiting in ``__next__`` (pulling and copying batches)
        self.wait_s = 0.0
        #: bytes copied host -> device
        self.h2d_bytes = 0
        self.batches = 0

    # -- iteration --------------------------------------------------------------------
    def __iter__(self) -> CudaPrefetcher:
        self.close()
        self._source = iter(self.iterable)
        self._exhausted = False
        self._error = None
        if self.device.type == "cuda" and self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return self

    def _pull(self) -> bool:
        """Pull one batch from the source and start its copy; False at the end."""
        if self._exhausted or self._source is None:
            return False
        try:
            host = next(self._source)
        except StopIteration:
            self._exhausted = True
            return False
        except Exception as e:
            # raised while looking ahead: deliver it after the batches before it, at its step
            self._error = e
            self._exhausted = True
            return False
        if self.device.type != "cuda":
            self._queue.append((tree_map(lambda t: t.to(self.device), host), None))
            return True
        if self.pin_memory:
            host = tree_map(lambda t: t if t.is_cuda or t.is_pinned() else t.pin_memory(), host)
        self.h2d_bytes += sum(t.numel() * t.element_size() for t in _tensors(host)
                              if not t.is_cuda)
        with torch.cuda.stream(self._stream):
            dev = tree_map(lambda t: t.to(self.device, non_blocking=True), host)
            event = torch.cuda.Event()
            event.record(self._stream)
        self._queue.append((dev, event))
        return True

    def __next__(self) -> Any:
        if self._source is None:
            iter(self)
        t0 = time.perf_counter()
        while len(self._queue) <= self.depth and self._pull():
            pass
        if not self._queue:
            self.wait_s += time.perf_counter() - t0
            error, self._error = self._error, None
            if error is not None:
                raise error
            raise StopIteration
        batch, event = self._queue.popleft()
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            # allocated on the side stream, used on the consumer's: tell the allocator
            tree_map(lambda t: t.record_stream(current) if t.is_cuda else None, batch)
        self.batches += 1
        self.wait_s += time.perf_counter() - t0
        return batch

    def close(self) -> None:
        """Drop batches in flight and close the source iterator (if it has ``close``)."""
        self._queue.clear()
        source, self._source = self._source, None
        close = getattr(source, "close", None)
        if callable(close):
            close()
        self._exhausted = True

    def __enter__(self) -> CudaPrefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
