from __future__ import annotations

import gc
import multiprocessing
from collections import namedtuple
from dataclasses import dataclass

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import horovod_iter as hi
from horovod_iter.prefetch import batch_nbytes, tree_map

P = namedtuple("P", "a b")


@dataclass
class D:
    t: torch.Tensor
    tag: str


def nested(i: int):
    return {"p": P(torch.full((2, 3), i), [torch.tensor([i]), "label"]),
            "d": D(torch.tensor(i), "x"), "n": i}


def test_tree_map_keeps_structure_and_leaves():
    b = nested(3)
    out = tree_map(lambda t: t + 1, b)
    assert isinstance(out["p"], P) and isinstance(out["d"], D)
    assert out["p"].a.eq(4).all() and out["p"].b[1] == "label" and out["n"] == 3
    assert out["d"].tag == "x" and int(out["d"].t) == 4
    assert batch_nbytes(b) == 6 * 8 + 8 + 8


def test_cpu_prefetcher_passes_batches_in_order():
    src = [nested(i) for i in range(7)]
    for depth in (0, 1, 3, 10):
        got = list(hi.CudaPrefetcher(src, device="cpu", depth=depth))
        assert [int(b["d"].t) for b in got] == list(range(7))
        assert got[2]["p"].b[1] == "label"


def test_prefetcher_wraps_a_users_dataloader_and_reiterates():
    dl = DataLoader(TensorDataset(torch.arange(10)), batch_size=4)
    pf = hi.CudaPrefetcher(dl, device="cpu")
    assert [b[0].tolist() for b in pf] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert len(list(pf)) == 3  # each iter() is a new pass


def test_prefetcher_error_arrives_after_earlier_batches():
    def gen():
        yield 1
        yield 2
        raise KeyError("boom")

    pf = iter(hi.CudaPrefetcher(gen(), device="cpu", depth=3))
    assert next(pf) == 1 and next(pf) == 2
    with pytest.raises(KeyError, match="boom"):
        next(pf)


def test_prefetcher_close_closes_the_source():
    closed = []

    def gen():
        try:
            yield from range(100)
        finally:
            closed.append(True)

    with hi.CudaPrefetcher(gen(), device="cpu") as pf:
        next(iter(pf))
    assert closed == [True]
    with pytest.raises(ValueError, match="depth must be an int >= 0"):
        hi.CudaPrefetcher([], device="cpu", depth=-1)


def test_loader_workers_are_shut_down_on_break_and_gc():
    loader = hi.DistributedLoader(TensorDataset(torch.arange(400)), batch_size=4, num_workers=2)
    for i, _ in enumerate(loader):
        if i == 3:
            break
    gc.collect()
    assert multiprocessing.active_children() == []
    it = iter(loader)
    next(it)
    it.close()
    assert multiprocessing.active_children() == []


# ---- CUDA (skipped without a GPU) -------------------------------------------------------
cuda = pytest.mark.cuda


@cuda
def test_cuda_values_equal_cpu_path_and_nested_structures_arrive():
    items = [nested(i) for i in range(9)]
    got = list(hi.CudaPrefetcher(items, device="cuda", depth=2))
    for i, b in enumerate(got):
        assert b["p"].a.is_cuda and b["d"].t.is_cuda and b["p"].b[0].is_cuda
        assert b["p"].b[1] == "label" and b["n"] == i and isinstance(b["d"], D)
        assert torch.equal(b["p"].a.cpu(), items[i]["p"].a)


@cuda
@pytest.mark.parametrize("workers", [0, 2])
def test_cuda_loader_equals_cpu_loader(workers):
    ds = TensorDataset(torch.randn(1000, 17), torch.arange(1000))
    cpu = [(x.clone(), i.clone()) for x, i in hi.DistributedLoader(
        ds, batch_size=32, seed=3, device="cpu", num_workers=workers)]
    gpu = [(x.cpu(), i.cpu()) for x, i in hi.DistributedLoader(
        ds, batch_size=32, seed=3, device="cuda", num_workers=workers, prefetch=3)]
    assert len(cpu) == len(gpu)
    for (a, b), (c, d) in zip(cpu, gpu):
        assert torch.equal(a, c) and torch.equal(b, d)


