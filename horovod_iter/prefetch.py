"""Device prefetch: copy batches host->GPU on a side CUDA stream, ``depth`` batches ahead.

Usable alone around any iterable of batches (e.g. your own DataLoader)::

    for batch in horovod_iter.CudaPrefetcher(loader, device="cuda:0", depth=2):
        train_step(batch)

Stream semantics (why it is safe; PyTorch's "CUDA semantics" note and ``Tensor.record_stream``):

* **Copy.** Each CPU leaf is pinned (if it is not already) and copied with ``non_blocking=True``
  on a side stream of our own; an optional ``device_transform`` then runs on the same stream
  (uint8 images converted and normalised on the GPU while the previous step computes), after
  which an event is recorded. The batch's device memory is allocated on the side stream.
* **Hand-out.** The consumer's current stream waits on that event (a GPU-side wait: the host
  does not block), and every device leaf is ``record_stream``-ed on the consumer stream, so the
  caching allocator does not give its block to a side-stream allocation while the consumer's
  kernels may still use it (apex's ``data_prefetcher`` and torchgpipe's ``Copy``/``Wait`` do
  the same).
* **A batch already on the GPU** (a GPU-resident dataset): before the side stream touches it,
  it waits for the stream that made it (the current stream of the thread pulling it:
  ``wait_stream``), and the CUDA inputs are ``record_stream``-ed on the side stream, so a
  ``device_transform`` never reads unwritten memory, nor memory the allocator has handed to the
  producer's next tensor (torchgpipe's ``Copy`` records its input on the copy stream likewise).
* **Device memory is bounded** to about ``depth + 2`` batches (``depth`` queued, the one in use,
  the one being made), whatever the host's lead over the GPU. ``record_stream`` frees a block
  only once the consumer stream has passed the point where it was freed, so a host running ahead
  of the GPU (CUDA graphs, compiled steps, loops that sync every N steps) would otherwise make
  device memory grow with its lead (the FSDP ``record_stream`` story: pytorch#147168,
  torchtitan#735). So an event is recorded on the consumer stream at every hand-out, and before
  a new device batch is made the host waits (``Event.synchronize``, sleeping) for the event of
  the hand-out ``depth + 1`` hand-outs before it: with ``depth`` batches queued that is the
  previous hand-out, so the host runs at most about one step ahead of the GPU, whatever
  ``depth`` (FSDP1's ``limit_all_gathers`` rate limiter is the same idea). A loop that syncs
  every step never waits there; one that runs further ahead (CUDA graphs, compiled steps,
  syncs every N steps) waits inside ``next()`` instead of at its next sync, counted in
  ``throttle_s``.
* **The side stream's start.** At its first batch, a pass's side stream waits for the work
  the consumer stream had queued (once a pass), so a ``device_transform`` may read GPU tensors
  the trainer made before the loop; it must not read tensors the trainer changes during the
  pass.
* **Pinned host memory.** The pinned blocks the library makes (batches gathered into pinned
  memory, ``pin_memory()`` of a pageable leaf) come from torch's caching host allocator, which
  records the copy's event on the block and does not hand it out again before the copy has
  finished. That protects *freed* blocks only: a source that refills a pinned tensor it
  already yielded (a static pinned buffer of its own) overwrites a copy that may still be in
  flight, and the GPU batch is silently corrupt. Yield a new tensor per batch (torch's
  DataLoader does), or pageable memory (CUDA reads pageable memory into a staging buffer
  before ``cudaMemcpyAsync`` returns, so it may be refilled at once).
* **The stream** is made once per process and device (``torch.cuda.Stream(device,
  priority=-1)``), never per pass: torch hands streams out round-robin from pools of 32, and
  ProcessGroupNCCL takes its streams from the default-priority pool, so a stream per pass would
  sooner or later be the one carrying DDP's gradient allreduces. Pass ``stream=`` to choose it.

Errors of the source, and of pinning, copying or ``device_transform``, are delivered at their
own step, after the batches before them (queued in order with the batches); the pass ends there.

On a CPU device batches pass straight through (the transform, if any, applied in line): the
same trainer code runs everywhere, and nothing is pulled early for no gain.
"""
from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ._tree import ErrorBox, tree_leaves, tree_map