@cuda
def test_cuda_no_batch_reordered_or_corrupted_when_memory_is_reused():
    """Slow consumer kernels + poisoned allocations: if a buffer were reused too early (a
    missing record_stream or event wait), poisoned values would show up in a batch."""
    n, rows = 64, 1 << 16
    ds = TensorDataset(torch.arange(n).repeat_interleave(rows).view(n, rows))
    loader = hi.DistributedLoader(ds, batch_size=2, shuffle=True, seed=1, device="cuda",
                                  prefetch=4)
    expected = [x.clone() for (x,) in hi.DistributedLoader(ds, batch_size=2, shuffle=True,
                                                          seed=1, device="cpu")]
    for step, (x,) in enumerate(loader):
        torch.cuda._sleep(2_000_000)  # keep the consumer stream busy
        checksum = x.sum(dim=1)
        poison = [torch.full_like(x, -1) for _ in range(4)]  # try to grab freed blocks
        del x
        assert torch.equal(checksum.cpu(), expected[step].sum(dim=1)), step
        del poison
    torch.cuda.synchronize()


def test_device_transform_on_cpu_runs_in_line_in_order():
    seen = []

    def to_float(batch):
        seen.append(int(batch[0, 0]))
        return batch.float() / 255

    src = [torch.full((2, 3), i, dtype=torch.uint8) for i in range(5)]
    got = list(hi.CudaPrefetcher(src, device="cpu", device_transform=to_float))
    assert seen == list(range(5))
    assert all(g.dtype == torch.float32 and torch.allclose(g, s.float() / 255)
               for g, s in zip(got, src))
    with pytest.raises(TypeError, match="device_transform must be callable"):
        hi.CudaPrefetcher(src, device="cpu", device_transform=3)


def test_loader_device_transform_values():
    ds = TensorDataset(torch.randint(0, 255, (20, 3, 4, 4), dtype=torch.uint8))
    mean = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)

    def normalise(batch):
        (x,) = batch
        return ((x.float() / 255) - mean,)

    plain = [x.clone() for (x,) in hi.DistributedLoader(ds, batch_size=6, seed=2, device="cpu")]
    done = [x for (x,) in hi.DistributedLoader(ds, batch_size=6, seed=2, device="cpu",
                                               device_transform=normalise)]
    assert all(torch.allclose(d, p.float() / 255 - mean) for d, p in zip(done, plain))


@cuda
def test_cuda_device_transform_is_ordered_after_the_copy_and_before_use():
    """uint8 images cross PCIe, become normalised floats on the side stream; the consumer's
    slow kernels and poisoned allocations must not see a half-done or reused batch."""
    n = 32
    ds = TensorDataset(torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 256,
                                                                                   256).clone())

    def to_float(batch):
        (x,) = batch
        torch.cuda._sleep(1_000_000)  # a slow transform on the side stream
        return (x.float() * 2,)

    loader = hi.DistributedLoader(ds, batch_size=2, shuffle=False, device="cuda", prefetch=3,
                                  device_transform=to_float)
    for step, (x,) in enumerate(loader):
        torch.cuda._sleep(500_000)
        poison = [torch.full_like(x, -1) for _ in range(3)]
        want = torch.tensor([2 * (2 * step), 2 * (2 * step + 1)], dtype=torch.float32)
        assert x.dtype == torch.float32 and torch.equal(x[:, 0, 0, 0].cpu(), want), step
        del poison
    torch.cuda.synchronize()


# ---- the CUDA path's bookkeeping, on CPU: a fake of its CUDA calls (prefetch._CudaOps) ---------
# Order of errors, the memory bound, the stall figure, pinning and static buffers are plain
# Python over these calls; the CUDA semantics themselves are tested in tests/test_cuda_*.py.

class FakeEvent:
    def __init__(self, ops: FakeOps, stream: FakeStream, t: float) -> None:
        self.ops, self.stream, self.t = ops, stream, t
        self.done = ops.gpu_keeps_up

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.ops.log.append(("synchronize", self.stream.name, self.stream.marks.index(self)))
        for e in self.stream.events:  # a stream completes in order
            e.done = True
            if e is self:
                break

    def elapsed_time(self, end: FakeEvent) -> float:
        return (end.t - self.t) * 1e3


class FakeStream:
    def __init__(self, ops: FakeOps, name: str) -> None:
        self.ops, self.name, self.events = ops, name, []
        self.marks = []  # the events without timing: the consumer's hand-out marks

    def wait_event(self, event: FakeEvent) -> None:
        self.ops.log.append(("wait_event", self.name, event.stream.name))

    def wait_stream(self, other: FakeStream) -> None:
        self.ops.log.append(("wait_stream", self.name, other.name))


class FakeOps:
    """Tensors with ``on_gpu = True`` are "on the device"; copies clone and mark."""

    device = torch.device("cpu")

    def __init__(self, gpu_keeps_up: bool = True, fail: dict | None = None,
                 times: dict | None = None) -> None:
        self.gpu_keeps_up = gpu_keeps_up
        self.fail = fail or {}  # what -> the batch (copy number) at which it raises
        self.times = times or {}  # (stream name, event number) -> GPU time of the event
        self.log: list = []
        self.stream = FakeStream(self, "side")
        self.consumer = FakeStream(self, "consumer")
        self.producer_stream = FakeStream(self, "producer")
        self.copies = 0
        self.alive_at_copy: list[int] = []  # device batches that may be alive at each copy

    def current(self):
        return self.consumer

    def side(self):
        import contextlib

        return contextlib.nullcontext()

    def record(self, stream, timing):
        timed = [e for e in stream.events if e not in stream.marks]
        event = FakeEvent(self, stream, self.times.get((stream.name, len(timed)), 0.0)
                          if timing else 0.0)
        stream.events.append(event)
        if not timing:
            stream.marks.append(event)
        self.log.append(("record", stream.name, len(stream.events) - 1))
        return event

    def on_gpu(self, t):
        return getattr(t, "on_gpu", False)

    def producer(self, t):
        return self.producer_stream

    def ours(self, t):
        return True

    def record_stream(self, t, stream):
        self.log.append(("record_stream", stream.name, int(t.flatten()[0])))

    def needs_pin(self, t):
        return not self.on_gpu(t) and not getattr(t, "pinned", False)

    def pin(self, t):
        if self.fail.get("pin") == self.copies:
            raise RuntimeError(f"pin failed at {self.copies}")
        self.log.append(("pin", int(t.flatten()[0])))
        out = t.clone()
        out.pinned = True
        return out

    def copy(self, t):
        if self.on_gpu(t):
            return t
        if self.fail.get("copy") == self.copies:
            raise RuntimeError(f"copy failed at {self.copies}")
        # batches whose memory may be in use: the GPU has passed hand-out k, so the steps
        # before it are done, and the trainer let go of batch k - 1 when k was handed out
        # (we are in a later hand-out: its own mark comes after this copy): k on are alive
        passed = [i for i, e in enumerate(self.consumer.marks) if e.done]
        self.alive_at_copy.append(self.copies + 1 - (passed[-1] if passed else 0))
        self.copies += 1
        out = t.clone()
        out.on_gpu = True
        self.log.append(("copy", int(t.flatten()[0])))
        return out

    def empty_like(self, t):
        out = torch.empty_like(t)
        out.on_gpu = True
        return out

    def copy_into(self, out, t):
        out.copy_(t)

    def push(self, name):
        self.log.append(("push", name))

    def pop(self):
        self.log.append(("pop",))