__all__ = ["CudaPrefetcher", "batch_nbytes", "resolve_device", "tree_map"]

#: set to 1 to mark fetch, copy and transform with NVTX ranges (Nsight Systems) by default
NVTX_ENV = "HOROVOD_ITER_NVTX"
#: priority of the side streams we make: torch's high-priority pool, not the default-priority
#: pool that ProcessGroupNCCL draws from
_SIDE_PRIORITY = -1


def batch_nbytes(obj: Any) -> int:
    """Total bytes of the tensors in a nested batch."""
    return sum(t.numel() * t.element_size() for t in tree_leaves(obj))


def resolve_device(device: Any, local_rank: int | None = None) -> torch.device:
    """The device batches go to.

    ``None`` means this rank's GPU: ``cuda:<local_rank % device_count>`` when CUDA is available
    and ``local_rank`` is given (ranks on one host that never called ``set_device`` spread over
    its GPUs, as horovodrun and torchrun number them), else the current CUDA device, and the
    CPU without CUDA. ``"cuda"`` without an index is the current CUDA device, as in torch.

    Raises:
        ValueError: a CUDA device without CUDA, or a ``local_rank`` that is not an int >= 0.
    """
    if local_rank is not None and (not isinstance(local_rank, int) or isinstance(
            local_rank, bool) or local_rank < 0):
        raise ValueError(f"local_rank must be an int >= 0 or None, got {local_rank!r}")
    if device is None:
        if torch.cuda.is_available():
            if local_rank is not None:
                return torch.device("cuda", local_rank % torch.cuda.device_count())
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


_side_streams: dict[int, Any] = {}
_side_lock = threading.Lock()


def _side_stream(device: torch.device) -> Any:
    """This process's copy stream on ``device``, made on first use and kept (see the module
    docstring: not one per pass, not from the pool ProcessGroupNCCL uses)."""
    with _side_lock:
        stream = _side_streams.get(device.index)
        if stream is None:
            stream = torch.cuda.Stream(device, priority=_SIDE_PRIORITY)
            _side_streams[device.index] = stream
        return stream