class FakePrefetcher(hi.CudaPrefetcher):
    def __init__(self, iterable, ops: FakeOps, depth=2, pin_memory=True, static_buffers=False,
                 device_transform=None):
        super().__init__(iterable, device="cpu", depth=depth, device_transform=device_transform)
        self.fake = ops
        self.pin_memory = pin_memory
        self.static_buffers = static_buffers

    def _ops(self):
        return self.fake


def values(batches):
    return [int(b.flatten()[0]) for b in batches]


def drain(it):
    """Batches until the first error (returned with them) or the end."""
    got = []
    while True:
        try:
            got.append(next(it))
        except StopIteration:
            return got, None
        except Exception as e:
            return got, e


@pytest.mark.parametrize("what", ["source", "pin", "copy", "transform"])
@pytest.mark.parametrize("depth", [0, 1, 3])
def test_cuda_path_error_arrives_at_its_step_after_the_batches_before_it(what, depth):
    """Row 6: an error of the source, of pinning, copying or device_transform at batch 3 is
    raised by the 4th next(), after batches 0-2, whatever the depth; then the pass ends."""
    closed = []

    def gen():
        try:
            for i in range(8):
                if what == "source" and i == 3:
                    raise KeyError("source failed at 3")
                yield torch.full((2,), i)
        finally:
            closed.append(True)

    def transform(b):
        if what == "transform" and int(b[0]) == 3:
            raise ValueError("transform failed at 3")
        return b

    ops = FakeOps(fail={what: 3})
    pf = FakePrefetcher(gen(), ops, depth=depth, device_transform=transform)
    it = iter(pf)
    got, error = drain(it)
    assert values(got) == [0, 1, 2]
    assert error is not None and "at 3" in str(error)
    with pytest.raises(StopIteration):
        next(it)
    assert pf.batches == 3
    pf.close()
    assert closed == [True]
    pushes = [e for e in ops.log if e[0] == "push"]
    assert len(pushes) == sum(1 for e in ops.log if e[0] == "pop")  # NVTX ranges balanced


@pytest.mark.parametrize("depth", [0, 1, 2, 4])
def test_device_memory_bound_whatever_the_hosts_lead(depth):
    """Row 3: a GPU that never catches up by itself (a host far ahead): before each device
    batch is made, the host waits for the hand-out depth+1 before it, so at most depth+2
    batches can be alive; a GPU that keeps up is never waited for."""
    ops = FakeOps(gpu_keeps_up=False)
    pf = FakePrefetcher([torch.full((2,), i) for i in range(30)], ops, depth=depth)
    assert values(pf) == list(range(30))
    assert max(ops.alive_at_copy) <= depth + 2
    waited = [e[2] for e in ops.log if e[0] == "synchronize"]
    assert waited == list(range(30 - depth - 1))  # hand-out j-depth-1 before batch j
    assert pf.throttle_s >= 0 and pf.host_wait_s >= 0

    fast = FakeOps(gpu_keeps_up=True)
    assert values(FakePrefetcher([torch.full((2,), i) for i in range(30)], fast,
                                 depth=depth)) == list(range(30))
    assert not any(e[0] == "synchronize" for e in fast.log)


def test_device_wait_counts_the_stalls_the_gpu_has_passed():
    """Row 8: the consumer stream's stall at a batch's ready event is its ready time minus
    the time the consumer reached the hand-out (0 if the batch was ready first)."""
    times = {}
    for i in range(6):
        times[("side", i)] = 10.0 * i + 5              # batch i ready at 10i + 5
        times[("consumer", i)] = 10.0 * i + (3 if i % 2 else 7)  # odd: 2 s early
    ops = FakeOps(times=times)
    pf = FakePrefetcher([torch.full((2,), i) for i in range(6)], ops, depth=2)
    assert values(pf) == list(range(6))
    assert pf.device_wait_s == pytest.approx(3 * 2.0)
    assert pf.wait_s == pytest.approx(pf.host_wait_s + pf.device_wait_s)

    pending = FakeOps(gpu_keeps_up=False, times=times)  # the GPU has passed nothing yet
    pf = FakePrefetcher([torch.full((2,), i) for i in range(6)], pending, depth=2)
    it = iter(pf)
    next(it), next(it)
    assert pf.device_wait_s == 0.0


def test_gpu_resident_batch_waits_for_its_producer_and_is_recorded_on_the_side_stream():
    """Row 1: a batch already on the GPU: the side stream waits for the producer's stream
    before its transform runs, records the inputs' use on the side stream, and the consumer
    waits for the batch's event; only CPU leaves are pinned and copied (row 2)."""
    def batch(i):
        x = torch.full((2,), i)
        x.on_gpu = True
        return {"x": x, "y": torch.full((3,), 100 + i)}

    seen = []

    def transform(b):
        ops.log.append(("transform", int(b["x"][0])))
        seen.append(b["x"])
        return b

    ops = FakeOps()
    got = list(FakePrefetcher([batch(i) for i in range(3)], ops, depth=1,
                              device_transform=transform))
    assert [int(b["x"][0]) for b in got] == [0, 1, 2]
    log = ops.log
    for i in range(3):
        wait = log.index(("wait_stream", "side", "producer"), log.index(("pin", 100 + i)))
        assert log.index(("record_stream", "side", i)) > wait
        assert log.index(("transform", i)) > log.index(("record_stream", "side", i))
    assert ("pin", 0) not in log and ("copy", 0) not in log  # the GPU leaf stays as it is
    assert [e for e in log if e[0] == "wait_event"] == [("wait_event", "consumer", "side")] * 3


def test_static_buffers_hand_out_the_same_tensors_and_reject_another_shape_at_its_step():
    """Row 10: static_buffers: every batch lands in the same tensors (valid until the next
    step); a batch of another shape is an error at its own step."""
    src = [torch.full((4,), i) for i in range(5)] + [torch.full((3,), 5)]
    pf = FakePrefetcher(src, FakeOps(), depth=2, static_buffers=True)
    it = iter(pf)
    ptrs, seen = set(), []
    for _ in range(5):
        b = next(it)
        ptrs.add(b.data_ptr())
        seen.append(int(b[0]))
    assert len(ptrs) == 1 and seen == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"static_buffers=True.*drop_last=True"):
        next(it)


def test_each_pass_side_stream_first_waits_for_the_consumers_earlier_work():
    """A device_transform may read GPU tensors the trainer made before the loop: each pass's
    side stream waits for the consumer stream once, before its first copy."""
    ops = FakeOps()
    pf = FakePrefetcher([torch.full((4,), i) for i in range(5)], ops, depth=2)
    for _ in range(2):
        start = len(ops.log)
        assert values(pf) == [0, 1, 2, 3, 4]
        log = ops.log[start:]
        waits = [i for i, e in enumerate(log) if e == ("wait_stream", "side", "consumer")]
        assert len(waits) == 1 and waits[0] < log.index(("copy", 0))


def test_static_buffers_are_the_same_tensors_in_every_pass():
    """Row 10: a CUDA graph captured in one pass replays the same addresses in the next, so
    the buffers live with the prefetcher, not with a pass; a later pass of other shapes is
    refused at its step."""
    src = [torch.full((4,), i) for i in range(3)]
    pf = FakePrefetcher(src, FakeOps(), depth=2, static_buffers=True)
    ptrs, seen = set(), []
    for _ in range(3):  # epochs
        for b in pf:
            ptrs.add(b.data_ptr())
            seen.append(int(b[0]))
    assert len(ptrs) == 1 and seen == [0, 1, 2] * 3
    pf.iterable = [torch.full((5,), 7)]
    with pytest.raises(ValueError, match=r"buffers were made for \[\(\(4,\)"):
        next(iter(pf))