class _CudaOps:
    """Every CUDA call of a pass on one device, in one place: the pass's bookkeeping (order,
    errors, the memory bound, the figures) is plain Python over these calls, which lets the
    tests run it on the CPU with a fake of this class."""

    def __init__(self, device: torch.device, stream: Any, nvtx: bool) -> None:
        self.device = device
        self.stream = stream
        self.nvtx = nvtx

    def current(self) -> Any:
        """The consumer's stream: the current stream of the calling thread on our device."""
        return torch.cuda.current_stream(self.device)

    def side(self) -> AbstractContextManager[Any]:
        return torch.cuda.stream(self.stream)

    def record(self, stream: Any, timing: bool) -> Any:
        """An event recorded on ``stream`` (``timing``: the stall figures read its time; the
        others are the memory bound's marks, which the host may wait for: ``blocking`` makes
        that wait sleep instead of spinning a core)."""
        event = torch.cuda.Event(enable_timing=timing, blocking=not timing)
        event.record(stream)
        return event

    def on_gpu(self, t: torch.Tensor) -> bool:
        return bool(t.is_cuda)

    def producer(self, t: torch.Tensor) -> Any:
        """The stream that made CUDA tensor ``t``: the current stream of this thread on its
        device (the only one we can know; see the module docstring)."""
        return torch.cuda.current_stream(t.device)

    def ours(self, t: torch.Tensor) -> bool:
        """``t`` is on our device (the side stream's)."""
        return bool(t.device == self.device)

    def record_stream(self, t: torch.Tensor, stream: Any) -> None:
        t.record_stream(stream)

    def needs_pin(self, t: torch.Tensor) -> bool:
        # only CPU leaves can be pinned: torch's pin_memory() raises for a CUDA tensor
        return t.device.type == "cpu" and not t.is_pinned()

    def pin(self, t: torch.Tensor) -> torch.Tensor:
        return t.pin_memory()

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=True)

    def empty_like(self, t: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(t)

    def copy_into(self, out: torch.Tensor, t: torch.Tensor) -> None:
        out.copy_(t, non_blocking=True)

    def push(self, name: str) -> None:
        if self.nvtx:
            torch.cuda.nvtx.range_push(name)

    def pop(self) -> None:
        if self.nvtx:
            torch.cuda.nvtx.range_pop()


@dataclass
class _Statics:
    """``static_buffers``: the device tensors a prefetcher hands out at every step of all its
    passes, and the (shape, dtype) of each."""

    buffers: list[torch.Tensor] | None = None
    layout: list[tuple[tuple[int, ...], torch.dtype]] | None = None


@dataclass
class _Figures:
    #: host seconds inside ``__next__``, less `throttle_s`
    host_wait_s: float = 0.0
    #: GPU seconds the consumer stream stalled at a batch's ready event (measured passes)
    device_wait_s: float = 0.0
    #: host seconds waiting for the GPU to free a batch's memory (the bound)
    throttle_s: float = 0.0
    h2d_bytes: int = 0
    batches: int = 0


class _PrefetchIterator(Iterator[Any]):
    """One pass of a `CudaPrefetcher` over its iterable. It refers to nothing of the
    prefetcher but its settings, figures and static buffers: no reference cycle, so a pass
    dropped without ``close()`` is freed (with its batches and pinned or shared memory) at
    once.

    ``ops``: the CUDA calls (`_CudaOps`); ``None`` on the CPU, where batches pass through."""

    def __init__(self, owner: CudaPrefetcher, ops: _CudaOps | None) -> None:
        self._source: Iterator[Any] | None = iter(owner.iterable)
        self._ended = False
        #: (batch or ErrorBox, its ready event or None), in step order
        self._queue: collections.deque[tuple[Any, Any]] = collections.deque()
        self.device_transform = owner.device_transform
        self._figures = owner._figures
        self._ops = ops
        self._depth = owner.depth if ops is not None else 0
        self.pin_memory = owner.pin_memory and ops is not None
        self._static = owner.static_buffers and ops is not None
        self._made = 0     # device batches made (pulled and copied) in this pass
        self._ordered = False  # the side stream waited for the consumer's work of before
        self._handed = 0   # batches handed out in this pass
        #: (hand-out number, event on the consumer stream at that hand-out): the bound
        self._marks: collections.deque[tuple[int, Any]] = collections.deque()
        #: (hand-out event, ready event) whose stall is not measured yet
        self._stalls: collections.deque[tuple[Any, Any]] = collections.deque()
        #: static_buffers: the device tensors handed out at every step and their layout,
        #: the prefetcher's (kept over its passes: a CUDA graph captured in one pass replays
        #: the same addresses in the next)
        self._statics = owner._statics

    # -- making batches ---------------------------------------------------------------
    def _pull(self) -> bool:
        """Pull one batch from the source and start its copy; False at the end (an error
        ends the pass: it is queued after the batches before it)."""
        if self._ended or self._source is None:
            return False
        ops = self._ops
        if ops is not None:
            ops.push("horovod_iter.fetch")
        try:
            host = next(self._source)
        except StopIteration:
            self._ended = True
            return False
        except Exception as e:  # raised while looking ahead: delivered at its step
            self._fail(e)
            return False
        finally:
            if ops is not None:
                ops.pop()
        if ops is None:
            self._queue.append((self.device_transform(host) if self.device_transform
                                else host, None))
            return True
        try:
            self._bound()
            batch, ready = self._to_device(host, ops)
        except Exception as e:  # pinning, copying or the transform: at its step too
            self._fail(e)
            return False
        self._queue.append((batch, ready))
        return True

    def _fail(self, error: BaseException) -> None:
        self._queue.append((ErrorBox(error), None))
        self._ended = True

    def _bound(self) -> None:
        """Before device batch ``j`` is made, wait until the consumer has passed hand-out
        ``j - depth - 1``: the batches before it are then free (their steps are done and the
        trainer let go of them), so at most ``depth + 2`` are alive (see the module
        docstring). Hand-out ``j - depth - 1`` has always happened: batch ``j`` is pulled with
        at most ``depth`` batches queued."""
        oldest = self._made - self._depth - 1
        marks = self._marks
        while marks and marks[0][0] < oldest:
            marks.popleft()
        if marks and marks[0][0] == oldest:
            _, event = marks.popleft()
            if not event.query():
                t0 = time.perf_counter()
                event.synchronize()
                self._figures.throttle_s += time.perf_counter() - t0
        self._made += 1

    def _to_device(self, host: Any, ops: _CudaOps) -> tuple[Any, Any]:
        """Pin (CPU leaves), copy and transform ``host`` on the side stream; the batch and the
        event recorded after it."""
        leaves = tree_leaves(host)
        gpu = [t for t in leaves if ops.on_gpu(t)]
        ops.push("horovod_iter.copy")
        try:
            if self.pin_memory:  # only CPU leaves: a GPU-resident batch stays where it is
                host = tree_map(lambda t: ops.pin(t) if ops.needs_pin(t) else t, host)
            side = ops.stream
            if not self._ordered:
                # once a pass: the side stream starts after the work the trainer queued before
                # it, so a device_transform may read GPU tensors made earlier (a mean and std
                # computed before the loop) without racing their kernels
                side.wait_stream(ops.current())
                self._ordered = True
            if gpu:
                # made on another stream: the side stream waits for it (wait_stream), and the
                # allocator learns that the side stream uses it (record_stream), so its block
                # is not given to the producer's next tensor while our work may still read it
                producers = {t.device: ops.producer(t) for t in gpu}  # one per device
                for producer in producers.values():
                    side.wait_stream(producer)
                for t in gpu:
                    if ops.ours(t):
                        ops.record_stream(t, side)
            with ops.side():
                batch = tree_map(ops.copy, host)
            self._figures.h2d_bytes += sum(t.numel() * t.element_size() for t in leaves
                                           if not ops.on_gpu(t))
        finally:
            ops.pop()
        del host, leaves, gpu  # the pinned blocks go back once their copy is done
        if self.device_transform is not None:
            ops.push("horovod_iter.transform")
            try:
                with ops.side():
                    batch = self.device_transform(batch)
            finally:
                ops.pop()
        if self._static:
            self._check_layout(batch)
        return batch, ops.record(ops.stream, timing=True)

    def _check_layout(self, batch: Any) -> None:
        """static_buffers: every batch, in every pass, must fit the buffers made for the
        prefetcher's first one."""
        layout = [(tuple(t.shape), t.dtype) for t in tree_leaves(batch)]
        made = self._statics.layout
        if made is None:
            self._statics.layout = layout
        elif layout != made:
            raise ValueError(
                f"static_buffers=True copies every batch into the same device tensors (CUDA "
                f"graphs replay fixed addresses), but batch {self._made - 1} of this pass has "
                f"the tensors (shape, dtype) {layout}, where the buffers were made for "
                f"{made}. Make every batch alike: drop_last=True drops a smaller "
                "last batch, even_batches/uneven='pad' fill batches up; or turn "
                "static_buffers off (or use a new CudaPrefetcher for other shapes)")

    # -- handing batches out ----------------------------------------------------------
    def __next__(self) -> Any:
        t0 = time.perf_counter()
        figures = self._figures
        throttled = figures.throttle_s
        try:
            while len(self._queue) <= self._depth and self._pull():
                pass
            if not self._queue:
                raise StopIteration
            batch, ready = self._queue.popleft()
            if isinstance(batch, ErrorBox):
                batch.reraise()
            if ready is not None:
                batch = self._hand_out(batch, ready)
            figures.batches += 1
            return batch
        finally:
            figures.host_wait_s += (time.perf_counter() - t0) - (figures.throttle_s - throttled)

    def _hand_out(self, batch: Any, ready: Any) -> Any:
        ops = self._ops
        assert ops is not None
        current = ops.current()
        # where the consumer stream stands before it waits: the stall is measured from here
        # to the batch's ready event
        before = ops.record(current, timing=True)
        current.wait_event(ready)  # a GPU-side wait: the host goes on
        for t in tree_leaves(batch):
            if ops.on_gpu(t) and ops.ours(t):
                # allocated on the side stream (or by the producer), used on the consumer's:
                # tell the allocator, so the block is not reused before the consumer is done
                ops.record_stream(t, current)
        if self._static:
            batch = self._into_static(batch, ops)
        # the memory bound waits for this mark: once the GPU has passed it, the steps before
        # this hand-out are done, and so is the allocator's event of the batch the trainer
        # lets go of when this one is handed out (recorded right after this, with no work of
        # ours in between)
        self._marks.append((self._handed, ops.record(current, timing=False)))
        self._handed += 1
        self._stalls.append((before, ready))
        self.measure()
        return batch

    def _into_static(self, batch: Any, ops: _CudaOps) -> Any:
        """Copy ``batch`` into the static buffers on the consumer stream, after its wait for
        the batch and after the steps that used the buffers before (stream order)."""
        leaves = tree_leaves(batch)
        statics = self._statics
        if statics.buffers is None:
            statics.buffers = [ops.empty_like(t) for t in leaves]  # on the consumer stream
        for out, t in zip(statics.buffers, leaves):
            ops.copy_into(out, t)
        buffers = iter(statics.buffers)
        return tree_map(lambda _: next(buffers), batch)

    def measure(self) -> None:
        """Add the stalls the GPU has passed (both events done) to the device wait; never
        waits."""
        stalls = self._stalls
        while stalls and stalls[0][1].query() and stalls[0][0].query():
            before, ready = stalls.popleft()
            self._figures.device_wait_s += max(0.0, before.elapsed_time(ready)) / 1e3

    def close(self) -> None:
        """Drop batches in flight and close the source iterator (if it has ``close``)."""
        self._queue.clear()
        self._marks.clear()
        if self._ops is not None:
            self.measure()
        self._stalls.clear()
        self._ended = True
        source, self._source = self._source, None
        close = getattr(source, "close", None)
        if callable(close):
            close()


class CudaPrefetcher:
    """Iterate ``iterable`` with each batch already on ``device``, copied ``depth`` ahead.

    Args:
        iterable: anything yielding batches (a DataLoader, a generator, ...). Each ``iter()``
            of the prefetcher starts a new pass over it (and closes the previous pass).
        device: target device; ``None`` means the current CUDA device, or CPU without CUDA
            (`DistributedLoader` passes this rank's GPU: `resolve_device`).
        depth: batches in flight ahead of the one being consumed (>= 1 to overlap; 0 copies
            on demand). Ignored on CPU, where nothing is gained by pulling early. Device
            memory holds about ``depth + 2`` batches, whatever the host's lead: the host
            waits for the GPU when it runs further ahead (see the module docstring).
        pin_memory: pin host tensors that are not pinned yet (CUDA only; CPU leaves only: a
            leaf already on the GPU stays there), so copies are asynchronous. A source must
            not refill a pinned tensor it yielded before (module docstring).
        device_transform: a function of a device batch returning a batch, run on the side
            stream right after the copy (CUDA), or in line on CPU: e.g. convert uint8 images
            to normalised floats on the GPU, so 4x fewer bytes cross PCIe.
        static_buffers: CUDA only: hand out the same device tensors at every step (copied
            into on the consumer stream), for CUDA graphs that replay fixed addresses: the same
            tensors in every pass of this prefetcher (they live as long as it does). A batch
            is then valid until the next ``next()``, and read in the consumer stream's order
            (work on another stream must wait for it); every batch must have the same shapes
            and dtypes (else `ValueError` at that batch's step). Costs one device-to-device
            copy per step.
        nvtx: mark fetch, copy and transform with NVTX ranges (``horovod_iter.fetch``,
            ``.copy``, ``.transform``) for Nsight Systems; ``None``: on when the environment
            variable ``HOROVOD_ITER_NVTX`` is ``1``. CUDA only.
        stream: the side stream (a ``torch.cuda.Stream`` on ``device``); ``None``: one made
            once per process and device, from torch's high-priority pool.

    Raises:
        ValueError: ``depth`` is not an int >= 0, or a ``stream`` on another device.
        TypeError: ``device_transform`` is not callable.

    ``close()`` (or leaving a ``with`` block) drops the batches in flight and closes the
    current pass's source iterator if it has ``close``.
    """

    def __init__(self, iterable: Iterable[Any], device: Any = None, depth: int = 2,
                 pin_memory: bool = True,
                 device_transform: Callable[[Any], Any] | None = None, *,
                 static_buffers: bool = False, nvtx: bool | None = None,
                 stream: Any = None) -> None:
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
            raise ValueError(f"depth must be an int >= 0, got {depth!r}")
        if device_transform is not None and not callable(device_transform):
            raise TypeError(f"device_transform must be callable, got {device_transform!r}")
        self.iterable = iterable
        self.device = resolve_device(device)
        cuda = self.device.type == "cuda"
        if stream is not None and cuda and torch.device(stream.device) != self.device:
            raise ValueError(f"stream= is on {stream.device}, but batches go to "
                             f"{self.device}: pass a stream of {self.device}")
        self.depth = depth
        self.pin_memory = bool(pin_memory) and cuda
        self.device_transform = device_transform
        self.static_buffers = bool(static_buffers) and cuda
        self.nvtx = (os.environ.get(NVTX_ENV) == "1" if nvtx is None else bool(nvtx)) and cuda
        self._stream = stream
        self._pass: _PrefetchIterator | None = None
        self._figures = _Figures()
        self._statics = _Statics()

    def _ops(self) -> _CudaOps | None:
        """The CUDA calls of a pass (None on the CPU)."""
        if self.device.type != "cuda":
            return None
        if self._stream is None:
            self._stream = _side_stream(self.device)
        return _CudaOps(self.device, self._stream, self.nvtx)

    def _measured(self) -> _Figures:
        if self._pass is not None and self._pass._ops is not None:
            self._pass.measure()
        return self._figures

    @property
    def wait_s(self) -> float:
        """Seconds the input kept the trainer waiting: `host_wait_s` + `device_wait_s`. The
        two are taken on different clocks and can overlap in time (the host waiting for the
        next batch while the GPU waits for the last one's copy), so their sum may exceed the
        time the loop really lost; divided by the elapsed time it is an upper bound."""
        f = self._measured()
        return f.host_wait_s + f.device_wait_s

    @property
    def host_wait_s(self) -> float:
        """Host seconds inside ``next()`` (fetching, pinning, issuing copies), without the
        waits of the memory bound (`throttle_s`: the GPU is behind, not the input)."""
        return self._figures.host_wait_s

    @property
    def device_wait_s(self) -> float:
        """GPU seconds the consumer's stream stalled waiting for a batch's copy or transform
        (between a timing event at the hand-out and the batch's ready event). Counted once the
        GPU has passed them: read while steps are queued, the last few may be missing."""
        return self._measured().device_wait_s

    @property
    def throttle_s(self) -> float:
        """Host seconds ``next()`` waited for the GPU to be done with old batches, keeping
        device memory at about ``depth + 2`` batches (the host was ahead of the GPU)."""
        return self._figures.throttle_s

    @property
    def h2d_bytes(self) -> int:
        """Bytes copied host -> device."""
        return self._figures.h2d_bytes

    @property
    def batches(self) -> int:
        """Batches handed out."""
        return self._figures.batches

    @property
    def pinned_bytes(self) -> int:
        """Pinned host memory held by torch's caching host allocator in this process (blocks
        in use and cached for reuse: ``torch.cuda.host_memory_stats()``); 0 on CPU."""
        if self.device.type != "cuda":
            return 0
        return int(torch.cuda.host_memory_stats().get("allocated_bytes.current", 0))

    def __iter__(self) -> Iterator[Any]:
        self.close()
        self._pass = _PrefetchIterator(self, self._ops())
        return self._pass

    def close(self) -> None:
        """Drop batches in flight and close the current pass's source."""
        current, self._pass = self._pass, None
        if current is not None:
            current.close()

    def __enter__(self) -> CudaPrefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