def test_resolve_device_uses_the_local_rank(monkeypatch):
    """Row 9: device=None is this rank's GPU (local_rank % device count) under CUDA."""
    from horovod_iter.prefetch import resolve_device

    assert resolve_device(None, local_rank=3) == torch.device("cpu")  # no CUDA here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert resolve_device(None, local_rank=5) == torch.device("cuda", 1)
    assert resolve_device(None, local_rank=2) == torch.device("cuda", 2)
    assert resolve_device(None) == torch.device("cuda", 0)
    assert resolve_device("cuda", local_rank=3) == torch.device("cuda", 0)  # torch's rule
    assert resolve_device("cpu", local_rank=3) == torch.device("cpu")
    with pytest.raises(ValueError, match="local_rank must be an int >= 0"):
        resolve_device(None, local_rank=-1)


def test_side_stream_is_made_once_per_device_off_ncclss_pool(monkeypatch):
    """Row 7: one stream per device for the process, made once (not per pass), from torch's
    high-priority pool (ProcessGroupNCCL draws from the default-priority one)."""
    from horovod_iter import prefetch

    made = []

    class Stream:
        def __init__(self, device, priority=0):
            made.append((device, priority))

    monkeypatch.setattr(prefetch, "_side_streams", {})
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    a = prefetch._side_stream(torch.device("cuda", 0))
    assert prefetch._side_stream(torch.device("cuda", 0)) is a
    b = prefetch._side_stream(torch.device("cuda", 1))
    assert b is not a and [p for _, p in made] == [-1, -1]


def test_pinned_collate_and_pin_leaves_leave_non_cpu_tensors_where_they_are():
    """Row 2: only CPU memory can be pinned: a GPU-resident dataset's samples are stacked on
    their device, and pin_leaves passes them through (meta tensors stand in for CUDA ones)."""
    from horovod_iter.gather import pin_leaves, pinned_collate

    samples = [(torch.empty(3, device="meta"), "a") for _ in range(4)]
    batch = pinned_collate(samples)
    assert batch[0].device.type == "meta" and batch[0].shape == (4, 3)
    assert list(batch[1]) == ["a"] * 4
    x = torch.empty(2, device="meta")
    out = pin_leaves({"x": x, "tag": "t", "n": 3})
    assert out["x"] is x and out["tag"] == "t" and out["n"] == 3


def test_pad_template_keeps_one_row_not_the_batch():
    """Row 10: the padding template is a copy of one row, not a zero-row view that would keep
    the whole first batch's memory alive for the pass."""
    from horovod_iter.sync import EndOfDataSync

    backend = hi.init("local")
    big = {"x": torch.zeros(1000, 10), "y": torch.arange(1000)}
    sync = EndOfDataSync(iter([big]), backend, uneven="pad", num_batches=1)
    assert next(sync) is big
    template = sync._template
    assert template["x"].shape == (0, 10) and template["y"].shape == (0,)
    assert template["x"].untyped_storage().nbytes() <= 10 * 4
    assert template["y"].untyped_storage().nbytes() <= 8
    sync.close()


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA it runs the whole GPU check")
def test_gpu_check_script_says_there_is_no_gpu_and_exits_0():
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(root, "scripts", "gpu_check.py")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "no CUDA device" in proc.stdout


def test_mask_labels_puts_its_mask_on_the_labels_device():
    """A GPU-resident batch's labels are on the GPU, and the end-of-data check makes the
    padding mask on the CPU: masked_fill wants both on one device (checked here with the meta
    device, which refuses a CPU mask as CUDA does)."""
    labels = torch.zeros(4, 3, dtype=torch.long, device="meta")
    padding = torch.tensor([False, False, True, True])
    out = hi.mask_labels("labels")({"labels": labels}, padding)
    assert out["labels"].device.type == "meta" and out["labels"].shape == (4, 3)
    cpu = hi.mask_labels(1)((torch.ones(4), torch.zeros(4, dtype=torch.long)), padding)
    assert cpu[1].tolist() == [0, 0, -100, -100]
